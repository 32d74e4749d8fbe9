"""Model architectures (one file per family), scaled RoPE and the tiny built-in model."""

from .base import KVCache
from .llama import MODEL_TYPES, Model, ModelArgs
from .rope import build_rope
from .tiny import TINY_CONFIG, tiny_model

__all__ = ["KVCache", "MODEL_TYPES", "Model", "ModelArgs", "TINY_CONFIG", "build_rope", "tiny_model"]
