"""Train one LoRA adapter on one domain of the built-in corpus, save it in both layouts,
and compare it with the base on held-out data. Runs in ~10 s on a laptop CPU.

    python examples/train_one_adapter.py [OUT_DIR]
"""

import sys
import tempfile
from pathlib import Path

import mozgach_mlx as mz
from mozgach_mlx import data, synthetic
from mozgach_mlx.rundir import SYNTHETIC_RUN_LORA, SYNTHETIC_RUN_TRAIN

out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="mozgach_example_"))
corpus = synthetic.write_corpus(out / "data", n_domains=3)
domain = data.discover_domains(corpus)[0]

model, tok = mz.load("tiny", quantize=4)  # QLoRA: 4-bit base
# the synthetic built-in run's short schedule (the seed's defaults are for real models)
cfg = mz.TrainConfig(**SYNTHETIC_RUN_TRAIN, lora=mz.LoRAConfig(**SYNTHETIC_RUN_LORA))
splits = data.load_domain(domain, tok, cfg.max_seq_length)

# base_loss=True: also the fresh adapter's loss (B = 0: exactly the base) before training
result = mz.train_adapter(model, tok, splits, cfg, out / domain.name, base_loss=True)
print(f"{domain.name}: base {result.base_valid_loss:.3f} -> adapter {result.valid_loss:.3f} (valid loss), "
      f"{result.tokens} tokens in {result.seconds:.1f} s; saved to {out / domain.name}")
