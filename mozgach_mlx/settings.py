"""Every ``MOZGACH_*`` environment variable, read in one place.

Each variable has one reader here; nothing else in the package looks at ``os.environ``.
Readers run at the moment the setting matters (most at call time, so a test or a user
can change them between calls; ``MOZGACH_BLAS`` / ``MOZGACH_MALLOC`` only matter at
``import mozgach_mlx``). A value outside the allowed set raises
:class:`~mozgach_mlx.errors.ConfigError` naming the variable and the values it takes.

This module must not import ``mlx`` (it is read before the fast BLAS is loaded).

===============================  ==========================================  ============
variable                         values                                      default
===============================  ==========================================  ============
MOZGACH_BLAS                     ``pip|system|none`` or a library path       auto
MOZGACH_BLAS_THREADS             threads of the bound OpenBLAS (>= 1|auto)   auto
MOZGACH_MALLOC                   ``default`` keeps glibc's malloc thresholds  tuned
MOZGACH_ATTENTION                ``blockwise|metal|cuda|reference``           auto
MOZGACH_ATTENTION_CPU_STREAMS    CPU streams for blockwise attention (>= 1)  1
MOZGACH_QMATMUL                  ``auto|dequant|quantized``                  auto
MOZGACH_FLUSH_DENORMALS          ``0|1``                                     1
MOZGACH_API_KEY                  the key ``mozgach serve`` requires          none
===============================  ==========================================  ============
"""

from __future__ import annotations

import os

from .errors import ConfigError

ATTENTION_PATHS = ("blockwise", "metal", "cuda", "reference")
QMATMUL_MODES = ("auto", "dequant", "quantized")

# name -> (values, default, what it does): the README's table is generated from the same facts.
VARIABLES = {
    "MOZGACH_BLAS": ("`pip`, `system`, `none`, or a path of an OpenBLAS library", "auto: `pip`, else `system`",
                     "the OpenBLAS MLX's CPU matmuls are rebound to (Linux): `pip` is the scipy-openblas32 "
                     "wheel, `system` apt's/dnf's, `none` keeps MLX's slow bundled BLAS"),
    "MOZGACH_BLAS_THREADS": ("integer >= 1, `auto`", "auto: 2 on an idle machine, else 1",
                             "threads of the bound OpenBLAS (Linux)"),
    "MOZGACH_MALLOC": ("`default`", "tuned", "`default` keeps glibc's malloc thresholds (Linux)"),
    "MOZGACH_ATTENTION": ("`blockwise`, `metal`, `cuda`, `reference`", "auto",
                          "force an attention implementation"),
    "MOZGACH_ATTENTION_CPU_STREAMS": ("integer >= 1", "1", "CPU streams the blockwise attention spreads over"),
    "MOZGACH_QMATMUL": ("`auto`, `dequant`, `quantized`", "auto",
                        "how a 4/8-bit linear layer multiplies on the CPU"),
    "MOZGACH_FLUSH_DENORMALS": ("`0`, `1`", "1",
                                "`0` keeps subnormal floats on MLX's CPU threads (x86-64 Linux: 20-100x "
                                "slower arithmetic on them; see `mozgach_mlx/fpenv.py`)"),
    "MOZGACH_API_KEY": ("any non-empty string", "none",
                        "`mozgach serve` requires `Authorization: Bearer <key>` (as `--api-key`, which wins)"),
}


def _get(name: str) -> str:
    return os.environ.get(name, "").strip()


def blas() -> str | None:
    """``MOZGACH_BLAS``: ``"pip"``, ``"system"``, ``"none"`` (keep MLX's own BLAS), a library
    path, or None (auto: pip, else system)."""
    value = _get("MOZGACH_BLAS")
    if not value:
        return None
    return value.lower() if value.lower() in ("none", "pip", "system") else value


def blas_threads() -> int | None:
    """``MOZGACH_BLAS_THREADS``: threads of the bound OpenBLAS, or None (``auto``, the
    default: :func:`mozgach_mlx.backend.auto_blas_threads`)."""
    value = _get("MOZGACH_BLAS_THREADS")
    if not value or value.lower() == "auto":
        return None
    return _positive_int("MOZGACH_BLAS_THREADS", value, " or auto; unset it for the default (auto)")


def _positive_int(name: str, value: str, hint: str = "") -> int:
    """``value`` of the variable ``name`` as an integer >= 1, else one ConfigError line."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1{hint}.")
    return n


def malloc_default() -> bool:
    """``MOZGACH_MALLOC=default``: leave glibc's malloc thresholds alone."""
    return _get("MOZGACH_MALLOC").lower() == "default"


def attention() -> str | None:
    """``MOZGACH_ATTENTION``: the forced attention path, or None (the dispatcher chooses)."""
    value = _get("MOZGACH_ATTENTION").lower()
    if not value:
        return None
    if value not in ATTENTION_PATHS:
        raise ConfigError(f"MOZGACH_ATTENTION={value!r} is not one of {', '.join(ATTENTION_PATHS)}; "
                          "unset it to let the dispatcher choose.")
    return value


def attention_cpu_streams() -> int:
    """``MOZGACH_ATTENTION_CPU_STREAMS``: CPU streams the blockwise attention uses (>= 1)."""
    return _positive_int("MOZGACH_ATTENTION_CPU_STREAMS", _get("MOZGACH_ATTENTION_CPU_STREAMS") or "1")


def qmatmul() -> str:
    """``MOZGACH_QMATMUL``: ``auto`` (default), ``dequant`` or ``quantized``."""
    value = _get("MOZGACH_QMATMUL").lower() or "auto"
    if value not in QMATMUL_MODES:
        raise ConfigError(f"MOZGACH_QMATMUL={value!r} is not one of {', '.join(QMATMUL_MODES)}.")
    return value


def flush_denormals() -> bool:
    """``MOZGACH_FLUSH_DENORMALS``: ``1`` (default) flushes subnormal floats to zero on
    MLX's CPU threads, ``0`` leaves them."""
    value = _get("MOZGACH_FLUSH_DENORMALS") or "1"
    if value not in ("0", "1"):
        raise ConfigError(f"MOZGACH_FLUSH_DENORMALS={value!r} must be 0 or 1; unset it for the default (1).")
    return value == "1"


def quiet_transformers() -> None:
    """mlx-lm imports transformers (for tokenizers), which prints "PyTorch was not found" on
    every start; we never need PyTorch. Sets TRANSFORMERS_NO_ADVISORY_WARNINGS=1 unless the
    user set it (a transformers variable, not ours: not in the table)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def environment() -> dict[str, str]:
    """A copy of this process's whole environment (what ``mozgach launch`` passes to its ranks)."""
    return dict(os.environ)


def api_key() -> str | None:
    """``MOZGACH_API_KEY``: the key ``mozgach serve`` requires (None when unset or blank)."""
    return _get("MOZGACH_API_KEY") or None


def readme_table() -> str:
    """The Markdown table of every variable (the README's Environment section)."""
    lines = ["| variable | values | default | what it does |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {v} | {d} | {w} |" for k, (v, d, w) in VARIABLES.items()]
    return "\n".join(lines)
