r"""The tokenizer of a GGUF file, built from its metadata the way llama.cpp reads it.

A GGUF carries no ``tokenizer.json``: the vocabulary, merges, scores, token types and
special ids are metadata under llama.cpp's key names (``tokenizer.ggml.*``). We build a
``tokenizers.Tokenizer`` from them ourselves instead of using transformers' GGUF
converter, because the converter picks its pre-tokenizer by model class and ignores
``tokenizer.ggml.pre`` for most values (SmolLM2's ``smollm`` isolates every ``\p{N}``
character in llama.cpp, not in transformers: ``" ½"`` differs), and reads SentencePiece
text after a leading space or a special token differently from llama.cpp and
sentencepiece; what the model sees at inference in llama.cpp is what it must be
fine-tuned on.

Two vocabulary kinds (``tokenizer.ggml.model``):

* ``gpt2``: byte-level BPE (Llama 3, Qwen2, SmolLM2, Mistral Nemo ...): ``tokens`` in
  GPT-2's byte alphabet, ``merges`` as ``"a b"`` strings, and text split before BPE by
  the regexes llama.cpp assigns to ``tokenizer.ggml.pre`` (:data:`PRE_TOKENIZERS`).
* ``llama``: SentencePiece BPE (Llama 1/2, Mistral 7B): ``tokens`` with ``▁`` for spaces,
  ``scores``, ``<0xNN>`` byte tokens for byte fallback. llama.cpp merges the adjacent pair
  whose concatenation is the highest-scoring token; a BPE whose merges are ranked by that
  score does the same.

Token types (``tokenizer.ggml.token_type``, llama.cpp's ``llama_token_type``): control and
unknown tokens become special added tokens (matched whole in text, dropped by
``decode(skip_special_tokens=True)``), user-defined ones plain added tokens; llama.cpp
matches exactly these three kinds whole in text before tokenizing the rest.
"""

from __future__ import annotations

import warnings

from ..errors import TokenizerError
from ..tokenizer import HFTokenizer
from .gguf import plain

# llama.cpp's llama_token_type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes from llama.cpp (src/llama-vocab.cpp, llm_tokenizer_bpe). Each is
# applied to the pieces the previous one produced, keeping matches and the text between
# them alike (tokenizers' Split(..., "isolated")). llama.cpp spells (?i:...) out as
# '[sS]...' because std::regex lacks it; the tokenizers engine (Oniguruma) has it.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# kind -> (regexes in order, ignore_merges: a piece that is itself a token is not merged
# up from characters, llama.cpp's `ignore_merges`; it also turns add_bos on by default)
PRE_KINDS: dict[str, tuple[tuple[str, ...], bool]] = {
    # llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT (also used when `pre` is missing)
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    "gpt2": ((GPT2_SPLIT,), False),
    "digits+gpt2": ((r"\p{N}", GPT2_SPLIT), False),
    "falcon": ((r"[\p{P}\$\+<=>\^~\|`]+", GPT2_SPLIT, r"[0-9][0-9][0-9]"), False),
    "llama3": ((LLAMA3_SPLIT,), True),
    "llama3-keep-merges": ((LLAMA3_SPLIT,), False),
    "qwen2": ((QWEN2_SPLIT,), False),
    "tekken": ((TEKKEN_SPLIT,), True),
    "gpt-4o": ((GPT4O_SPLIT,), False),
}

# tokenizer.ggml.pre -> kind, as llama.cpp's llama_vocab::impl::load maps them
PRE_TOKENIZERS: dict[str, str] = {
    "default": "default",
    **dict.fromkeys(("gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "mpt", "olmo", "jais", "trillion",
                     "exaone4"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    "digits+gpt2"),
    "falcon": "falcon",
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2"), "llama3"),
    **dict.fromkeys(("dbrx", "smaug-bpe"), "llama3-keep-merges"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"), "qwen2"),
    "tekken": "tekken",
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), "gpt-4o"),
}

