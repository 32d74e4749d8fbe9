"""The attention dispatcher: :func:`flash_attention`, the one entry point the model calls.

:func:`attention_path` picks the implementation (env ``MOZGACH_ATTENTION``, read through
:mod:`mozgach_mlx.settings`, forces one). A GPU kernel (:mod:`.gpu`) is only used after
it passed :func:`self_check` against the blockwise path (:mod:`.blockwise`) and, unless
forced, a one-off :func:`speed_check` showed it is not slower. Both compare two
implementations, so they live here and not next to the kernel; their results are cached
per kernel kind for the life of the process.
"""

from __future__ import annotations

import time
import warnings

import mlx.core as mx

from .. import backend, settings
from ..errors import KernelError
from . import gpu
from .blockwise import blockwise_attention, check_inputs
from .reference import reference_attention


def flash_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float | None = None,
                    causal: bool = True, segment_ids: mx.array | None = None, window: int | None = None,
                    s2_group: int | None = None, block_size: int | tuple[int, int] | None = None) -> mx.array:
    """Public attention entry point: O(L) memory forward and backward, differentiable.

    Shapes: q (B, H, L, D); k, v (B, Hkv, L, D) with H % Hkv == 0 -> (B, H, L, D) in
    q.dtype. ``scale`` defaults to 1/sqrt(D). The mask (one vocabulary, see
    :mod:`.masks`; every condition given must hold):

    * ``causal``: keys after the query are hidden;
    * ``segment_ids`` (B, L) integers: a token sees only tokens of its own segment
      (packed documents);
    * ``window``: a query sees only the last ``window`` positions (itself included);
    * ``s2_group`` (tokens): S²-Attn, groups of ``s2_group`` tokens with the last
      ``H - H // 2`` heads' groups shifted by half a group (LongLoRA, for training; no
      grouping when ``s2_group >= L``).

    Blocks a mask hides are never computed. The path is chosen by :func:`attention_path`
    (env ``MOZGACH_ATTENTION``); a GPU kernel runs only the patterns it supports
    (:func:`.gpu.supports`), everything else goes to the blockwise path.
    """
    path = attention_path(q)
    mask = dict(causal=causal, window=window, segment_ids=segment_ids, s2_group=s2_group)
    if path == "reference":
        return reference_attention(q, k, v, scale=scale, **mask)
    if path in ("metal", "cuda") and gpu.supports(q, k, v, **mask):
        return gpu.attention(q, k, v, scale=check_inputs(q, k, v, scale, window), causal=causal, window=window)
    return blockwise_attention(q, k, v, scale=scale, block_size=block_size, **mask)


def attention_path(q: mx.array | None = None) -> str:
    """Which implementation :func:`flash_attention` uses now.

    ``MOZGACH_ATTENTION`` forces one (a GPU kernel that is not available raises
    :class:`KernelError`; one that fails its self-check warns and falls back). Unset,
    the current backend's GPU kernel is used if its first-use self-check passes.
    """
    forced = settings.attention()
    if forced in ("blockwise", "reference"):
        return forced
    avail = backend.kernels_available()
    if forced in ("metal", "cuda"):
        if not avail[forced]:
            raise KernelError(f"MOZGACH_ATTENTION={forced} but MLX runs on the "
                              f"{backend.backend()} backend here; unset it or use blockwise.")
        return forced if _gpu_kernel_ok(forced, forced=True) else "blockwise"
    for kind in ("metal", "cuda"):
        if avail[kind] and _gpu_kernel_ok(kind):
            return kind
    return "blockwise"


# kind -> result of the first-use checks (one process, one answer per kernel).
_self_check: dict[str, bool] = {}
_faster: dict[str, bool] = {}


def _gpu_kernel_ok(kind: str, forced: bool = False) -> bool:
    """First-use self-check of the GPU kernel against blockwise (values and grads); unless
    the kernel is forced, also a one-off timing so an unmeasured kernel that is slower
    than the blockwise path on this GPU is not used by default."""
    if kind not in _self_check:
        ok, why = self_check(kind)
        _self_check[kind] = ok
        if not ok:
            warnings.warn(f"mozgach_mlx: the {kind} attention kernel failed its self-check "
                          f"({why}); using the blockwise MLX path instead.", stacklevel=3)
    if not _self_check[kind] or forced:
        return _self_check[kind]
    if kind not in _faster:
        t_kernel, t_blockwise = speed_check(kind)
        _faster[kind] = t_kernel <= t_blockwise
    return _faster[kind]


