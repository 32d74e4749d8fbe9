"""Contrastive adapters (``TrainConfig.contrast``, mozgach_mlx.contrast): the hinge's value
and gradient against autodiff of the written objective over an independent base, the
negatives' draw, exact resume, the fleet wiring, the effect on other domains' text, errors."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mozgach_mlx as mz
from mozgach_mlx import contrast, data, lora, memory, trainer
from mozgach_mlx.errors import ConfigError
from mozgach_mlx.fleet import base_identity, train_fleet
from mozgach_mlx.trainer import TrainConfig, train_adapter

WORDS = {"a": "lion tiger bear wolf", "b": "cod eel pike carp", "c": "owl hawk crow wren"}
GENRE = "the cat sat on the mat and"


def _texts(topic: str, n: int, seed: int) -> list[str]:
    """A shared genre (the same phrase in every domain) and a topic (its 4 words, shuffled)."""
    rng = np.random.default_rng(seed)
    words = WORDS[topic].split()
    return [" ".join(f"{GENRE} {w}." for w in rng.choice(words, 6)) for _ in range(n)]


def _seqs(tok, texts, L=64):
    out = []
    for t in texts:
        ids = np.array(tok.encode(t)[: L + 1], dtype=np.int32)
        out.append((ids, np.ones(len(ids), dtype=bool)))
    return out


def _cfg(**kw) -> TrainConfig:
    base = dict(learning_rate=3e-3, warmup_steps=1, max_steps=6, grad_accumulation=2, batch_size=2, max_seq_length=64,
                eval_every=0, save_every=2, grad_checkpoint=False, progress=False, attention_mask="causal",
                lora=lora.LoRAConfig(r=4, alpha=8, dropout=0.0))
    base.update(kw)
    return TrainConfig(**base)


def _row_sum(model, seq, cfg) -> mx.array:
    x, y, m = next(data.batches([seq], 1, shuffle=False))
    s, _ = trainer.default_loss(model, x, y, m, cfg, with_grad=False)
    return s


def test_hinge_and_gradient_equal_autodiff_of_the_objective_over_an_independent_base(tmp_path):
    cfg = _cfg(contrast=0.7, batch_size=6, max_steps=12, learning_rate=1e-2)
    model, tok = mz.load("tiny")
    base_model, _ = mz.load("tiny")  # no adapter at all: the base, computed apart from the swap
    rng = np.random.default_rng(4)
    noise = ["".join(rng.choice(list("QZXJ#@%&*?!^~|{}"), 64)) for _ in range(8)]
    own, others = _seqs(tok, _texts("a", 8, 0)), [_seqs(tok, _texts("b", 8, 1)), _seqs(tok, noise)]
    # an adapter trained on "a" and "b": below the base on b's rows, above it on the noise
    plain = {"train": own + others[0], "valid": None}
    train_adapter(model, tok, plain, _cfg(max_steps=12, learning_rate=1e-2), tmp_path / "plain", resume=False)
    neg = contrast.Negatives(model, others, cfg)
    trained = tree_flatten(model.trainable_parameters())
    lora.reset(model, seed=3)  # the fresh adapter, as train_adapter captures it
    neg.capture_base()
    model.load_weights(trained, strict=False)

    rows = neg.rows(step=5, micro=1)
    s0 = [_row_sum(base_model, r, cfg).item() for r in rows]
    sa = [_row_sum(model, r, cfg).item() for r in rows]
    below = [a < b for a, b in zip(sa, s0, strict=True)]
    assert any(below) and not all(below), (s0, sa)  # both branches of the hinge are exercised

    def objective():
        return sum(cfg.contrast * mx.maximum(0.0, b - _row_sum(model, r, cfg)) for r, b in zip(rows, s0, strict=True))

    want, want_grad = nn.value_and_grad(model, objective)()
    grad_fn = trainer._grad_fn(model, trainer.default_loss, cfg, memory.MemoryStrategy(), tmp_path / "off")
    hinge, grad, active = neg.penalty(grad_fn, trainer._eval_loss, lambda seg: {}, 5, 1)
    assert active == sum(below)
    assert hinge == pytest.approx(want.item(), rel=1e-5)
    got, ref = dict(tree_flatten(grad)), dict(tree_flatten(want_grad))
    assert got.keys() == ref.keys()
    for k in ref:
        r = np.array(ref[k])  # fp32 sums in another order: within 1e-4 of the tensor's scale
        np.testing.assert_allclose(np.array(got[k]), r, rtol=1e-4, atol=1e-4 * np.abs(r).max(), err_msg=k)
    # the swap left the trained adapter in place
    for k, v in tree_flatten(model.trainable_parameters()):
        np.testing.assert_array_equal(np.array(v), np.array(dict(trained)[k]))
    # the fresh adapter is at the base on every row: all are held there (subgradient 1 at
    # the kink), so the first step's shared direction is cancelled, not followed
    model.load_weights(neg.base_weights, strict=False)
    hinge, grad, active = neg.penalty(grad_fn, trainer._eval_loss, lambda seg: {}, 5, 1)
    assert active == len(rows) and abs(hinge) < 1e-3
    assert max(float(mx.abs(v).max()) for _, v in tree_flatten(grad)) > 0


def test_negatives_are_fixed_by_seed_step_and_micro_batch_and_draw_domains_evenly():
    pools = [[(np.array([i, 1]), np.ones(2, bool)) for i in range(1000)], [(np.array([7, 7]), np.ones(2, bool))]]
    neg = contrast.Negatives(None, pools, _cfg(contrast=1.0, batch_size=4, seed=3))
    again = contrast.Negatives(None, pools, _cfg(contrast=1.0, batch_size=4, seed=3))
    assert [r[0].tolist() for r in neg.rows(2, 1)] == [r[0].tolist() for r in again.rows(2, 1)]
    assert [r[0].tolist() for r in neg.rows(2, 1)] != [r[0].tolist() for r in neg.rows(2, 0)]
    drawn = [r[0].tolist() == [7, 7] for s in range(500) for r in neg.rows(s, 0)]
    # the one-sequence domain is drawn as often as the 1000-sequence one: 2000 draws, p = 1/2
    assert abs(np.mean(drawn) - 0.5) < 0.05


class _Stop(Exception):
    pass


def _train_a(out: Path, cfg: TrainConfig, stop_at: int | None = None):
    """Domain "a"'s contrastive adapter over tiny (b and c the negatives); ``stop_at``:
    raise :class:`_Stop` from the callback after that step (its checkpoint is written)."""
    model, tok = mz.load("tiny")
    d = {"train": _seqs(tok, _texts("a", 10, 0)), "valid": _seqs(tok, _texts("a", 2, 9))}
    negs = [_seqs(tok, _texts("b", 6, 1)), _seqs(tok, _texts("c", 6, 2))]

    def stop(rec):
        if rec["step"] == stop_at:
            raise _Stop

    return train_adapter(model, tok, d, cfg, out, callback=stop, negatives=negs)


def test_contrastive_run_resumes_exactly(tmp_path):
    full = _train_a(tmp_path / "full", _cfg(contrast=1.0))
    with pytest.raises(_Stop):
        _train_a(tmp_path / "cut", _cfg(contrast=1.0), stop_at=4)
    resumed = _train_a(tmp_path / "cut", _cfg(contrast=1.0))
    assert resumed.resumed_from == 4
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-6)
    a = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "cut" / "adapters.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-6, atol=1e-7)
    log = [json.loads(x) for x in (tmp_path / "full" / trainer.LOG_FILE).read_text().splitlines()]
    assert all("contrast" in r and r["contrast"] >= 0 for r in log)
    assert any(r["contrast"] > 0 for r in log)
    # the fresh adapter is the base on every row: step 1 holds them all
    assert log[0]["contrast_active"] == 1.0 and all(0 <= r["contrast_active"] <= 1 for r in log)


def _corpus(root: Path) -> list:
    for topic in WORDS:
        d = root / f"{topic}_topic"
        d.mkdir(parents=True)
        for split, n, seed in (("train", 24, 0), ("valid", 6, 100)):
            lines = [json.dumps({"text": t}) for t in _texts(topic, n, seed + ord(topic))]
            (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return data.discover_domains(root)


def _other_gain(tmp_path, name, w) -> tuple[float, float]:
    """Mean per-token loss change vs the base (adapter - base) on the own domain's and on
    the other domains' held-out texts, over a fleet trained with contrast ``w``."""
    doms = _corpus(tmp_path / f"data_{name}")
    model, tok = mz.load("tiny")
    cfg = _cfg(contrast=w, max_steps=16, grad_accumulation=1, batch_size=4, save_every=0, learning_rate=5e-3)
    res = train_fleet(model, tok, doms, cfg, tmp_path / name, base=base_identity(model, "tiny"))
    assert res.ok and len(res.done) == 3
    valid = {d.id: _seqs(tok, [json.loads(x)["text"] for x in d.valid.read_text().splitlines()]) for d in doms}
    lora.remove(model)
    base = {i: np.mean([_row_sum(model, s, cfg).item() / (len(s[0]) - 1) for s in v]) for i, v in valid.items()}
    own, other = [], []
    for d in doms:
        lora.load(model, tmp_path / name / f"mozgach108_{d.id:03d}")
        for i, v in valid.items():
            loss = np.mean([_row_sum(model, s, cfg).item() / (len(s[0]) - 1) for s in v])
            (own if i == d.id else other).append(loss - base[i])
        lora.remove(model)
    log = [json.loads(x) for x in (tmp_path / name / "logs" / "mozgach108_001.jsonl").read_text().splitlines()]
    assert ("contrast" in log[-1]) == (w > 0)
    return float(np.mean(own)), float(np.mean(other))


