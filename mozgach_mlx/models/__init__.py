"""Model architectures (one file per family), scaled RoPE, the tiny built-in model, and
loading / saving in the Hugging Face layout."""

from .base import KVCache
from .checkpoint import load, save
from .llama import MODEL_TYPES, Model, ModelArgs
from .rope import build_rope
from .tiny import TINY_CONFIG, tiny_model

__all__ = ["KVCache", "MODEL_TYPES", "Model", "ModelArgs", "TINY_CONFIG", "build_rope", "load", "save",
           "tiny_model"]