# One small case per mask pattern the kernels claim (gpu.supports): causal, bidirectional,
# causal window, bidirectional window; odd L, GQA and D below the lane count's multiple.
# (H, Hkv, L, D, causal, window)
SELF_CHECK_CASES = [(4, 2, 67, 64, True, None), (2, 2, 33, 80, False, None),
                    (4, 1, 40, 128, True, 9), (2, 1, 45, 96, False, 7)]


def self_check(kind: str) -> tuple[bool, str]:
    """Compare the ``kind`` GPU kernel with the blockwise path (values and dq/dk/dv) on
    small inputs, one per pattern the kernel claims (:data:`SELF_CHECK_CASES`).

    Returns (ok, reason). Never raises: a kernel that fails to compile is reported here.
    """
    try:
        for (H, Hkv, L, D, causal, window) in SELF_CHECK_CASES:
            keys = mx.random.split(mx.random.key(1234), 4)
            q = mx.random.normal((1, H, L, D), key=keys[0])
            k = mx.random.normal((1, Hkv, L, D), key=keys[1])
            v = mx.random.normal((1, Hkv, L, D), key=keys[2])
            w = mx.random.normal((1, H, L, D), key=keys[3])
            if not gpu.supports(q, k, v, causal=causal, window=window):
                return False, f"the kernel does not support its own claimed pattern causal={causal} window={window}"

            def run(fn, q, k, v, causal=causal, window=window, w=w):
                def loss(q, k, v):
                    return (fn(q, k, v, causal=causal, window=window) * w).sum()

                o = fn(q, k, v, causal=causal, window=window)
                return (o, *mx.grad(loss, argnums=(0, 1, 2))(q, k, v))

            got = run(lambda *a, **kw: gpu.attention(*a, kind=kind, **kw), q, k, v)
            ref = run(blockwise_attention, q, k, v)
            mx.eval(got, ref)
            for name, a, b in zip(("o", "dq", "dk", "dv"), got, ref, strict=True):
                err = float(mx.abs(a - b).max())
                if not err <= 1e-3 * max(1.0, float(mx.abs(b).max())):  # also catches nan
                    return False, (f"{name} differs by {err:.3g} (H={H} Hkv={Hkv} L={L} D={D} "
                                   f"causal={causal} window={window})")
    except Exception as e:  # compile errors, missing backend: reported, never fatal
        return False, f"{type(e).__name__}: {e}"
    return True, "ok"


def speed_check(kind: str, L: int = 2048) -> tuple[float, float]:
    """Seconds for one fwd+bwd step (B=1, H=8, Hkv=2, D=128, bf16) of (kernel, blockwise).

    The kernels are simple (one SIMD-group per row, no query tiling) and have never been
    timed on hardware; the dispatcher uses this once to keep the faster path.
    """
    keys = mx.random.split(mx.random.key(7), 4)
    q = mx.random.normal((1, 8, L, 128), key=keys[0]).astype(mx.bfloat16)
    k = mx.random.normal((1, 2, L, 128), key=keys[1]).astype(mx.bfloat16)
    v = mx.random.normal((1, 2, L, 128), key=keys[2]).astype(mx.bfloat16)
    w = mx.random.normal((1, 8, L, 128), key=keys[3]).astype(mx.bfloat16)
    times = []
    for fn in (lambda q, k, v: gpu.attention(q, k, v, kind=kind), blockwise_attention):
        step = mx.grad(lambda q, k, v, fn=fn: (fn(q, k, v) * w).astype(mx.float32).sum(),
                       argnums=(0, 1, 2))
        mx.eval(step(q, k, v))  # warm-up / compile
        t0 = time.perf_counter()
        for _ in range(3):
            mx.eval(step(q, k, v))
        times.append((time.perf_counter() - t0) / 3)
    return times[0], times[1]
