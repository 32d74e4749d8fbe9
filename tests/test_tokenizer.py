"""Tokenizers: the built-in byte tokenizer, fast ``tokenizer.json`` and sentencepiece
``tokenizer.model`` tokenizers built offline here, chat templates, save/load."""

import json

import pytest

from mozgach_mlx.errors import TokenizerError
from mozgach_mlx.tokenizer import ByteTokenizer, load_tokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world", "mozgach trains many adapters",
          "long context needs scaled rope", "привет мир"] * 40
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def fast_dir(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    # BOS in front of every text, as Llama's tokenizer.json says with its post-processor
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d = tmp_path / "fast"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": TEMPLATE}))
    return d


@pytest.fixture
def sp_dir(tmp_path):
    import sentencepiece as spm

    d = tmp_path / "sp"
    d.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(d / "tokenizer"),
                                   vocab_size=320, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   character_coverage=1.0, byte_fallback=True, minloglevel=2)
    (d / "tokenizer.vocab").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True}))  # as Llama's own config says; transformers 5 adds no BOS without it
    return d


def test_byte_tokenizer_round_trip(tmp_path):
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len("héllo".encode())
    assert tok.decode(ids) == "héllo"
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_fast_tokenizer_json(fast_dir, tmp_path):
    tok = load_tokenizer(fast_dir)
    text = "the lazy fox says hello world"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=False) == ids[1:]
    assert tok.add_bos_token and tok.vocab_size == 300
    assert tok.has_chat_template
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat == "<|user|>hi</s><|assistant|>"
    tok.save(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    assert again.encode(text) == ids and again.has_chat_template


def test_bos_only_where_the_model_adds_it(fast_dir):
    """A tokenizer whose transformers encode adds no BOS (SmolLM2, Qwen2) gets none from
    encode(add_bos=True) either, though it has a BOS token."""
    spec = json.loads((fast_dir / "tokenizer.json").read_text())
    (fast_dir / "tokenizer.json").write_text(json.dumps({**spec, "post_processor": None}))
    tok = load_tokenizer(fast_dir)
    assert tok.bos_token_id == 1 and not tok.add_bos_token
    assert tok.encode("hello world") == tok.encode("hello world", add_bos=False)
    assert ByteTokenizer().add_bos_token  # the byte tokenizer keeps its BOS


def test_sentencepiece_tokenizer_model(sp_dir, tmp_path):
    import sentencepiece as spm

    tok = load_tokenizer(sp_dir)
    text = "hello world, the quick fox! привет"  # ",!" unseen in training: byte fallback (as Llama's)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert tok.encode(text) == [sp.bos_id(), *sp.encode(text)]  # the reference: sentencepiece itself
    assert tok.decode(tok.encode(text)) == text
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.vocab_size == 320
    assert not tok.has_chat_template
    with pytest.raises(TokenizerError, match="no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").encode(text) == tok.encode(text)


def test_missing_and_broken_tokenizers(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load tokenizer") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
