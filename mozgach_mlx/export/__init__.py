"""Adapters out to the tools people already use (``mozgach export``).

* ``peft``: ``DIR/NAME/`` with ``adapter_config.json`` + ``adapter_model.safetensors``
  (``PeftModel.from_pretrained(base, DIR/NAME)``);
* ``mlx-lm``: ``DIR/NAME/`` with ``adapter_config.json`` + ``adapters.safetensors``
  (``mlx_lm.load(base, adapter_path=DIR/NAME)``);
* ``gguf-lora``: ``DIR/NAME.gguf``, llama.cpp's LoRA adapter for the base's GGUF
  (``llama-cli -m base.gguf --lora DIR/NAME.gguf``, Ollama's ``ADAPTER``);
* ``fused``: ``DIR/NAME/``, a Hugging Face checkpoint of the base with the adapter merged
  in, written only after its logits, re-loaded from disk, match base + adapter.

Every export goes to a temp directory that becomes ``DIR`` at the end (nothing is left
by a failed one) and records itself in ``DIR/export.json``.

Modules: ``source`` (which adapters, which base), ``gguf_lora`` (the GGUF LoRA writer),
``fused`` (fuse, save, check), ``outdir`` (the all-or-nothing directory), ``api``.
"""

from .api import RECORD_FILE, TARGETS, ExportResult, export, export_adapters, export_source
from .fused import FusedCheck
from .gguf_lora import write_gguf_lora

__all__ = ["RECORD_FILE", "TARGETS", "ExportResult", "FusedCheck", "export", "export_adapters", "export_source",
           "write_gguf_lora"]
