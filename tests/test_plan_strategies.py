"""The planner's memory strategies, presets, device profiles and pre-flight refusal.

Independent references: the presets' parameter counts are the published model sizes;
the strategy terms follow the formulas of plan.py's docstring; the trainer's end-to-end
losses with a strategy equal the default step's (memory.py is exact)."""

import json
import math
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import measured_peak

import mozgach_mlx as mz
from mozgach_mlx import devices, lora
from mozgach_mlx import plan as plan_fn
from mozgach_mlx.cli import main
from mozgach_mlx.errors import ConfigError
from mozgach_mlx.memory import MemoryStrategy
from mozgach_mlx.models import presets
from mozgach_mlx.trainer import TrainConfig, train_adapter

PLAN = plan_fn.__globals__  # the plan module (mozgach_mlx.plan is the function)
GiB = 2**30

# Published sizes (model cards / Hugging Face "model size"), in billions of parameters.
PUBLISHED_B = {"llama-3.1-8b": 8.03, "llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21, "mistral-7b": 7.24,
               "qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-7b": 7.62}


def _n_params(cfg: dict) -> int:
    d, inter, n, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    bias = (q + 2 * kv) if cfg["model_type"] == "qwen2" else 0
    block = d * q + 2 * d * kv + q * d + 3 * d * inter + 2 * d + bias
    return n * block + V * d * (1 if cfg["tie_word_embeddings"] else 2) + d


@pytest.mark.parametrize("name", list(PUBLISHED_B))
def test_presets_have_the_published_sizes_and_build(name):
    cfg = presets.preset(name)
    assert _n_params(cfg) / 1e9 == pytest.approx(PUBLISHED_B[name], abs=0.011)
    args = mz.ModelArgs.from_dict(cfg)
    assert args.model_type == cfg["model_type"]
    p = mz.plan(name, 4096, backend="metal", strategy="none")  # usable by id
    assert p.total_bytes > 0
    with pytest.raises(ConfigError, match="unknown model preset"):
        presets.preset("llama-9")


def test_strategy_terms_follow_the_formulas():
    L, d, n, act = 100_000, 4096, 32, 2
    base = mz.plan("llama-3.1-8b", L, backend="metal", strategy="none")
    off = mz.plan("llama-3.1-8b", L, backend="metal", strategy={"offload": True})
    every = mz.plan("llama-3.1-8b", L, backend="metal", strategy={"checkpoint_every": 4})
    tile = mz.plan("llama-3.1-8b", L, backend="metal", strategy={"tile_chunk": 2048})
    assert base.components["checkpoints"] == n * L * d * act
    assert off.components["checkpoints"] == 0
    assert every.components["checkpoints"] == (8 + 3) * L * d * act
    qkv = 4096 + 2 * 1024
    lse = 2 * 32 * L * 4 + 2 * L * 2048 * 4  # + the fp32 K/V copies and dK/dV (bf16 compute)
    assert tile.components["block"] == int((PLAN["TILE_D_WIDTHS"] * d + PLAN["TILE_ATTN_WIDTHS"] * qkv) * L * act
                                           + lse)
    phase_b = (3 * d + qkv + d) * L * act + (PLAN["BLOCK_WIDTHS"] * d + PLAN["TILE_MLP_WIDTHS"] * 14336) * 2048 * act
    assert tile.components["mlp"] == int(max(0, phase_b - tile.components["block"]))
    # time: tiling adds 4 D flops per computed pair and 2x the q/k/v weights per token
    pairs = mz.attention.computed_pairs(L, heads=32)
    extra = tile.flops_per_step - base.flops_per_step
    assert extra == pytest.approx(4.0 * n * 128 * pairs + 4.0 * n * d * qkv * L, rel=1e-9)
    assert off.io_seconds == pytest.approx(2 * n * L * d * act / (PLAN["DEFAULT_DISK_GBS"] * 1e9))
    assert off.seconds_per_step == pytest.approx(base.seconds_per_step + off.io_seconds)


