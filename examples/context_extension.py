"""Context extension, reproduced small: pretrain short, stretch RoPE, fine-tune long.

A reduced reproduction of the qualitative results of Position Interpolation (PI, arXiv
2306.15595), YaRN (2309.00071) and LongLoRA (2309.12307) on a model this machine trains
in minutes:

  (a) pretrain a small Llama (byte tokenizer) at a short window on passkey prompts, loss
      on the key (plus a small weight on the rest), until in-window passkey retrieval is
      reliable;
  (b) at ``factor`` x that window, without fine-tuning: no scaling (extrapolation),
      linear PI, dynamic NTK, YaRN;
  (c) LoRA fine-tune briefly at the long length: PI; YaRN; PI + S²-Attn + trainable
      embeddings/norms (LongLoRA); PI + S²-Attn without them.

Every variant prints its passkey grid (exact % / per-digit %) and its perplexity by
position on long filler documents. ``--fast`` is the reduced run the slow test uses.

    MOZGACH_BLAS_THREADS=1 python examples/context_extension.py [--fast] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import mozgach_mlx as mz
from mozgach_mlx import evals
from mozgach_mlx.io import atomic_save_safetensors, atomic_write_json
from mozgach_mlx.models.llama import Model, ModelArgs
from mozgach_mlx.tokenizer import ByteTokenizer

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


@dataclass
class Setup:
    window: int = 128
    factor: int = 8
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    digits: int = 5
    pre_steps: int = 6000  # upper bound; stops early at pre_target
    pre_batch: int = 16
    pre_lr: float = 2e-3
    pre_target: float = 0.95
    pre_minutes: float = 13.0  # time cap on pretraining (train + checks)
    ft_steps: int = 300
    ft_batch: int = 1
    ft_lr: float = 2e-3
    rank: int = 8
    other_weight: float = 0.3  # loss weight of non-key tokens relative to the key
    trials: int = 8
    ppl_docs: int = 2
    seed: int = 0
    tokenizer: str = "byte"  # "byte" or "word" (see WordTokenizer)

    @property
    def long(self) -> int:
        return self.window * self.factor


class WordTokenizer:
    """One id per word, digit and punctuation mark of the passkey texts, plus BOS.

    The granularity of a real subword tokenizer: the passkey prompt's fixed text (key line
    and question) takes 33 tokens here against 99 bytes, so inside a 128-token window the
    key's distance from the question varies over ~95 filler tokens instead of ~25 bytes."""

    PATTERN = re.compile(r"\d|[A-Za-z]+|[^\sA-Za-z\d]")

    def __init__(self) -> None:
        text = evals.FILLER + evals.passkey.KEY_LINE.format(key="0") + evals.passkey.QUESTION
        self.words = sorted(set(self.PATTERN.findall(text)) | set("0123456789"))
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.bos_token_id = len(self.words)
        self.vocab_size = len(self.words) + 1

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        try:
            ids = [self.ids[w] for w in self.PATTERN.findall(text)]
        except KeyError as e:
            raise ValueError(f"WordTokenizer: {e.args[0]!r} is not in the passkey vocabulary") from None
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        return " ".join(self.words[int(i)] for i in ids if int(i) < len(self.words))


def make_tokenizer(s: Setup):
    if s.tokenizer not in ("byte", "word"):
        raise SystemExit(f"--set tokenizer={s.tokenizer!r}: expected 'byte' or 'word'")
    return ByteTokenizer() if s.tokenizer == "byte" else WordTokenizer()


def small_model(s: Setup, seed: int, vocab_size: int) -> Model:
    """A fresh small Llama over a ``vocab_size`` tokenizer (tied embeddings)."""
    cfg = {"model_type": "llama", "hidden_size": s.hidden, "num_hidden_layers": s.layers,
           "intermediate_size": 3 * s.hidden, "num_attention_heads": s.heads,
           "vocab_size": vocab_size, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "max_position_embeddings": s.window, "tie_word_embeddings": True}
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(cfg, source="context_extension"))
    mx.eval(model.parameters())
    return model


