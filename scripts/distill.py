"""Distill a teacher checkpoint into a few-step student (rectified-flow distillation).

The same as the `diffusion101-distill` command; `python scripts/distill.py --help` lists the flags."""
import sys

from diffusion101.entry import distill_command as main

if __name__ == "__main__":
    sys.exit(main())