def test_auto_picks_the_fastest_strategy_that_fits():
    kw = dict(backend="metal")
    default = mz.plan("llama-3.1-8b", 8192, memory_gb=48, **kw)
    assert default.strategy == {} and default.fits  # the default step fits: nothing traded
    p = mz.plan("llama-3.1-8b", 100_000, memory_gb=30, **kw)
    assert p.fits and p.strategy
    for st in PLAN["auto_candidates"](100_000):
        q = mz.plan("llama-3.1-8b", 100_000, strategy=st, **kw)
        if q.total_bytes <= 30 * GiB:
            assert p.seconds_per_step <= q.seconds_per_step + 1e-9
    assert mz.plan("llama-3.1-8b", 100_000, **kw).strategy == {}  # no budget: the default step


def test_the_headline_fits_a_48_gb_m4_and_solve_context():
    p = mz.plan("llama-3.1-8b", 100_000, device="m4", memory_gb=48)
    assert p.budget_bytes == int(36 * GiB)  # Metal's default: 75% of 48 GB
    assert p.fits and p.headroom_bytes >= 4 * GiB
    assert "h/step" in p.table() or "days/step" in p.table()
    assert any("iogpu.wired_limit_mb" in n for n in p.notes)
    s = PLAN["solve_context"]("llama-3.1-8b", device="m4", memory_gb=48)
    assert s.fits and s.context >= 256_000
    over = mz.plan("llama-3.1-8b", s.context + 4096, device="m4", memory_gb=48)
    assert not over.fits  # the solved context is the longest (to the granularity) for every candidate


def test_devices():
    assert devices.metal_limit_gb(48) == 36 and devices.metal_limit_gb(24) == pytest.approx(16)
    m4 = devices.device("m4", 48)
    assert m4.budget_gb == 36 and m4.gflops == pytest.approx(4.26e3 * devices.SUSTAINED)
    assert devices.device("h100").budget_gb == 80
    this = devices.device("this")
    assert this.peak_tflops > 0 and this.sustained == 1.0 and this.memory_gb > 1
    with pytest.raises(ConfigError, match="unknown device"):
        devices.device("m9")


def test_cli_plan_answers_does_not_fit_with_suggestions_and_exit_0():
    r = CliRunner().invoke(main, ["plan", "--model", "llama-3.1-8b", "--context", "100000", "--memory-gb", "8"])
    assert r.exit_code == 0, r.output
    assert "does NOT fit" in r.output and "suggestion:" in r.output
    r = CliRunner().invoke(main, ["plan", "--model", "llama-3.1-8b", "--context", "100000", "--device", "m4",
                                  "--memory-gb", "48", "--tile-chunk", "2048", "--offload"])
    assert r.exit_code == 0 and "tiled recompute (chunk 2,048), checkpoint offload" in r.output, r.output
    r = CliRunner().invoke(main, ["plan", "--model", "llama-3.1-8b", "--device", "m4", "--memory-gb", "48",
                                  "--solve-context"])
    assert r.exit_code == 0 and "fits" in r.output, r.output


def test_cli_train_over_budget_refuses_before_loading_data(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--out", str(out), "--memory-gb", "0.05", "--max-seq-length", "4096",
                                  "--quiet"])
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and "memory:" in line and "longest context" in line, line
    assert not out.exists()  # nothing written: no corpus, no manifest


