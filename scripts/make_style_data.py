"""Write the built-in LoRA style target, bold MNIST, as an ImageFolder.

The same as the `diffusion101-make-style-data` command; `python scripts/make_style_data.py --help` lists the flags."""
import sys

from diffusion101.entry import make_style_data_command as main

if __name__ == "__main__":
    sys.exit(main())
