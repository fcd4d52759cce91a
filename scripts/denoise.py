"""Generate digits from a checkpoint: a grid PNG and the denoising progression beside it.

The same as the `diffusion101-sample` command; `python scripts/denoise.py --help` lists the flags."""
import sys

from diffusion101.cli import run_cli
from diffusion101.commands import sample as main

if __name__ == "__main__":
    sys.exit(run_cli(main))
