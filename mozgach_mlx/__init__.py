"""mozgach-mlx: long-context QLoRA fine-tuning of many adapters over one base, on MLX."""

from . import backend as _backend

# Must run before anything imports mlx.core (see backend.py).
_backend.load_fast_blas()

from . import models, quant  # noqa: E402
from .errors import (  # noqa: E402
    AdapterError,
    CheckpointError,
    ConfigError,
    DataError,
    KernelError,
    MozgachError,
    TokenizerError,
    TrainingError,
)
from .models import ModelArgs, load, save  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "KernelError",
    "ModelArgs",
    "MozgachError",
    "TokenizerError",
    "TrainingError",
    "__version__",
    "load",
    "models",
    "quant",
    "save",
]