def passkey_batch(tok, rng: np.random.Generator, s: Setup, length: int, batch: int) -> tuple[mx.array, ...]:
    """(inputs (B, L-1), targets (B, L-1), weights (B, L-1)) of passkey prompts + key of
    total length ``length``: weight 1 on the key tokens, ``other_weight`` elsewhere."""
    unit = len(tok.encode(evals.FILLER, add_bos=False))
    rows, wts = [], []
    for _ in range(batch):
        p = evals.make_prompt(tok, length - s.digits, float(rng.uniform()), evals.passkey.random_key(rng, s.digits),
                              filler_offset=int(rng.integers(0, unit)))
        rows.append(p.tokens + p.answer)
        w = np.full(length - 1, s.other_weight, np.float32)
        w[len(p.tokens) - 1:] = 1.0
        wts.append(w)
    a = np.array(rows, np.int32)
    return mx.array(a[:, :-1]), mx.array(a[:, 1:]), mx.array(np.stack(wts))


def min_length(tok, s: Setup) -> int:
    """The shortest training prompt: key line, question, key and 16 filler tokens."""
    fixed = evals.passkey.KEY_LINE.format(key="1" * s.digits) + evals.passkey.QUESTION
    return 1 + len(tok.encode(fixed, add_bos=False)) + s.digits + 16


def weighted_loss(model: Model, x: mx.array, y: mx.array, w: mx.array) -> mx.array:
    """Mean CE over the key tokens + ``other_weight`` x mean CE over the rest (``w`` is 1
    on the key, ``other_weight`` elsewhere). Normalising the two parts separately keeps
    the key's share of the loss independent of the sequence length: with one token-
    weighted mean, 5 key tokens in a 1024-token prompt carry ~2% of it, and a first run
    fine-tuned the filler to ppl 1.0 while passkey fell to chance."""
    logits = model(x).astype(mx.float32)  # (B, L, V)
    ce = nn.losses.cross_entropy(logits, y, reduction="none")  # (B, L)
    key = (w == 1.0).astype(mx.float32)
    rest = 1.0 - key
    ow = (w * rest).sum() / mx.maximum(rest.sum(), 1.0)
    return (ce * key).sum() / key.sum() + ow * (ce * rest).sum() / mx.maximum(rest.sum(), 1.0)


def train_loop(model: Model, tok, s: Setup, *, steps: int, lr: float, batch: int, lengths: tuple[int, int],
               seed: int, check=None, check_every: int = 250, minutes: float | None = None,
               log=print) -> dict:
    """AdamW (warmup 5%, then constant) on passkey batches of random length in
    ``lengths``; ``check()`` -> accuracy every ``check_every`` steps stops at
    ``s.pre_target``. Returns steps run, seconds, and the accuracy history."""
    rng = np.random.default_rng(seed)
    warm = max(1, steps // 20)
    opt = optim.AdamW(learning_rate=optim.join_schedules(
        [optim.linear_schedule(lr / warm, lr, warm), lambda _: lr], [warm]), weight_decay=0.0)
    loss_and_grad = nn.value_and_grad(model, weighted_loss)
    model.train()
    hist, t0, seconds, losses = [], time.perf_counter(), 0.0, []
    for step in range(1, steps + 1):
        length = int(rng.integers(lengths[0], lengths[1] + 1))
        x, y, w = passkey_batch(tok, rng, s, length, batch)
        t = time.perf_counter()
        loss, grads = loss_and_grad(model, x, y, w)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.trainable_parameters(), opt.state, loss)
        seconds += time.perf_counter() - t
        losses.append(loss.item())
        if check is not None and (step % check_every == 0 or step == steps):
            acc = check()
            model.train()
            hist.append((step, acc))
            log(f"  step {step:5d}  loss {np.mean(losses[-50:]):.3f}  in-window exact {100 * acc:.0f}%  "
                f"({time.perf_counter() - t0:.0f} s)")
            if acc >= s.pre_target or (minutes is not None and time.perf_counter() - t0 > 60 * minutes):
                break
        elif step % 50 == 0 and check is None:
            log(f"  step {step:5d}  loss {np.mean(losses[-50:]):.3f}  ({time.perf_counter() - t0:.0f} s)")
    return {"steps": step, "train_seconds": seconds, "wall_seconds": time.perf_counter() - t0,
            "history": hist, "final_loss": float(np.mean(losses[-20:]))}


