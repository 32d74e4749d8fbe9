"""LoRA: low-rank adapters on the linear layers of a frozen (optionally 4-bit) base.

A LoRA layer wraps a frozen linear map ``W`` (``nn.Linear`` or ``nn.QuantizedLinear``,
any subclass) by composition and adds a trainable rank-``r`` update:

.. math::

    y = W x + b + s \\cdot B^{\\top} A^{\\top} \\mathrm{dropout}(x),\\qquad
    s = \\alpha / r \\;\\; (\\text{rsLoRA: } s = \\alpha / \\sqrt{r})

stored as ``lora_a`` (in, r) and ``lora_b`` (r, out), i.e. ``y = linear(x) + s *
dropout(x) @ lora_a @ lora_b``. ``lora_a`` starts uniform in ``±1/sqrt(in)``
(Kaiming-uniform with ``a = sqrt(5)``, as PEFT and mlx-lm) and ``lora_b`` at zero, so an
untrained adapter leaves the model unchanged.

Attribute names follow mlx-lm (``linear``, ``lora_a``, ``lora_b``), so parameter paths
are mlx-lm's: ``model.layers.0.self_attn.q_proj.lora_a``. One adapter's state is
:func:`trainable` (a flat name -> array dict); it is saved in the PEFT or the mlx-lm
layout (``formats.py``) with the RoPE scaling it was trained with (``files.py``).

Modules, each depending only on those above it:

* ``config``   :class:`LoRAConfig` (one source of the defaults), :func:`scale_of`
* ``layer``    :class:`LoRALinear`
* ``targets``  which layers / modules a config adapts in a model (read only)
* ``inject``   :func:`apply`, :func:`reset`, :func:`ensure`, :func:`remove`, :func:`fuse`
* ``formats``  PEFT and mlx-lm configs and tensor layouts, as pure dict transforms
* ``files``    :func:`save`, :func:`read`, :func:`load`
"""

from .config import ALL_LINEAR, LoRAConfig, scale_of
from .files import (
    CONFIG_FILE,
    FORMAT_VERSION,
    MLX_EXTRA_WEIGHTS,
    MLX_WEIGHTS,
    PEFT_WEIGHTS,
    load,
    read,
    save,
)
from .formats import PEFT_PREFIX
from .inject import apply, ensure, fuse, remove, reset, trainable
from .layer import LoRALinear

# Every public name of the single-file module this package replaced; the constants and
# ``ensure`` / ``scale_of`` were public there too, only missing from its ``__all__``.
__all__ = [
    "ALL_LINEAR",
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "LoRAConfig",
    "LoRALinear",
    "MLX_EXTRA_WEIGHTS",
    "MLX_WEIGHTS",
    "PEFT_PREFIX",
    "PEFT_WEIGHTS",
    "apply",
    "ensure",
    "fuse",
    "load",
    "read",
    "remove",
    "reset",
    "save",
    "scale_of",
    "trainable",
]
