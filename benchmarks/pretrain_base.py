"""Pretrain the built-in base ``tiny-stdlib`` (issue 14) and write it into the package.

1. A byte-level BPE tokenizer (the ``tokenizers`` package, vocab ``--vocab``) is trained
   on the pretraining text (``benchmarks/build_realtext.py --pretrain-out``: the Python
   standard library minus the stdlib12 domain modules).
2. A Llama of the tiny model's shape (d=256, 4 layers, GQA 8/2, SwiGLU 768, tied
   embeddings) with that vocabulary is trained from ``N(0, 0.02^2)`` on random
   ``--context``-token windows of the text, full weights, AdamW, warmup + cosine.
3. The result is quantized (4-bit, group 64; embeddings stay fp16) and saved with
   ``mz.save`` to ``mozgach_mlx/models/builtin/tiny-stdlib`` (loaded by
   ``mz.load("tiny-stdlib")``). Printed: tokens seen, wall time, final train loss and the
   held-out loss (the last 2% of the text) before and after quantization.

    MOZGACH_BLAS_THREADS=1 python benchmarks/pretrain_base.py --text /tmp/rt_pretrain.txt
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import mozgach_mlx as mz  # noqa: F401  (binds the fast CPU BLAS before training)
from mozgach_mlx import loss as mzloss
from mozgach_mlx import quant
from mozgach_mlx.models import TINY_CONFIG, Model, ModelArgs, save
from mozgach_mlx.tokenizer import HFTokenizer

SPECIALS = ["<s>", "</s>", "<pad>"]


def train_tokenizer(text_path: Path, vocab: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train([str(text_path)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return HFTokenizer(fast)


def batches(ids: np.ndarray, batch: int, context: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(ids) - context - 1, batch)
        x = np.stack([ids[s: s + context + 1] for s in starts])
        yield mx.array(x[:, :-1]), mx.array(x[:, 1:])


def mean_loss(model, x, y):
    s, n = mzloss.sequence_loss(model, x, y, mx.ones(y.shape), with_grad=False)
    return (s / n).item()


def heldout(model, ids: np.ndarray, context: int) -> float:
    n = (len(ids) - 1) // context
    x = ids[: n * context].reshape(n, context)
    y = ids[1: n * context + 1].reshape(n, context)
    return float(np.mean([mean_loss(model, mx.array(x[i: i + 8]), mx.array(y[i: i + 8]))
                          for i in range(0, n, 8)]))


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=here / "mozgach_mlx" / "models" / "builtin" / "tiny-stdlib")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.time()
    tok = train_tokenizer(args.text, args.vocab, args.out)
    ids = np.array(tok.encode(args.text.read_text(), add_bos=False), np.int32)
    cut = int(len(ids) * 0.98)
    train_ids, held_ids = ids[:cut], ids[cut:][: 64 * args.context + 1]
    print(f"tokenizer: vocab {tok.vocab_size}, {len(ids):,} tokens "
          f"({len(args.text.read_text()) / len(ids):.2f} chars/token), {time.time() - t0:.0f} s")

    config = dict(TINY_CONFIG, vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.02)
    model = Model(ModelArgs.from_dict(config, source="pretrain"))
    rng = np.random.default_rng(args.seed)
    model.load_weights([(k, mx.array(np.ones(p.shape, np.float32) if "norm" in k else
                                     rng.normal(0, 0.02, p.shape).astype(np.float32)))
                        for k, p in tree_flatten(model.parameters())])

    def schedule(step):
        warm = mx.minimum(step / args.warmup, 1.0)
        frac = mx.clip((step - args.warmup) / max(args.steps - args.warmup, 1), 0.0, 1.0)
        return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + mx.cos(math.pi * frac)))

    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

    def loss_fn(m, x, y):
        s, n = mzloss.sequence_loss(m, x, y, mx.ones(y.shape))
        return s / n

    step_fn = nn.value_and_grad(model, loss_fn)
    data = batches(train_ids, args.batch, args.context, rng)
    t1, ema = time.time(), None
    for step in range(1, args.steps + 1):
        x, y = next(data)
        loss, grads = step_fn(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  ema {ema:.3f}  {time.time() - t1:.0f} s", flush=True)
    train_s = time.time() - t1
    fp32_held = heldout(model, held_ids, args.context)
    quant.quantize_model(model, 4, 64)
    model.set_dtype(mx.float16)  # what is shipped: 4-bit layers, fp16 embeddings / scales / norms
    model.set_dtype(mx.float32)
    q_held = heldout(model, held_ids, args.context)
    model.set_dtype(mx.float16)
    save(model, tok, args.out)
    report = {"tokens_seen": args.steps * args.batch * args.context, "steps": args.steps,
              "batch": args.batch, "context": args.context, "lr": args.lr, "train_seconds": round(train_s),
              "final_train_loss_ema": round(ema, 4), "heldout_loss_fp32": round(fp32_held, 4),
              "heldout_loss_4bit": round(q_held, 4), "vocab": tok.vocab_size,
              "text_tokens": int(len(ids)), "text_chars": len(args.text.read_text())}
    (args.out / "pretraining.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
