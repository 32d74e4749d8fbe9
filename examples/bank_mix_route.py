"""Hold several adapters over one base at once: switch per call, mix exactly, route a text.

    python examples/bank_mix_route.py RUN_DIR      # a directory made by `mozgach train`
"""

import sys
from pathlib import Path

import mozgach_mlx as mz
from mozgach_mlx.rundir import load_run_base, read_manifest

run = Path(sys.argv[1] if len(sys.argv) > 1 else "mozgach108")
dirs = sorted(p for p in run.glob("mozgach108_*") if (p / "adapter_config.json").exists())[:6]
if not dirs:
    sys.exit(f"no adapters under {run}; run `python -m mozgach_mlx.train` first")
model, tok = load_run_base(read_manifest(run))  # the base the run was trained over, as it was loaded
bank = mz.AdapterBank(model, tok, dirs)
names = [d.name for d in dirs]
text = (run / "builtin_data").glob("001_*/valid.jsonl").__next__().read_text().splitlines()[0]

print("loss of a domain-1 text under each adapter:")
for n in names:
    print(f"  {n}: {bank.loss(text, adapter=n):.3f}")
print("base:", round(bank.loss(text), 3), " 50/50 mix of the first two:",
      round(bank.loss(text, adapter=bank.mix({names[0]: 0.5, names[1]: 0.5})), 3))
print("routed to:", bank.route(text, top_k=2))
print("generation with", names[0], ":", repr(bank.generate("", adapter=names[0], max_tokens=40)))