# pre values for which llama.cpp adds BOS unless the file says otherwise
PRE_ADD_BOS = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "tekken"}

SUPPORTED_MODELS = ("gpt2", "llama")


def _get(meta: dict, key: str, default=None):
    value = meta.get(f"tokenizer.ggml.{key}")
    return default if value is None else plain(value)


def _required(meta: dict, key: str, model: str, source: str) -> list:
    value = _get(meta, key)
    if not value:
        raise TokenizerError(f"{source}: tokenizer.ggml.{key} is missing or empty, which a {model!r} tokenizer "
                             "needs; the file is incomplete, re-convert it with llama.cpp's convert_hf_to_gguf.py")
    return value


def _vocab(tokens: list[str], source: str) -> dict[str, int]:
    """token -> id. Empty tokens get llama.cpp's placeholder ``[EMPTY_i]``; a repeated
    token is refused, as llama.cpp refuses it (one id could not round-trip)."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        t = t or f"[EMPTY_{i}]"
        if t in vocab:
            raise TokenizerError(f"{source}: token {t!r} appears twice in tokenizer.ggml.tokens (ids {vocab[t]} "
                                 f"and {i}); llama.cpp refuses such a file too, re-convert it")
        vocab[t] = i
    return vocab


def spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece/llama.cpp's "merge the adjacent pair whose
    concatenation is the best-scoring token": every split of every token into two tokens,
    ranked by the token's score (best first), ties by the ids of the two halves, as
    transformers' SentencePiece extractor orders them."""
    merges = []
    for piece, i in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def pre_tokenizer(pre: str | None, *, source: str) -> tuple[object, bool]:
    """``(tokenizers pre-tokenizer, ignore_merges)`` for a byte-level vocabulary whose
    ``tokenizer.ggml.pre`` is ``pre`` (None: missing), as llama.cpp splits text for it.
    An unknown value falls back to the GPT-2 regex with a notice (llama.cpp refuses it)."""
    from tokenizers import Regex, pre_tokenizers

    if pre is None:
        kind = "default"  # llama.cpp: "missing pre-tokenizer type, using: 'default'"
    elif pre in PRE_TOKENIZERS:
        kind = PRE_TOKENIZERS[pre]
    else:
        warnings.warn(f"mozgach_mlx: {source}: unknown tokenizer.ggml.pre {pre!r}; splitting text with the GPT-2 "
                      "regex, which may tokenize differently from the model's own tokenizer", stacklevel=4)
        kind = "gpt2"
    regexes, ignore_merges = PRE_KINDS[kind]
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), \
        ignore_merges


def _byte_level(meta: dict, vocab: dict[str, int], source: str):
    from tokenizers import Tokenizer, decoders, models

    merges = []
    for m in _required(meta, "merges", "gpt2", source):
        cut = m.find(" ", 1)  # llama.cpp: the first space after the first character
        if cut < 0:
            raise TokenizerError(f"{source}: tokenizer.ggml.merges entry {m!r} is not 'left right'; "
                                 "the file is corrupt, re-convert it")
        merges.append((m[:cut], m[cut + 1:]))
    pre = _get(meta, "pre")
    split, ignore_merges = pre_tokenizer(pre, source=source)
    try:
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    except Exception as e:  # tokenizers raises its own Exception type for merges outside the vocabulary
        raise TokenizerError(f"{source}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens ({e}); "
                             "the file is corrupt, re-convert it") from e
    tk.pre_tokenizer = split
    tk.decoder = decoders.ByteLevel()
    return tk, pre in PRE_ADD_BOS


def _sentencepiece(meta: dict, vocab: dict[str, int], unk: str | None, source: str):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = _required(meta, "scores", "llama", source)
    if len(scores) < len(vocab):
        raise TokenizerError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {len(vocab)} "
                             "tokens; the file is corrupt, re-convert it")
    tk = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(vocab, scores), unk_token=unk,
                              fuse_unk=True, byte_fallback=True))
    # llama.cpp prefixes a space to the text (and to the text after each special token) when
    # add_space_prefix, then writes spaces as U+2581; tokenizers normalizes each stretch of
    # text between added tokens separately, so Prepend does both.
    add_space_prefix = bool(_get(meta, "add_space_prefix", True))
    replace = normalizers.Replace(" ", "\u2581")
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if add_space_prefix else replace
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if add_space_prefix else steps)
    return tk, True


