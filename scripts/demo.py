"""Build the demo page (the shipped student in a browser) and serve it on 127.0.0.1.

The same as the `diffusion101-demo` command; `python scripts/demo.py --help` lists the flags."""
import sys

from diffusion101.entry import demo_command as main

if __name__ == "__main__":
    sys.exit(main())
