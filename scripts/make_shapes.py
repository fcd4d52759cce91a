"""Write a toy labelled set that is not MNIST: coloured shapes, RGB, one folder per shape.

The same as the `diffusion101-make-shapes` command; `python scripts/make_shapes.py --help` lists the flags."""
import sys

from diffusion101.cli import run_cli
from diffusion101.commands import make_shapes as main

if __name__ == "__main__":
    sys.exit(run_cli(main))
