"""Train the class-conditioned DDPM: python scripts/train.py --preset cpu

The same as the `diffusion101-train` command; `python scripts/train.py --help` lists the flags."""
import sys

from diffusion101.entry import train_command as main

if __name__ == "__main__":
    sys.exit(main())
