"""``python -m mozgach_mlx.train``: train the fleet (with no arguments: the built-in default,
12 adapters over the pretrained tiny-stdlib base on the shipped stdlib12 corpus; ``--model tiny``:
the random tiny model on the synthetic 108-domain corpus). Same options as ``mozgach train``."""

from mozgach_mlx.cli import train_cmd

if __name__ == "__main__":
    train_cmd(prog_name="python -m mozgach_mlx.train")