def _special_ids(meta: dict, n: int, model: str, source: str) -> dict[str, int | None]:
    """bos/eos/unk/pad ids; a SentencePiece vocabulary without them gets llama.cpp's
    defaults (1, 2, 0); an id outside the vocabulary is dropped with a notice, as llama.cpp does."""
    defaults = {"bos": 1, "eos": 2, "unk": 0} if model == "llama" else {}
    ids = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        i = _get(meta, key, defaults.get(name))
        if i is not None and not 0 <= int(i) < n:
            warnings.warn(f"mozgach_mlx: {source}: tokenizer.ggml.{key} = {i} is outside the vocabulary of {n} "
                          "tokens; ignored", stacklevel=3)
            i = None
        ids[name] = None if i is None else int(i)
    return ids


def tokenizer_from_gguf(metadata: dict, *, source: str) -> HFTokenizer:
    """The tokenizer described by a GGUF file's metadata (``mx.load(path,
    return_metadata=True)[1]``), as an :class:`HFTokenizer` whose ids are llama.cpp's.

    ``source`` names the file in errors. ``add_bos_token`` comes from
    ``tokenizer.ggml.add_bos_token`` (default: True for SentencePiece and for the Llama-3
    and Tekken pre-tokenizers, False otherwise, as in llama.cpp); ``add_eos_token`` goes
    into the saved tokenizer's post-processor. ``save()`` writes a ``tokenizer.json``
    directory that :func:`..tokenizer.load_tokenizer` and ``AutoTokenizer`` read back.

    Raises:
        TokenizerError: a vocabulary kind other than ``gpt2``/``llama``, or missing or
            inconsistent tokenizer metadata.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    model = _get(metadata, "model")
    if model not in SUPPORTED_MODELS:
        raise TokenizerError(f"{source}: tokenizer.ggml.model is {model!r}, which mozgach_mlx cannot build (it "
                             f"reads {' and '.join(map(repr, SUPPORTED_MODELS))}); load the model from its Hugging "
                             "Face directory (tokenizer.json) instead")
    tokens = _required(metadata, "tokens", model, source)
    vocab = _vocab(tokens, source)
    names = list(vocab)  # id -> token, placeholders for empty tokens included
    types = _get(metadata, "token_type") or [NORMAL] * len(names)
    ids = _special_ids(metadata, len(names), model, source)
    token = {k: (None if i is None else names[i]) for k, i in ids.items()}
    if model == "gpt2":
        tk, add_bos_default = _byte_level(metadata, vocab, source)
    else:
        tk, add_bos_default = _sentencepiece(metadata, vocab, token["unk"], source)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, y in zip(names, types, strict=False) if y in (CONTROL, UNKNOWN)])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, y in zip(names, types, strict=False) if y == USER_DEFINED])
    add_bos = bool(_get(metadata, "add_bos_token", add_bos_default))
    add_eos = bool(_get(metadata, "add_eos_token", False))
    for flag, key, name in ((add_bos, "add_bos_token", "bos"), (add_eos, "add_eos_token", "eos")):
        if flag and ids[name] is None:
            raise TokenizerError(f"{source}: tokenizer.ggml.{key} is true but the file has no {name} token id; "
                                 "the file is inconsistent, re-convert it")
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=token["bos"], eos_token=token["eos"],
                                 unk_token=token["unk"], pad_token=token["pad"], add_bos_token=add_bos,
                                 add_eos_token=add_eos, clean_up_tokenization_spaces=False,
                                 chat_template=plain(metadata.get("tokenizer.chat_template")))
    return HFTokenizer(hf, add_bos_token=add_bos)
