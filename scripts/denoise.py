"""Generate digits from a checkpoint: a grid PNG and the denoising progression beside it.

The same as the `diffusion101-sample` command; `python scripts/denoise.py --help` lists the flags."""
import sys

from diffusion101.entry import sample_command as main

if __name__ == "__main__":
    sys.exit(main())
