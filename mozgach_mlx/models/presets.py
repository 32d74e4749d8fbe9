"""Published model shapes as config dicts (no downloads): ``--model ID`` for the planner,
and a real shape with random weights for benchmarks.

Values are the ``config.json`` of each Hugging Face repository (the repository is named
next to each entry; checked against copies of those files in public repositories). Only
the fields our Llama-family model reads are kept; the base (not -Instruct) configs.
"""

from __future__ import annotations

import copy

from ..errors import ConfigError

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict] = {
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                     "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "head_dim": 128, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                     "max_position_embeddings": 131072, "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0},
                     "tie_word_embeddings": False},
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16,
                     "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "head_dim": 64, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                     "max_position_embeddings": 131072, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
                     "tie_word_embeddings": True},
    # meta-llama/Llama-3.2-3B
    "llama-3.2-3b": {"model_type": "llama", "hidden_size": 3072, "num_hidden_layers": 28,
                     "intermediate_size": 8192, "num_attention_heads": 24, "num_key_value_heads": 8,
                     "head_dim": 128, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                     "max_position_embeddings": 131072, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
                     "tie_word_embeddings": True},
    # mistralai/Mistral-7B-v0.1 (sliding window 4096 on every layer)
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32,
                   "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                   "max_position_embeddings": 32768, "sliding_window": 4096, "tie_word_embeddings": False},
    # Qwen/Qwen2.5-0.5B
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
                     "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                     "max_position_embeddings": 32768, "sliding_window": 32768, "use_sliding_window": False,
                     "max_window_layers": 24, "tie_word_embeddings": True},
    # Qwen/Qwen2.5-1.5B
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28,
                     "intermediate_size": 8960, "num_attention_heads": 12, "num_key_value_heads": 2,
                     "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                     "max_position_embeddings": 131072, "sliding_window": 131072, "use_sliding_window": False,
                     "max_window_layers": 28, "tie_word_embeddings": True},
    # Qwen/Qwen2.5-7B
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
                   "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "max_position_embeddings": 131072, "sliding_window": 131072, "use_sliding_window": False,
                   "max_window_layers": 28, "tie_word_embeddings": False},
}


def preset(name: str) -> dict:
    """A copy of the preset's config dict; ConfigError naming the valid ids otherwise."""
    key = str(name).lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[key])


def is_preset(name) -> bool:
    return isinstance(name, str) and name.lower() in PRESETS