def test_fleet_with_contrast_keeps_less_of_the_shared_genre_and_widens_the_own_margin(tmp_path):
    """Three domains that share a genre phrase and differ by 4 topic words. Without contrast
    each adapter gains almost as much on the other domains' held-out text as on its own
    (over the random tiny model most of the gain is the shared byte statistics); with it the
    gain elsewhere falls by more than half and the own-vs-other margin -- what the loss
    router reads -- widens."""
    own0, other0 = _other_gain(tmp_path, "plain", 0.0)
    own1, other1 = _other_gain(tmp_path, "contrast", 1.0)
    assert own0 < 0 and other0 < 0.8 * own0, (own0, other0)  # plain: most of the gain is shared
    assert own1 < 0, own1  # contrast: the own domain still gains
    assert other1 > 0.5 * other0, (other0, other1)
    assert other1 - own1 > 1.3 * (other0 - own0), (own0, other0, own1, other1)


def test_a_fleet_part_contrasts_against_every_domain_and_loads_only_those_drawn(tmp_path, monkeypatch):
    doms = _corpus(tmp_path / "data")
    model, tok = mz.load("tiny")
    cfg = _cfg(contrast=1.0, max_steps=2, save_every=0)
    alone = train_fleet(model, tok, doms[:1], cfg, tmp_path / "alone", base=base_identity(model, "tiny"))
    assert alone.failed == ["mozgach108_001"]  # no other domain in the fleet: its one-line reason is recorded
    assert "other domains' training text" in alone.manifest["adapters"]["mozgach108_001"]["error"]
    loaded = []
    real = mz.data.load_domain
    monkeypatch.setattr(mz.data, "load_domain", lambda dom, *a, **k: loaded.append(dom.name) or real(dom, *a, **k))
    part = train_fleet(model, tok, doms[:2], cfg, tmp_path / "part", base=base_identity(model, "tiny"),
                       negative_domains=doms)
    assert part.ok and part.done == ["mozgach108_001", "mozgach108_002"]
    # each domain tokenized once, for its own adapter and as negatives
    assert len(loaded) == len(set(loaded)) and {d.name for d in doms[:2]} <= set(loaded)
    # lazy pools: a domain is loaded when first drawn, once; an empty one is drawn again
    loads = []

    def pool(i):
        loads.append(i)
        return [] if i == 0 else [(np.array([i, i, i]), np.ones(3, bool))]

    neg = contrast.Negatives(None, [lambda i=i: pool(i) for i in range(3)], _cfg(contrast=1.0, batch_size=8))
    drawn = {int(r[0][0]) for r in neg.rows(0, 0)}
    assert drawn == {1, 2} and sorted(loads) == [0, 1, 2]
    neg.rows(1, 0)
    assert sorted(loads) == [0, 1, 2]
    empty = contrast.Negatives(None, [list, list], _cfg(contrast=1.0))
    with pytest.raises(ConfigError, match="other domains' training text"):
        empty.rows(0, 0)


