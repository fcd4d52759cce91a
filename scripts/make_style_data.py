"""Write the built-in LoRA style target, bold MNIST, as an ImageFolder.

The same as the `diffusion101-make-style-data` command; `python scripts/make_style_data.py --help` lists the flags."""
import sys

from diffusion101.cli import run_cli
from diffusion101.commands import make_style_data as main

if __name__ == "__main__":
    sys.exit(run_cli(main))
