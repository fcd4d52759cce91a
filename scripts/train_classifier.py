"""Train the evaluation classifier and store it with the FID reference statistics.

The same as the `diffusion101-train-classifier` command; `python scripts/train_classifier.py --help` lists the flags."""
import sys

from diffusion101.entry import train_classifier_command as main

if __name__ == "__main__":
    sys.exit(main())
