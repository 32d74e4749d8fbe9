"""mozgach-mlx: long-context QLoRA fine-tuning of many adapters over one base, on MLX."""

from . import backend as _backend
from . import fpenv as _fpenv
from . import settings as _settings

_settings.quiet_transformers()  # before mlx-lm imports transformers

# Point MLX's CPU GEMM at OpenBLAS (works whether or not mlx.core was imported first).
_backend.tune_malloc()
with _fpenv.flushing():  # OpenBLAS's worker threads start here: they flush subnormals too
    _backend.load_fast_blas()
_fpenv.install()  # MLX's CPU stream thread flushes subnormals (x86-64 Linux; fpenv.py)

from . import attention, data, distributed, lora, loss, models, quant, synthetic  # noqa: E402
from .bank import AdapterBank, GenerationConfig  # noqa: E402
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
from .fleet import train_fleet  # noqa: E402
from .lora import LoRAConfig  # noqa: E402
from .models import ModelArgs, load, save  # noqa: E402
from .plan import Plan, plan  # noqa: E402
from .rundir import RunConfig  # noqa: E402
from .train_config import TrainConfig  # noqa: E402
from .trainer import TrainResult, train_adapter  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AdapterBank",
    "AdapterError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "GenerationConfig",
    "KernelError",
    "LoRAConfig",
    "ModelArgs",
    "MozgachError",
    "Plan",
    "RunConfig",
    "TokenizerError",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "__version__",
    "attention",
    "data",
    "distributed",
    "load",
    "lora",
    "loss",
    "models",
    "plan",
    "quant",
    "save",
    "synthetic",
    "train_adapter",
    "train_fleet",
]
