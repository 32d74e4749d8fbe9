import json
import logging

import mlx.core as mx
import numpy as np
import pytest

from mozgach_mlx import data
from mozgach_mlx.errors import ConfigError, DataError
from mozgach_mlx.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
BOS, EOS, PAD = TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id


def write_jsonl(path, recs, raw_lines=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in recs] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def b(s):
    return list(s.encode())


# ---------------------------------------------------------------------------- reading

def test_read_jsonl_formats_and_blank_lines(tmp_path):
    recs = [{"text": "hi"}, {"prompt": "p", "completion": "c", "domain": "x"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    p = write_jsonl(tmp_path / "a.jsonl", recs, ["", "   "])
    got, skipped = data.read_jsonl(p)
    assert got == recs and skipped == 0


@pytest.mark.parametrize("line, what", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"foo": 1}', "no 'text'"),
    ('{"text": 3}', "'text' must be a string"),
    ('{"prompt": "x"}', "together"),
    ('{"text": "a", "messages": []}', "mixes formats"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant"),
    ('{"messages": [{"role": "bot", "content": "q"}]}', "unknown role"),
])
def test_bad_line_names_file_and_line(tmp_path, line, what):
    p = write_jsonl(tmp_path / "train.jsonl", [{"text": "ok"}, {"text": "ok"}], [line, '{"text": "z"}'])
    with pytest.raises(DataError, match=rf"train\.jsonl:3: .*{what}"):
        data.read_jsonl(p)
    recs, skipped = data.read_jsonl(p, skip_bad_lines=True)
    assert skipped == 1 and [r["text"] for r in recs] == ["ok", "ok", "z"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.read_jsonl(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------- encoding

def test_encode_text():
    ids, mask = data.encode_record({"text": "abc"}, TOK)
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert ids.tolist() == [BOS, *b("abc"), EOS]
    assert mask.tolist() == [False, True, True, True, True]


def test_encode_prompt_completion_masks_prompt():
    ids, mask = data.encode_record({"prompt": "Q: 1+1?", "completion": " 2"}, TOK)
    assert ids.tolist() == [BOS, *b("Q: 1+1? 2"), EOS]
    assert ids[mask].tolist() == [*b(" 2"), EOS]


def test_encode_messages_masks_everything_but_assistant():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"}]
    ids, mask = data.encode_record({"messages": msgs}, TOK)
    # Expected by hand from the byte template "<|role|>\ncontent\n": every assistant turn's
    # content + its newline + an inserted EOS counts; role headers and other turns do not.
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in msgs)
    no_eos = [i for i in ids.tolist() if i != EOS]
    assert no_eos == [BOS, *b(text)]
    assert ids[mask].tolist() == [*b("hello\n"), EOS, *b("ciao\n"), EOS]
    assert ids[-1] == EOS


class _ChatMLTok(ByteTokenizer):
    """ChatML template whose end-of-turn marker is the EOS token (like Qwen2-Instruct)."""

    def apply_chat_template(self, messages, add_generation_prompt=False):
        s = "".join(f"<s>{m['role']}\n{m['content']}<e>\n" for m in messages)
        return s + ("<s>assistant\n" if add_generation_prompt else "")

    def encode(self, text, add_bos=True):
        ids = []
        for k, part in enumerate(text.split("<e>")):
            ids += ([self.eos_token_id] if k else []) + list(part.encode())
        return [self.bos_token_id, *ids] if add_bos else ids


def test_encode_messages_template_with_own_end_of_turn():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, mask = data.encode_record({"messages": msgs}, _ChatMLTok())
    # the template's end-of-turn (EOS) and newline belong to the assistant span; no extra EOS
    assert ids.tolist() == [BOS, *b("<s>user\nhi"), EOS, *b("\n<s>assistant\nyo"), EOS, *b("\n"), EOS]
    assert ids[mask].tolist() == [*b("yo"), EOS, *b("\n")]


def test_encode_messages_with_a_real_hf_tokenizer_and_jinja_template():
    """The HFTokenizer path: a byte-level BPE fast tokenizer with a ChatML template."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mozgach_mlx.tokenizer import HFTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", chat_template=chatml,
                                 additional_special_tokens=["<|im_start|>"])
    tok = HFTokenizer(hf)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "ok"}]
    ids, mask = data.encode_record({"messages": msgs}, tok)
    assert tok.bos_token_id is None and ids[0] != tok.eos_token_id  # no BOS invented
    full = tok.encode(tok.apply_chat_template(msgs), add_bos=False)
    assert ids.tolist() == [*full, tok.eos_token_id]  # template output + separating EOS
    masked = ids[mask].tolist()
    assert hf.decode(masked) == "yo<|im_end|>\nok<|im_end|>\n"
    assert masked.count(tok.eos_token_id) == 2  # the template's own end-of-turn; none inserted


class _RewritingTemplateTok(ByteTokenizer):
    """A template that changes earlier turns when more follow (like reasoning stripping)."""

    def apply_chat_template(self, messages, add_generation_prompt=False):
        n = len(messages)
        return "".join(f"[{n}]{m['role']}:{m['content']};" for m in messages) + \
            ("assistant:" if add_generation_prompt else "")


class _MergingTok(ByteTokenizer):
    """Tokenizes '\\n<' as one token, so prefixes are not token-prefix-stable."""

    def encode(self, text, add_bos=True):
        ids, i, raw = [], 0, text.encode()
        while i < len(raw):
            if raw[i: i + 2] == b"\n<":
                ids.append(255)
                i += 2
            else:
                ids.append(raw[i])
                i += 1
        return [self.bos_token_id, *ids] if add_bos else ids


def test_template_breaking_prefix_property_is_a_data_error():
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    with pytest.raises(DataError, match="incrementally"):
        data.encode_record(rec, _RewritingTemplateTok())
    with pytest.raises(DataError, match="prefix-stable"):
        data.encode_record(rec, _MergingTok())


# ---------------------------------------------------------------------------- windows and packing

def _targets(seqs):
    return sum(int(s[1][1:].sum()) for s in seqs)


@pytest.mark.parametrize("n, L, overlap", [(50, 8, 0), (50, 8, 3), (9, 8, 0), (10, 8, 7), (23, 5, 2)])
def test_windows_count_every_target_once(n, L, overlap):
    ids = np.arange(n, dtype=np.int32)
    mask = np.ones(n, bool)
    mask[0] = False
    mask[5:7] = False  # a masked prompt region stays masked
    wins = data.windows(ids, mask, L, overlap)
    assert all(len(w) <= L + 1 for w, _ in wins)
    counted = np.zeros(n, int)
    for w, m in wins:
        np.testing.assert_array_equal(w, np.arange(w[0], w[0] + len(w)))  # contiguous slices
        counted[w[1:][m[1:]]] += 1  # ids are positions here
    assert counted.tolist() == mask.astype(int).tolist()
    if n > L + 1:
        assert all(len(w) == L + 1 for w, _ in wins)  # full context, last one aligned to the end
        starts = [int(w[0]) for w, _ in wins]
        assert all(s2 - s1 <= L - overlap for s1, s2 in zip(starts, starts[1:], strict=False))


def test_windows_bad_overlap():
    with pytest.raises(ConfigError, match="overlap"):
        data.windows(np.arange(20), np.ones(20, bool), 8, 8)


def test_pack_short_documents_with_eos_between():
    docs = [data.encode_record({"text": t}, TOK) for t in ["ab", "cde", "f", "ghijklmnopqrstuvwxyz", "x"]]
    seqs = data.pack(docs, 10, EOS)
    assert all(len(i) <= 11 for i, *_ in seqs)
    assert _targets(seqs) == _targets(docs)
    flat = np.concatenate([i for i, *_ in seqs]).tolist()
    assert flat.count(EOS) >= 5  # every document ends with EOS, windows may repeat one
    first = seqs[0][0].tolist()
    # greedy packing in order; a short document is never split across sequences
    assert first == [BOS, *b("ab"), EOS, BOS, *b("cde"), EOS]
    assert seqs[1][0].tolist() == [BOS, *b("f"), EOS]


def test_pack_false_keeps_one_document_per_sequence():
    docs = [data.encode_record({"text": t}, TOK) for t in ["ab", "cde", "f"]]
    seqs = data.pack(docs, 100, EOS, pack=False)
    assert [s[0].tolist() for s in seqs] == [d[0].tolist() for d in docs]


def test_pack_appends_missing_eos_and_drops_empty():
    seqs = data.pack([(np.array([BOS, 1, 2]), np.array([False, True, True])),
                      (np.array([BOS]), np.array([False]))], 16, EOS)
    assert seqs[0][0].tolist() == [BOS, 1, 2, EOS, BOS, EOS]


def test_pack_records_each_tokens_document():
    docs = [data.encode_record({"text": t}, TOK) for t in ["ab", "cde", "f", "g" * 30, "x"]]
    seqs = data.pack(docs, 10, EOS)
    for s in seqs:
        assert isinstance(s, data.Packed) and s.segments.dtype == np.int32 and len(s.segments) == len(s.ids)
        # documents in order: ids 0, 1, ... and, packed together, each starts with BOS
        assert (np.diff(s.segments) >= 0).all() and s.segments[0] == 0
        starts = np.flatnonzero(np.diff(s.segments, prepend=-1))
        if len(starts) > 1:
            assert s.ids[starts].tolist() == [BOS] * len(starts)
    assert seqs[0].segments.tolist() == [0] * 4 + [1] * 5  # [BOS a b EOS] [BOS c d e EOS]
    # the 30-token document is cut into windows of 11 tokens: one segment per window
    windows = [s for s in seqs if len(s.ids) == 11 and s.ids[1] == b("g")[0]]
    assert windows and all((s.segments == 0).all() for s in windows)
    assert all((s.segments == 0).all() for s in data.pack(docs, 10, EOS, pack=False))


def test_batches_yield_segment_ids_of_the_inputs():
    docs = [data.encode_record({"text": t}, TOK) for t in ["ab", "cde", "fghij"]]
    seqs = data.pack(docs, 9, EOS)  # [ab][cde] packed (9 tokens), [fghij] alone (7)
    assert [len(s.ids) for s in seqs] == [9, 7]
    x, y, m, seg = next(data.batches(seqs, 2, shuffle=False, segments=True))
    assert seg.dtype == mx.int32 and seg.shape == x.shape == (2, 8)
    assert np.array(seg).tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0] * 8]  # padding continues row 1
    # one document per row (or plain (ids, mask) sequences): no segments to apply
    assert next(data.batches(seqs[1:], 1, segments=True))[3] is None
    assert next(data.batches(_seqs([5, 7]), 2, segments=True))[3] is None
    assert len(next(data.batches(seqs, 2))) == 3  # without segments=True: (inputs, targets, mask)


# ---------------------------------------------------------------------------- batches

def _seqs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(0, 256, n).astype(np.int32)
        m = rng.random(n) < 0.8
        out.append((ids, m))
    return out


def test_batches_shapes_shift_and_padding():
    seqs = _seqs([5, 9, 3, 7, 2])
    got = list(data.batches(seqs, 2, seed=1, epoch=0, pad_id=PAD))
    assert len(got) == 3 and got[-1][0].shape[0] == 1
    order = data.epoch_order(5, 1, 0)
    for bi, (x, y, m) in enumerate(got):
        assert x.dtype == mx.int32 and y.dtype == mx.int32 and m.dtype == mx.float32
        assert x.shape == y.shape == m.shape
        for r, si in enumerate(order[2 * bi: 2 * bi + 2]):
            ids, mask = seqs[si]
            n = len(ids) - 1
            assert np.array(x[r, :n]).tolist() == ids[:-1].tolist()
            assert np.array(y[r, :n]).tolist() == ids[1:].tolist()
            assert np.array(m[r, :n]).tolist() == mask[1:].astype(np.float32).tolist()
            assert (np.array(y[r, n:]) == PAD).all() and (np.array(m[r, n:]) == 0).all()
            assert (np.array(x[r, n + 1:]) == PAD).all()


def test_batches_deterministic_and_resumable():
    seqs = _seqs([4] * 11)

    def run(**kw):
        return [np.array(x).tolist() for x, _, _ in data.batches(seqs, 3, **kw)]

    assert run(seed=0, epoch=0) == run(seed=0, epoch=0)
    assert run(seed=0, epoch=0) != run(seed=0, epoch=1)
    assert run(seed=0, epoch=0) != run(seed=1, epoch=0)
    assert run(seed=0, epoch=2, start=2) == run(seed=0, epoch=2)[2:]
    assert sorted(sum(run(seed=5, epoch=0), [])) == sorted(s[0][:-1].tolist() for s in seqs)
    assert len(run(seed=0, epoch=0, drop_last=True)) == 3
    x = next(data.batches(seqs, 3, pad_to_multiple=8))[0]
    assert x.shape == (3, 8)


def test_group_by_length_pads_less_and_keeps_each_epochs_sequences_and_resume():
    rng = np.random.default_rng(0)
    # like the default run's: documents of ~175 +- 15 tokens, and one in 20 a full 257-token window
    lengths = np.where(rng.random(200) < 0.05, 257, np.clip(rng.normal(175, 15, 200), 130, 256)).astype(int).tolist()
    seqs = [(np.full(n, i, np.int32), np.ones(n, bool)) for i, n in enumerate(lengths)]  # ids label the sequence

    def run(group, **kw):
        return list(data.batches(seqs, 4, seed=3, epoch=1, group_by_length=group, **kw))

    plain, grouped = run(False), run(True)
    assert len(plain) == len(grouped) == 50
    # the same sequences, whole
    def rows(batches):
        return sorted((int(np.array(x)[r, 0]), int(np.array(m)[r].sum())) for x, _, m in batches
                      for r in range(x.shape[0]))

    assert rows(grouped) == rows(plain) == sorted((i, n - 1) for i, n in enumerate(lengths))
    # each window of 16 batches of the epoch's permutation, sorted longest first
    order = data.epoch_order(len(seqs), 3, 1)
    win = data.batching.GROUP_WINDOW_BATCHES * 4
    for a in range(0, len(order), win):
        want = sorted((lengths[i] for i in order[a: a + win]), reverse=True)
        got = [int(np.array(m)[r].sum()) + 1 for _, _, m in grouped[a // 4: (a + win) // 4]
               for r in range(m.shape[0])]
        assert got == want
    padded = sum(x.size for x, _, _ in grouped)
    assert all(x.shape[1] % data.batching.GROUP_PAD == 0 for x, _, _ in grouped)
    real = sum(n - 1 for n in lengths)
    assert padded - real < 0.5 * (sum(x.size for x, _, _ in plain) - real)  # padding at least halved
    # resumable: starting at batch k gives exactly batches k, k+1, ...
    later = run(True, start=17)
    assert [np.array(x).tolist() for x, _, _ in later] == [np.array(x).tolist() for x, _, _ in grouped[17:]]
    # evaluation order (shuffle=False) is never regrouped
    assert [np.array(x).tolist() for x, _, _ in data.batches(seqs, 4, shuffle=False, group_by_length=True)] == \
        [np.array(x).tolist() for x, _, _ in data.batches(seqs, 4, shuffle=False)]


# ---------------------------------------------------------------------------- datasets

def test_load_dataset_dir(tmp_path, caplog):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "x" * 30}, {"prompt": "p", "completion": "c"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "t"}])
    with caplog.at_level(logging.WARNING):
        ds = data.load_dataset(tmp_path, TOK, max_seq_length=16)
    assert "no validation split" in caplog.text
    assert ds["valid"] is None and len(ds["test"]) == 1
    tr = ds["train"]
    assert tr.n_records == 2 and tr.n_targets == 31 + 2 and all(len(i) <= 17 for i, *_ in tr)
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "v"}])
    assert len(data.load_dataset(tmp_path, TOK, max_seq_length=16)["valid"]) == 1


def test_load_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="no train.jsonl"):
        (tmp_path / "valid.jsonl").write_text('{"text": "v"}\n')
        data.load_dataset(tmp_path, TOK, 16)
    (tmp_path / "train.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no usable records"):
        data.load_dataset(tmp_path, TOK, 16)
    (tmp_path / "train.jsonl").write_text("garbage\n")
    with pytest.raises(DataError, match=r"train\.jsonl:1"):
        data.load_dataset(tmp_path, TOK, 16)
    with pytest.raises(DataError, match=r"1 malformed lines skipped"):
        data.load_dataset(tmp_path, TOK, 16, skip_bad_lines=True)
    with pytest.raises(DataError, match="no such file"):
        data.load_dataset(tmp_path / "missing", TOK, 16)


def test_load_single_file_with_valid_fraction(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(20)])
    ds = data.load_dataset(p, TOK, 64, pack=False, valid_fraction=0.25, seed=3)
    assert ds["train"].n_records == 15 and ds["valid"].n_records == 5
    ds2 = data.load_dataset(p, TOK, 64, pack=False, valid_fraction=0.25, seed=3)
    assert [s[0].tolist() for s in ds["valid"]] == [s[0].tolist() for s in ds2["valid"]]


def test_check_context():
    assert data.check_context(4096, {"max_position_embeddings": 4096}) == 4096
    with pytest.raises(ConfigError, match="--rope-scaling linear --rope-factor 25"):
        data.check_context(100_000, {"max_position_embeddings": 4096})
    args = {"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 8.0}}
    assert data.check_context(32_768, args) == 32_768
    with pytest.raises(ConfigError, match="--rope-factor 25"):
        data.check_context(100_000, args)
    with pytest.raises(ConfigError):
        data.load_dataset("unused", TOK, 100_000, model_args={"max_position_embeddings": 2048})


# ---------------------------------------------------------------------------- domains

def test_discover_subfolders_numbered(tmp_path):
    for name in ["010_law", "002_math", "001_poetry"]:
        write_jsonl(tmp_path / name / "train.jsonl", [{"text": name}])
    write_jsonl(tmp_path / "002_math" / "valid.jsonl", [{"text": "v"}])
    doms = data.discover_domains(tmp_path)
    assert [(d.id, d.name) for d in doms] == [(1, "001_poetry"), (2, "002_math"), (10, "010_law")]
    assert doms[1].valid == tmp_path / "002_math" / "valid.jsonl" and doms[0].valid is None
    ds = data.load_domain(doms[1], TOK, 32)
    assert ds["train"][0][0].tolist() == [BOS, *b("002_math"), EOS] and len(ds["valid"]) == 1


def test_discover_named_files_sorted(tmp_path):
    for name in ["zeta", "alpha", "mid"]:
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": name}])
    assert [(d.id, d.name) for d in data.discover_domains(tmp_path)] == [(1, "alpha"), (2, "mid"), (3, "zeta")]


def test_discover_domain_field(tmp_path):
    recs = [{"text": f"{d}{i}", "domain": d} for i in range(3) for d in ["b", "a"]]
    recs.append({"text": "held", "domain": "a", "split": "valid"})
    p = write_jsonl(tmp_path / "all.jsonl", recs)
    doms = data.discover_domains(p)
    assert [(d.id, d.name) for d in doms] == [(1, "a"), (2, "b")]
    assert doms[0].n_records == {"train": 3, "valid": 1}
    ds = data.load_domain(doms[0], TOK, 64, pack=False)
    assert [TOK.decode(i) for i, *_ in ds["train"]] == ["a0", "a1", "a2"]
    assert [TOK.decode(i) for i, *_ in ds["valid"]] == ["held"]
    assert data.load_domain(doms[1], TOK, 64)["valid"] is None
    held = data.load_domain(doms[1], TOK, 64, pack=False, valid_fraction=0.34)
    assert held["train"].n_records == 2 and held["valid"].n_records == 1
    # the same records as a directory's train.jsonl/valid.jsonl
    write_jsonl(tmp_path / "dir" / "train.jsonl", recs[:-1])
    write_jsonl(tmp_path / "dir" / "valid.jsonl", [recs[-1]])
    doms = data.discover_domains(tmp_path / "dir")
    assert doms[0].n_records == {"train": 3, "valid": 1} and doms[1].n_records == {"train": 3, "valid": 0}


def test_discover_single_domain_dir(tmp_path):
    write_jsonl(tmp_path / "mydata" / "train.jsonl", [{"text": "x"}])
    doms = data.discover_domains(tmp_path / "mydata")
    assert [(d.id, d.name) for d in doms] == [(1, "mydata")]


def test_discover_errors(tmp_path):
    with pytest.raises(DataError, match="no domains found"):
        (tmp_path / "empty").mkdir()
        data.discover_domains(tmp_path / "empty")
    write_jsonl(tmp_path / "a" / "1_x" / "valid.jsonl", [{"text": "v"}])
    with pytest.raises(DataError, match="no train.jsonl"):
        data.discover_domains(tmp_path / "a")
    write_jsonl(tmp_path / "c" / "1_x.jsonl", [{"text": "v"}])
    write_jsonl(tmp_path / "c" / "01_y.jsonl", [{"text": "v"}])
    with pytest.raises(DataError, match="same number 1"):
        data.discover_domains(tmp_path / "c")
    write_jsonl(tmp_path / "d" / "0_x.jsonl", [{"text": "v"}])
    with pytest.raises(DataError, match="start at 1"):
        data.discover_domains(tmp_path / "d")
    p = write_jsonl(tmp_path / "e.jsonl", [{"text": "a", "domain": "x"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"e\.jsonl:2: missing or invalid 'domain'"):
        data.discover_domains(p)
    with pytest.raises(DataError, match="no such file"):
        data.discover_domains(tmp_path / "nope")
