"""Score a checkpoint or an npz of samples: conditional accuracy and FID (classifier features).

The same as the `diffusion101-evaluate` command; `python scripts/evaluate.py --help` lists the flags."""
import sys

from diffusion101.entry import evaluate_command as main

if __name__ == "__main__":
    sys.exit(main())
