"""Datasets: JSONL formats, tokenization with loss masks, windows, packing, batches,
and discovery of many domains.

Formats (one JSON object per line; extra keys such as ``domain`` are ignored):

    {"text": "..."}                                  every token counts in the loss
    {"prompt": "...", "completion": "..."}           only completion tokens (+ EOS) count
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
                                                     only assistant turns count

A *sequence* is ``(ids, mask)``: ``ids`` int32 ``(n,)`` and ``mask`` bool ``(n,)`` where
``mask[i]`` says whether predicting ``ids[i]`` (from ``ids[:i]``) counts in the loss, so
``mask[0]`` is never used. :func:`batches` turns sequences into ``inputs = ids[:-1]``,
``targets = ids[1:]``, ``mask = mask[1:]``.

Windows and packing (:func:`pack`): a document longer than ``max_seq_length + 1`` tokens
is cut into windows of exactly ``max_seq_length + 1`` tokens (``max_seq_length``
targets); consecutive windows share ``overlap`` tokens of context and the last window is
aligned to the document's end. A target already counted in an earlier window is masked,
so every target of a document is counted exactly once. Shorter documents are packed
greedily (in file order) into sequences of at most ``max_seq_length + 1`` tokens, each
ending in EOS.

Segments: a packed sequence (:class:`Packed`) records each token's document, 0, 1, ...
in order; a window of a long document is one segment. ``batches(..., segments=True)``
yields them as ``segment_ids`` and the trainer, with ``TrainConfig.attention_mask =
"document"`` (the default), passes them to attention: a token attends only to earlier
tokens of its own document, as if each document were trained alone, and the blocks
between documents are never computed (packing costs no cross-document attention). With
``attention_mask = "causal"`` packed documents attend to the earlier documents of their
sequence (the EOS between them marks the border), as most LLM pre-training does.

Domains (:func:`discover_domains`) for training many adapters: a directory with one
sub-folder per domain (each with ``train.jsonl`` and optionally ``valid.jsonl`` /
``test.jsonl``), or one ``NAME.jsonl`` per domain, or one JSONL (file, or ``train.jsonl``
/ ``valid.jsonl`` of a directory) whose records carry a ``domain`` field (a record of
that single file may also carry ``"split": "valid"`` or ``"test"``). Folders whose names
start with ``.`` or ``_`` are ignored. A ``NAME.jsonl`` domain has no valid split unless
``valid_fraction`` holds part of it out. Numbering is stable: if every domain name
starts with a number (``001_caesar_3``, ``7``, ``12-law``) that number is the id
(1-based, unique); otherwise domains are sorted by name and numbered 1..N, so adding a
domain renumbers the ones after it -- number them if ids must never move.

Modules, in import order (each imports only those above it): ``jsonl`` (formats,
validation, reading), ``encode`` (records to sequences with loss masks), ``packing``
(windows and packing), ``splits`` (one split, split files, the valid holdout),
``domains`` (discovery, numbering, one domain's splits), ``context`` (does
``max_seq_length`` fit the model), ``dataset`` (:func:`load_dataset`), ``batching``
(epoch order, :func:`pad_rows`, :func:`batches`).
"""

from .batching import batches, epoch_order, num_batches, pad_rows
from .context import check_context
from .dataset import load_dataset
from .domains import Domain, discover_domains, load_domain, number_domains
from .encode import Seq, encode_record
from .jsonl import ROLES, read_jsonl, record_format
from .packing import Packed, pack, windows
from .splits import SPLITS, Split, load_split

__all__ = [
    "ROLES",
    "SPLITS",
    "Domain",
    "Packed",
    "Seq",
    "Split",
    "batches",
    "check_context",
    "discover_domains",
    "encode_record",
    "epoch_order",
    "load_dataset",
    "load_domain",
    "load_split",
    "num_batches",
    "number_domains",
    "pack",
    "pad_rows",
    "read_jsonl",
    "record_format",
    "windows",
]
