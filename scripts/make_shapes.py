"""Write a toy labelled set that is not MNIST: coloured shapes, RGB, one folder per shape.

The same as the `diffusion101-make-shapes` command; `python scripts/make_shapes.py --help` lists the flags."""
import sys

from diffusion101.entry import make_shapes_command as main

if __name__ == "__main__":
    sys.exit(main())