def test_contrast_errors_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="TrainConfig.contrast"):
        TrainConfig(contrast=-0.5)
    with pytest.raises(ConfigError, match="TrainConfig.contrast"):
        TrainConfig(contrast=1.0, context_parallel=True)
    model, tok = mz.load("tiny")
    d = {"train": _seqs(tok, _texts("a", 4, 0)), "valid": None}
    with pytest.raises(ConfigError, match="other domains' training text"):
        train_adapter(model, tok, d, _cfg(contrast=1.0), tmp_path / "x")
    # runs recorded before the field existed resume: the default config's fingerprint as
    # the commit before contrast (7ab8d21) computed it
    assert TrainConfig().fingerprint() == "9ec434dc2a9d8092"
    assert TrainConfig(contrast=0.5).fingerprint() != "9ec434dc2a9d8092"


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_constant_lr_runs_checkpoint_at_k_steps_is_the_k_step_run(tmp_path, schedule):
    """What benchmarks/bench_wiki11.py's snapshots rely on: with a constant learning rate
    after warmup, a contrastive run's checkpoint at step k is exactly the adapter of a run
    of k steps (data order and negatives depend on seed and step, not on max_steps); with
    cosine decay it is not (the lr depends on max_steps), which shows the check can fail."""
    with pytest.raises(_Stop):
        _train_a(tmp_path / "long", _cfg(contrast=1.0, lr_schedule=schedule, max_steps=8), stop_at=4)
    _train_a(tmp_path / "short", _cfg(contrast=1.0, lr_schedule=schedule, max_steps=4))
    kept = mx.load(str(tmp_path / "long" / "checkpoint" / "adapter-0000004.safetensors"))
    short = mx.load(str(tmp_path / "short" / "adapters.safetensors"))
    assert kept.keys() == short.keys()
    same = all(np.array_equal(np.array(kept[k]), np.array(short[k])) for k in short)
    assert same == (schedule == "constant")
