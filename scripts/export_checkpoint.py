"""Write a small sampling-only copy of a checkpoint (EMA weights and config).

The same as the `diffusion101-export` command; `python scripts/export_checkpoint.py --help` lists the flags."""
import sys

from diffusion101.entry import export_command as main

if __name__ == "__main__":
    sys.exit(main())
