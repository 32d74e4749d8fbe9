"""The shipped pretrained base ``tiny-stdlib`` and the shipped stdlib12 corpus
(mozgach_mlx/models/builtin, mozgach_mlx/corpora; built by benchmarks/)."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mozgach_mlx as mz
from mozgach_mlx import loss, quant
from mozgach_mlx.models.checkpoint import BUILTIN_DIR

CORPUS = Path(mz.__file__).parent / "corpora" / "stdlib12"


def heldout_texts(n=6):
    out = []
    for d in sorted(CORPUS.iterdir()):
        lines = (d / "test.jsonl").read_text().splitlines()[:1]
        out += [json.loads(x)["text"] for x in lines]
    return out[:n]


def mean_loss(model, tok, texts):
    s_all, n_all = 0.0, 0.0
    for t in texts:
        ids = mx.array([tok.encode(t) + [tok.eos_token_id]])
        s, n = loss.sequence_loss(model, ids[:, :-1], ids[:, 1:], mx.ones(ids[:, 1:].shape), with_grad=False)
        s_all, n_all = s_all + s.item(), n_all + n.item()
    return s_all / n_all


def test_the_corpus_has_twelve_domains_with_disjoint_splits():
    domains = sorted(p.name for p in CORPUS.iterdir())
    assert len(domains) == 12
    for d in domains:
        splits = {s: [json.loads(x)["text"] for x in (CORPUS / d / f"{s}.jsonl").read_text().splitlines()]
                  for s in ("train", "valid", "test")}
        assert len(splits["train"]) >= 60 and splits["valid"] and splits["test"]
        assert not set(splits["train"]) & (set(splits["valid"]) | set(splits["test"]))


@pytest.mark.skipif(not (BUILTIN_DIR / "tiny-stdlib" / "config.json").exists(), reason="base not built")
def test_tiny_stdlib_loads_4bit_round_trips_text_and_beats_the_random_tiny():
    model, tok = mz.load("tiny-stdlib")
    assert quant.quantization_config(model)["bits"] == 4
    text = "def f(x):\n    return {'a': x}  # ünïcode\n"
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    code = "import os\n\n\ndef main(path):\n    return os.path.join(path, 'name')\n"
    assert len(tok.encode(code, add_bos=False)) < len(code) / 2.5  # a real subword vocabulary
    texts = heldout_texts()
    pre = mean_loss(model, tok, texts)
    rand_model, rand_tok = mz.load("tiny")
    rand = mean_loss(rand_model, rand_tok, texts)
    assert np.isfinite(pre)
    # nats per token differ in unit (BPE vs bytes): compare nats per character
    chars = sum(len(t) + 1 for t in texts)
    pre_c = pre * sum(len(tok.encode(t)) for t in texts) / chars
    rand_c = rand * sum(len(rand_tok.encode(t)) for t in texts) / chars
    assert pre_c < 0.5 * rand_c
    with pytest.raises(mz.ConfigError, match="already quantized"):
        mz.load("tiny-stdlib", quantize=8)


def test_data_by_name_resolves_the_shipped_corpus_unless_a_path_exists(tmp_path, monkeypatch):
    from mozgach_mlx import data
    from mozgach_mlx.rundir import RunConfig, data_dir

    monkeypatch.chdir(tmp_path)
    run = RunConfig(data="stdlib12", out=str(tmp_path / "out"))
    assert data_dir(run) == CORPUS
    assert len(data.discover_domains(data_dir(run))) == 12
    (tmp_path / "stdlib12").mkdir()  # a local folder of that name is the user's data
    assert data_dir(run) == Path("stdlib12")
    assert data_dir(RunConfig(data="nope", out=str(tmp_path / "out"))) == Path("nope")
    # the default base defaults to stdlib12; "synthetic" names the generated corpus for any base
    assert RunConfig().data == "stdlib12" and RunConfig(model="tiny").data is None
    syn = RunConfig(data="synthetic", n_domains=2, out=str(tmp_path / "out2"))
    assert data_dir(syn) == tmp_path / "out2" / "builtin_data"
    assert [d.name for d in data.discover_domains(data_dir(syn))] == \
        [d.name for d in data.discover_domains(data_dir(RunConfig(model="tiny", n_domains=2,
                                                                  out=str(tmp_path / "out3"))))]
    (tmp_path / "synthetic").mkdir()  # again, a local folder of that name wins
    assert data_dir(syn) == Path("synthetic")


def test_builtin_base_refuses_another_quantization():
    from mozgach_mlx.errors import ConfigError
    from mozgach_mlx.rundir import RunConfig, load_base

    with pytest.raises(ConfigError, match="--quantize none: tiny-stdlib is already quantized"):
        load_base(RunConfig(model="tiny-stdlib", quantize="none"))
    with pytest.raises(ConfigError, match=r"already quantized \(4-bit, group 64\)"):
        load_base(RunConfig(model="tiny-stdlib", group_size=32))
    with pytest.raises(ConfigError, match="already quantized"):
        load_base(RunConfig(model="tiny-stdlib", quantize="8"))
    model, _ = load_base(RunConfig(model="tiny-stdlib"))
    assert quant.quantization_config(model)["bits"] == 4