def evaluate(model: Model, tok, s: Setup, name: str, lengths: list[int], log=print) -> dict:
    """Passkey grid over ``lengths`` x DEPTHS and ppl by position at the long length."""
    t = time.perf_counter()
    grid = evals.passkey_grid(model, tok, lengths, DEPTHS, trials=s.trials, digits=s.digits, seed=s.seed + 1)
    docs = evals.filler_documents(tok, s.long, s.ppl_docs, seed=s.seed + 2)
    table = evals.ppl_by_position(model, docs, window=s.long, stride=s.long // 2, bucket=s.window)
    log(evals.format_grid(grid, title=name))
    log(evals.format_position_table({name: table}))
    log(f"  (eval {time.perf_counter() - t:.0f} s)")
    return {"name": name, "passkey": grid.to_dict(), "ppl": table.to_dict(),
            "long_exact": grid.mean_exact(lengths[-1]), "long_digit": grid.mean_digit(lengths[-1])}


def scalings(s: Setup) -> dict[str, dict | None]:
    f = float(s.factor)
    return {"extrapolation": None,
            "linear PI": {"type": "linear", "factor": f},
            "dynamic NTK": {"type": "dynamic", "factor": f},
            "YaRN": {"type": "yarn", "factor": f, "original_max_position_embeddings": s.window}}


def stage_a(tok, s: Setup, log=print) -> tuple[Model, dict]:
    log(f"== (a) pretrain d={s.hidden} L={s.layers} H={s.heads} at window {s.window} ==")
    model = small_model(s, s.seed, tok.vocab_size)
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    log(f"  {n / 1e6:.2f} M parameters; chance: exact 1e-{s.digits}, per-digit 10%")

    def check() -> float:
        g = evals.passkey_grid(model, tok, [s.window], DEPTHS, trials=max(4, s.trials // 2), digits=s.digits,
                               seed=s.seed + 100)
        return g.mean_exact(s.window)

    info = train_loop(model, tok, s, steps=s.pre_steps, lr=s.pre_lr, batch=s.pre_batch,
                      lengths=(min_length(tok, s), s.window), seed=s.seed, check=check, minutes=s.pre_minutes,
                      log=log)
    log(f"  pretrain: {info['steps']} steps, {info['train_seconds']:.0f} s train time, "
        f"{info['train_seconds'] / info['steps'] * 1e3:.0f} ms/step")
    return model, info


def stage_c_variants(s: Setup) -> dict[str, dict]:
    pi, yarn = scalings(s)["linear PI"], scalings(s)["YaRN"]
    return {"FT PI": dict(rope=pi, s2=None, full=False),
            "FT YaRN": dict(rope=yarn, s2=None, full=False),
            "FT PI + S2 + emb/norms (LongLoRA)": dict(rope=pi, s2=0.25, full=True),
            "FT PI + S2 (LoRA only)": dict(rope=pi, s2=0.25, full=False)}


def fine_tune(base_weights, tok, s: Setup, name: str, v: dict, log=print) -> dict:
    model = small_model(s, s.seed, tok.vocab_size)
    model.load_weights(base_weights)
    model.set_rope(v["rope"])
    mz.lora.apply(model, mz.LoRAConfig(r=s.rank, alpha=2.0 * s.rank, dropout=0.0,
                                       train_embeddings=v["full"], train_norms=v["full"]), seed=s.seed)
    model.s2_group = v["s2"]
    n_train = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
    log(f"== (c) {name}: {n_train} trainable parameters, {s.ft_steps} steps at {s.long} ==")
    info = train_loop(model, tok, s, steps=s.ft_steps, lr=s.ft_lr, batch=s.ft_batch,
                      lengths=(max(s.long // 2, min_length(tok, s)), s.long), seed=s.seed + 7, log=log)
    log(f"  fine-tune: {info['train_seconds']:.1f} s train time, "
        f"{info['train_seconds'] / info['steps'] * 1e3:.0f} ms/step")
    model.s2_group = None
    res = evaluate(model, tok, s, name, long_lengths(s), log=log)
    res.update(train=info, trainable=n_train)
    return res


def long_lengths(s: Setup) -> list[int]:
    out, L = [], s.window
    while L <= s.long:
        out.append(L)
        L *= 2
    return out


PRETRAIN_FIELDS = ("window", "hidden", "layers", "heads", "digits", "pre_steps", "pre_batch", "pre_lr",
                   "pre_target", "other_weight", "seed", "tokenizer")


def pretrained(tok, s: Setup, cache: str | None, log=print) -> tuple[Model, dict]:
    """Stage (a), or its result from ``cache`` (a .safetensors file written by an earlier
    run with the same pretraining fields; written here when it does not exist yet)."""
    want = {k: str(getattr(s, k)) for k in PRETRAIN_FIELDS}
    if cache and os.path.exists(cache):
        weights, meta = mx.load(cache, return_metadata=True)
        got = {k: meta.get(k) for k in PRETRAIN_FIELDS}
        if got != want:
            diff = sorted(k for k in PRETRAIN_FIELDS if got[k] != want[k])
            raise SystemExit(f"--base-cache {cache}: pretrained with other settings ({', '.join(diff)}); "
                             f"use another file or delete it")
        model = small_model(s, s.seed, tok.vocab_size)
        model.load_weights(list(weights.items()))
        log(f"== (a) pretrained base loaded from {cache} ==")
        return model, json.loads(meta["pretrain"])
    model, info = stage_a(tok, s, log=log)
    if cache:
        atomic_save_safetensors(cache, dict(tree_flatten(model.parameters())),
                                metadata={**want, "pretrain": json.dumps(info, default=float)})
    return model, info


def run(s: Setup, log=print, cache: str | None = None) -> dict:
    tok = make_tokenizer(s)
    t0 = time.perf_counter()
    model, pre = pretrained(tok, s, cache, log=log)
    results = {"setup": s.__dict__, "pretrain": pre, "zero_shot": [], "fine_tuned": []}
    base = tree_flatten(model.parameters())
    results["pretrain_eval"] = evaluate(model, tok, s, "pretrained (in window)", [s.window], log=log)
    log(f"== (b) at {s.long} ({s.factor}x) without fine-tuning ==")
    for name, rope in scalings(s).items():
        model.set_rope(rope)
        results["zero_shot"].append(evaluate(model, tok, s, name, long_lengths(s), log=log))
    for name, v in stage_c_variants(s).items():
        results["fine_tuned"].append(fine_tune(base, tok, s, name, v, log=log))
    results["total_seconds"] = time.perf_counter() - t0
    log(summary(results))
    return results


def summary(r: dict) -> str:
    rows = ["| variant | exact @long | per-digit @long | ppl first bucket | ppl last bucket | train s/step |",
            "|---|---|---|---|---|---|"]
    for v in r["zero_shot"] + r["fine_tuned"]:
        ppl = v["ppl"]["ppl"]
        tr = v.get("train")
        cost = f"{tr['train_seconds'] / tr['steps']:.3f}" if tr else "-"
        rows.append(f"| {v['name']} | {100 * v['long_exact']:.0f}% | {100 * v['long_digit']:.0f}% | "
                    f"{ppl[0]:.3g} | {ppl[-1]:.3g} | {cost} |")
    rows.append(f"\ntotal {r['total_seconds'] / 60:.1f} min")
    return "\n".join(rows)


def fast_setup() -> Setup:
    """The reduced run of the slow test: 4x, fewer steps and trials."""
    return Setup(window=128, factor=4, pre_steps=1500, pre_minutes=5.0, ft_steps=60, trials=4, ppl_docs=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fast", action="store_true", help="reduced run (4x, 5-minute pretraining)")
    ap.add_argument("--pre-steps", type=int)
    ap.add_argument("--ft-steps", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--pre-minutes", type=float, help="time cap on pretraining")
    ap.add_argument("--json", help="write all results to this JSON file")
    ap.add_argument("--base-cache", metavar="FILE.safetensors",
                    help="reuse the pretrained model from this file (written on the first run)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override any Setup field, e.g. --set ft_batch=4 --set rank=16 (repeatable)")
    a = ap.parse_args()
    s = fast_setup() if a.fast else Setup()
    for k in ("pre_steps", "ft_steps", "seed", "pre_minutes"):
        if getattr(a, k) is not None:
            setattr(s, k, getattr(a, k))
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep or key not in Setup.__dataclass_fields__:
            ap.error(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(Setup.__dataclass_fields__)}")
        setattr(s, key, type(getattr(Setup, key))(value))
    r = run(s, log=lambda m: print(m, flush=True), cache=a.base_cache)
    if a.json:
        atomic_write_json(a.json, json.loads(json.dumps(r, default=float)))  # numpy scalars -> float


if __name__ == "__main__":
    main()
