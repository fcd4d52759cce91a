"""Train the class-conditioned DDPM: python scripts/train.py --preset cpu

The same as the `diffusion101-train` command; `python scripts/train.py --help` lists the flags."""
import sys

from diffusion101.cli import run_cli
from diffusion101.commands import train as main

if __name__ == "__main__":
    sys.exit(run_cli(main))
