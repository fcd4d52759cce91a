"""Convert a trusted pickled whole-model file into a checkpoint of tensors and plain values.

The same as the `diffusion101-convert` command; `python scripts/convert_checkpoint.py --help` lists the flags."""
import sys

from diffusion101.entry import convert_command as main

if __name__ == "__main__":
    sys.exit(main())