def _task(tok, n=8, L=64):
    words = ["lion", "tiger", "bear", "wolf"]
    out = []
    for i in range(n):
        ids = np.array(tok.encode(" ".join(words[(i + j) % 4] for j in range(L // 4)))[: L + 1], np.int32)
        out.append((ids, np.ones(len(ids), bool)))
    return {"train": out, "valid": out[:2]}


def _train(tmp_path, name, *, dropout=0.0, grad_accumulation=2, **kw):
    """Three steps of a small adapter over the random tiny base, with ``kw`` in its TrainConfig."""
    model, tok = mz.load("tiny")
    cfg = TrainConfig(learning_rate=3e-3, warmup_steps=1, max_steps=3, grad_accumulation=grad_accumulation,
                      batch_size=2, max_seq_length=64, eval_every=0, save_every=0, progress=False,
                      lora=lora.LoRAConfig(r=4, alpha=8, dropout=dropout), **kw)
    return train_adapter(model, tok, _task(tok), cfg, tmp_path / name)


def test_trainer_runs_a_strategy_exactly_and_records_it(tmp_path):
    def run(name, **kw):
        return _train(tmp_path, name, dropout=0.1, **kw)

    ref = run("ref", memory_strategy="none")
    got = run("tiled", memory_strategy="tile+offload", tile_chunk=24)
    assert ref.memory_strategy == MemoryStrategy().to_dict()
    assert got.memory_strategy == MemoryStrategy(tile_chunk=24, offload=True).to_dict()
    # dropout 0.1: both steps differentiate their own forward's masks; they draw them differently,
    # so compare the first step's loss (the fresh adapter's B = 0 makes it mask-independent)
    assert got.losses[0] == pytest.approx(ref.losses[0], rel=1e-6)
    assert all(math.isfinite(v) for v in got.losses) and got.losses[-1] < got.losses[0]
    assert not (tmp_path / "tiled" / ".offload").exists()
    rec = json.loads((tmp_path / "tiled" / "result.json").read_text())
    assert rec["memory_strategy"]["offload"] is True


def test_trainer_with_dropout_off_matches_the_default_step_exactly(tmp_path):
    def run(name, **kw):
        return _train(tmp_path, name, grad_accumulation=1, **kw)

    ref, got = run("ref", memory_strategy="none"), run("t", memory_strategy="tile", tile_chunk=20)
    np.testing.assert_allclose(got.losses, ref.losses, rtol=1e-5)


def test_fleet_manifest_records_the_strategy_and_refuses_over_budget(tmp_path):
    from mozgach_mlx import data, synthetic
    from mozgach_mlx.fleet import train_fleet

    synthetic.write_corpus(tmp_path / "data", n_domains=1, n_train=4, n_valid=2)
    doms = data.discover_domains(tmp_path / "data")
    model, tok = mz.load("tiny")
    cfg = TrainConfig(max_steps=1, grad_accumulation=1, batch_size=1, max_seq_length=64, eval_every=0,
                      save_every=0, progress=False, memory_strategy="offload", lora=lora.LoRAConfig(r=4, dropout=0.0))
    res = train_fleet(model, tok, doms, cfg, tmp_path / "out")
    assert res.ok
    rec = next(iter(res.manifest["adapters"].values()))
    assert rec["memory_strategy"] == MemoryStrategy(offload=True).to_dict()
    with pytest.raises(ConfigError, match="memory:.*budget"):
        train_fleet(model, tok, doms, TrainConfig(memory_gb=0.001, max_seq_length=4096, progress=False),
                    tmp_path / "out2")


def _bench_memory():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recorded_calibration_is_within_10_percent():
    """benchmarks/calibration.jsonl holds peaks measured on this CPU (bench_memory.py run);
    the current planner must stay within +-10% of every one of them (>= 8 configs)."""
    b = _bench_memory()
    rows = {}
    for line in b.OUT.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r["name"]] = r  # the last measurement of a name counts
    assert len(rows) >= 8, sorted(rows)
    ratios = {name: b.estimate(r) / r["peak_bytes"] for name, r in rows.items()}
    assert all(0.9 <= v <= 1.1 for v in ratios.values()), ratios
    strategies = {json.dumps(r["strategy"], sort_keys=True) for r in rows.values()}
    assert len(strategies) >= 4 and {r["bits"] for r in rows.values()} == {4, 8}


@pytest.mark.slow
def test_planner_within_10_percent_of_fresh_measurements(tmp_path):
    """Re-measure three small configurations (one per kind of step) in fresh processes."""
    b = _bench_memory()
    b.CONFIGS.update({"t-4k": ("tiny", 4096, 4, {}), "t-8k-tile": ("tiny", 8192, 4, {"tile_chunk": 1024}),
                      "d512-2k-tile-off": ("d512", 2048, 8, {"tile_chunk": 512, "offload": True})})
    out = tmp_path / "cal.jsonl"
    b.run(["t-4k", "t-8k-tile", "d512-2k-tile-off"], out)
    for line in out.read_text().splitlines():
        r = json.loads(line)
        assert 0.9 <= b.estimate(r) / r["peak_bytes"] <= 1.1, r


# ------------------------------------------------------------ the plain step and auto


def _plain_peak(model, L: int, B: int = 4) -> int:
    """Measured peak of the trainer's plain step (compiled, as train_adapter runs it)."""
    import mlx.core as mx
    import mlx.nn as nn

    from mozgach_mlx import trainer

    model.grad_checkpoint, model.mlp_chunk = False, None
    cfg = TrainConfig(batch_size=B, max_seq_length=L)
    vg = trainer.compiled(model, nn.value_and_grad(model, lambda a, b, c: trainer.default_loss(model, a, b, c, cfg)))
    x = mx.random.randint(0, model.args.vocab_size, (B, L), key=mx.random.key(0))
    m = mx.ones((B, L))
    return measured_peak(lambda: vg(x, x, m), warm_up=True)


def test_plain_step_estimate_errs_high_and_tracks_its_growth():
    model, _ = mz.load("tiny-stdlib", quantize=4)
    lora.apply(model, lora.LoRAConfig(r=16, dropout=0.0, targets=("all-linear",)))
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    est, got = [], []
    for L in (256, 1024):
        est.append(mz.plan(model, L, batch_size=4, strategy="plain", lora_targets=targets, backend="cpu").total_bytes)
        got.append(_plain_peak(model, L))
    for e, p in zip(est, got, strict=True):
        assert 1.0 <= e / p < 1.7, (e, p)  # auto must not pick a step that does not fit: the estimate errs high
    assert 0.8 < (est[1] - est[0]) / (got[1] - got[0]) < 1.8
    # the plain step keeps more than the checkpointed one and skips its recomputed forward
    dflt = mz.plan(model, 1024, batch_size=4, strategy="none", lora_targets=targets, backend="cpu")
    plain = mz.plan(model, 1024, batch_size=4, strategy="plain", lora_targets=targets, backend="cpu")
    assert plain.total_bytes > dflt.total_bytes and plain.flops_per_step < dflt.flops_per_step
    assert plain.strategy == {"plain": True} and "plain step" in MemoryStrategy(plain=True).describe()


def test_auto_runs_the_plain_step_when_it_fits_else_the_cheapest_that_does(monkeypatch):
    kw = dict(batch_size=4, backend="cpu")
    plain = mz.plan("tiny-stdlib", 2048, strategy="plain", **kw).total_bytes
    dflt = mz.plan("tiny-stdlib", 2048, strategy="none", **kw).total_bytes
    assert dflt < plain
    assert mz.plan("tiny-stdlib", 2048, memory_gb=2 * plain / GiB, **kw).strategy == {"plain": True}
    between = (plain + dflt) / 2 / GiB
    assert mz.plan("tiny-stdlib", 2048, memory_gb=between, **kw).strategy == {}  # checkpointing fits, plain not
    assert mz.plan("tiny-stdlib", 2048, memory_gb=4 * plain / GiB, plain=False, **kw).strategy == {}
    # no budget: the plain step if it fits half of this machine's memory, else the default step as before
    module = sys.modules["mozgach_mlx.plan"]
    monkeypatch.setattr(module, "machine_memory_bytes", lambda: 4 * plain)
    assert mz.plan("tiny-stdlib", 2048, **kw).strategy == {"plain": True}
    monkeypatch.setattr(module, "machine_memory_bytes", lambda: plain)
    assert mz.plan("tiny-stdlib", 2048, **kw).strategy == {}
    with pytest.raises(ConfigError, match="plain keeps every activation"):
        MemoryStrategy(plain=True, offload=True)


def test_trainer_default_is_auto_plain_records_it_and_equals_the_checkpointed_step(tmp_path):
    def run(name, **kw):
        return _train(tmp_path, name, **kw)

    auto, ckpt = run("auto"), run("ckpt", grad_checkpoint=True)
    assert auto.memory_strategy == MemoryStrategy(plain=True).to_dict()  # TrainConfig's defaults: auto -> plain
    assert ckpt.memory_strategy == MemoryStrategy().to_dict()  # checkpointing asked for by hand: never plain
    np.testing.assert_allclose(auto.losses, ckpt.losses, rtol=1e-5)
    assert json.loads((tmp_path / "auto" / "result.json").read_text())["memory_strategy"]["plain"] is True
    assert TrainConfig().fingerprint() == TrainConfig(grad_checkpoint=True).fingerprint()  # old runs resume
