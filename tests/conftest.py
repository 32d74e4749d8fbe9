# ruff: noqa: I001  (mozgach_mlx first: no longer required for the fast BLAS, see blasbind.py; kept as is)
"""Shared fixtures, the small seeded model builders the test files use
(``from conftest import small_config, randomize``), :func:`fp32_tol`, :func:`measured_peak`,
and for multi-process tests :func:`launched` and :func:`group_pids`."""

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import mozgach_mlx  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten


ROOT = Path(__file__).resolve().parent.parent  # the repository (multi-process tests run from it)
F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23 = 2u, u the unit roundoff


def fp32_tol(scale: float, n: int) -> float:
    """How far two fp32 evaluations of one quantity may drift apart when only their order
    of operations differs (BLAS blocking or threads, batch shape, fused vs. split sums,
    SIMD width): ``n * eps * scale``.

    Where it comes from: a length-n sum or dot product in fp32 is off by at most
    ``(n - 1) u sum|terms|`` (u = eps/2; Higham, *Accuracy and Stability of Numerical
    Algorithms*, 2nd ed., section 3.1), and two orders can err in opposite directions,
    so they differ by at most ``n eps sum|terms|``. ``scale`` is the magnitude of the
    values involved (``sum|terms|``, or ``max|result|`` where the terms do not largely
    cancel), ``n`` the reduction length. Actual rounding grows like ``sqrt(n) u``, so
    the worst case also leaves room for what a few chained layers add. Use it instead
    of the measured error of another computation, which can be exactly 0 on one CPU
    and not on the next; a real bug (a wrong coefficient, a missing term) is orders of
    magnitude above it.
    """
    return n * F32_EPS * scale


def measured_peak(step, warm_up: bool = False) -> int:
    """Peak bytes MLX allocates while evaluating ``step()`` (a callable returning arrays),
    from a synchronized, emptied cache; ``warm_up`` evaluates it once before (compiled
    kernels, traces and lazily built state out of the measurement)."""
    if warm_up:
        mx.eval(step())
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    mx.eval(step())
    return mx.get_peak_memory()


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
    yield


def small_config(model_type: str = "llama", **overrides) -> dict:
    """A Hugging Face config.json dict of a 2-block model (d=64, 4/2 heads, byte vocab)."""
    cfg = {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 259, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 256, "tie_word_embeddings": False}
    cfg.update(overrides)
    return cfg


def randomize(model, seed: int = 0, std: float = 0.1, vector_std: float | None = None,
              norm_mean: float = 0.0):
    """Give every parameter a seeded normal value (numpy's generator, so independent of
    MLX's): ``std`` for matrices, ``vector_std`` (default ``std``) for 1-D parameters,
    norm weights centred on ``norm_mean``. Returns ``model``."""
    rng = np.random.default_rng(seed)
    vstd = std if vector_std is None else vector_std
    model.load_weights([(k, mx.array(rng.normal(norm_mean if "norm" in k else 0.0, std if v.ndim > 1 else vstd,
                                                v.shape).astype(np.float32)))
                        for k, v in tree_flatten(model.parameters())])
    return model


def random_model(cfg: dict, seed: int = 0, **kw):
    """Our Model built from a config dict, randomized (see :func:`randomize`)."""
    from mozgach_mlx.models import Model, ModelArgs

    return randomize(Model(ModelArgs.from_dict(cfg)), seed, **kw)


@contextlib.contextmanager
def launched(cmd: list[str], env: dict | None = None):
    """``cmd`` started in a process group of its own from the repository root, this
    checkout on PYTHONPATH (plus ``env``), stdout/stderr piped; on exit every process of
    the group is killed (no rank is left behind by a failing test)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


def group_pids(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids
