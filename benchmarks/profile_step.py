"""Where a training step's time goes, by operation class (one process, one thread).

The step of the default run: the built-in ``tiny-stdlib`` base (4-bit, group 64), LoRA
r=16 on every linear layer, batch 4 x 256 tokens of the stdlib12 corpus, no
checkpointing, the trainer's own loss (``trainer.default_loss``: chunked lm_head +
cross-entropy) and AdamW. ``--model smollm2-135m`` profiles the real model the same way.

Each row times one piece alone, with ``mx.eval`` at its end (median of ``--repeat``
runs after a warm-up):

* ``step``: value_and_grad + AdamW update, as the trainer runs it;
* ``forward``: the loss alone;
* ``value_and_grad``: forward + backward;
* ``update``: the AdamW update alone on given gradients;
* ``dequantize``: dequantizing every 4-bit layer once (what a forward pass does on the CPU);
* ``base matmuls``: the frozen layers' matmuls on fp32 weights (forward);
* ``lora matmuls``: the LoRA down/up products of every layer (forward);
* ``attention``: blockwise attention forward + backward over the step's shapes, all layers;
* ``loss``: the chunked head + cross-entropy forward + backward on the final hidden states;
* ``graph``: building the step's graph without evaluating it (Python and graph overhead).

    python benchmarks/profile_step.py                      # the default run's step
    python benchmarks/profile_step.py --compile            # also the compiled step
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import mozgach_mlx as mz
from mozgach_mlx import attention as attn
from mozgach_mlx import loss as loss_mod
from mozgach_mlx import trainer
from mozgach_mlx.quant import dequantized_weight


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-stdlib")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time the compiled step (trainer.compiled)")
    args = ap.parse_args()

    model, tok = mz.load(args.model, quantize=4)
    mz.lora.apply(model, mz.LoRAConfig(r=16, alpha=32, dropout=0.0, targets=("all-linear",)))
    cfg = trainer.TrainConfig(grad_checkpoint=False, mlp_chunk=None, batch_size=args.batch,
                              max_seq_length=args.length)
    model.grad_checkpoint, model.mlp_chunk = False, None
    model.train()
    rng = np.random.default_rng(0)
    V = model.args.vocab_size
    B, L = args.batch, args.length
    tokens = mx.array(rng.integers(0, V, (B, L + 1)).astype(np.int32))
    x, y, m = tokens[:, :-1], tokens[:, 1:], mx.ones((B, L), mx.float32)

    def loss_fn(mdl, x, y, m):
        s, n = trainer.default_loss(mdl, x, y, m, cfg)
        return s / n

    opt = optim.AdamW(learning_rate=1e-4)
    vg = nn.value_and_grad(model, loss_fn)
    loss, grads = vg(model, x, y, m)
    opt.update(model, grads)
    mx.eval(loss, grads, opt.state, model.parameters())

    rows = {}

    def step():
        loss, g = vg(model, x, y, m)
        opt.update(model, g)
        mx.eval(loss, model.trainable_parameters(), opt.state)

    rows["step"] = timed(step, args.repeat)
    rows["forward"] = timed(lambda: mx.eval(loss_fn(model, x, y, m)), args.repeat)
    rows["value_and_grad"] = timed(lambda: mx.eval(vg(model, x, y, m)), args.repeat)

    def update():
        opt.update(model, grads)
        mx.eval(model.trainable_parameters(), opt.state)

    rows["update"] = timed(update, args.repeat)

    qlayers = [mod for _, mod in model.named_modules() if isinstance(mod, nn.QuantizedLinear)]
    rows["dequantize"] = timed(lambda: mx.eval([dequantized_weight(q) for q in qlayers]), args.repeat)
    dense = [dequantized_weight(q) for q in qlayers]
    mx.eval(dense)
    d = model.args.hidden_size
    h = mx.array(rng.normal(size=(B * L, d)).astype(np.float32))
    inter = mx.array(rng.normal(size=(B * L, model.args.intermediate_size)).astype(np.float32))

    def base_matmuls():
        outs = [(inter if w.shape[1] != d else h) @ w.T for w in dense]
        mx.eval(outs)

    rows["base matmuls"] = timed(base_matmuls, args.repeat)
    loras = [mod for _, mod in model.named_modules() if "lora_a" in mod]

    def lora_matmuls():
        outs = [((inter if lo.lora_a.shape[0] != d else h) @ lo.lora_a) @ lo.lora_b for lo in loras]
        mx.eval(outs)

    rows["lora matmuls"] = timed(lora_matmuls, args.repeat)
    H, Hkv, D = model.args.num_attention_heads, model.args.num_key_value_heads, model.args.head_dim
    q = mx.array(rng.normal(size=(B, H, L, D)).astype(np.float32))
    k = mx.array(rng.normal(size=(B, Hkv, L, D)).astype(np.float32))
    v = mx.array(rng.normal(size=(B, Hkv, L, D)).astype(np.float32))
    att_vg = mx.value_and_grad(lambda q, k, v: attn.flash_attention(q, k, v, scale=D ** -0.5, causal=True).sum(),
                               argnums=(0, 1, 2))
    n_layers = model.args.num_hidden_layers
    rows["attention"] = timed(lambda: mx.eval([att_vg(q, k, v) for _ in range(n_layers)]), args.repeat)
    hid = mx.array(rng.normal(size=(B, L, d)).astype(np.float32))
    loss_vg = mx.value_and_grad(lambda hh: loss_mod.chunked_cross_entropy(model, hh, y, m, cfg.loss_chunk)[0])
    rows["loss"] = timed(lambda: mx.eval(loss_vg(hid)), args.repeat)

    def graph():
        loss, g = vg(model, x, y, m)
        opt.update(model, g)
        return loss

    rows["graph"] = timed(graph, args.repeat)
    mx.eval(model.parameters(), opt.state)
    if args.compile:
        cvg = trainer.compiled(model, nn.value_and_grad(model, lambda x, y, m: loss_fn(model, x, y, m)))

        def cstep():
            loss, g = cvg(x, y, m)
            opt.update(model, g)
            mx.eval(loss, model.trainable_parameters(), opt.state)

        rows["compiled step"] = timed(cstep, args.repeat)

    n_params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    print(f"{args.model}, batch {B} x {L}, LoRA r=16 all-linear ({n_params:,} trainable), one thread")
    print("| piece | CPU ms | % of step |")
    print("|---|---:|---:|")
    for name, t in rows.items():
        print(f"| {name} | {1000 * t:.1f} | {100 * t / rows['step']:.0f}% |")


if __name__ == "__main__":
    main()
