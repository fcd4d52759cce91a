"""Rebuild the EMA of any decay from a run's weight snapshots (post-hoc EMA).

The same as the `diffusion101-posthoc-ema` command; `python scripts/posthoc_ema.py --help` lists the flags."""
import sys

from diffusion101.entry import posthoc_ema_command as main

if __name__ == "__main__":
    sys.exit(main())
