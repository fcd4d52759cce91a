"""What drawing labels balanced (10% of each digit) instead of in MNIST's own proportions does to
FID: real training digits drawn balanced, scored against the test set, beside the floor the
classifier file already holds for random draws of the same size (docs/EVALUATION.md).

  python benchmarks/label_mix.py --n 10000
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion101.classifier import FLOOR_SIZES  # noqa: E402
from diffusion101.dataset import load_mnist  # noqa: E402
from diffusion101.classifier import classify  # noqa: E402
from diffusion101.evaluate import load_classifier, uint8_to_unit  # noqa: E402
from diffusion101.fid import feature_stats, frechet_distance  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, choices=FLOOR_SIZES,
                   help="a size whose random-draw floor the classifier file holds")
    a = p.parse_args()
    clf, blob = load_classifier()
    train = load_mnist(train=True, img_size=28)
    _, feats = classify(clf, uint8_to_unit(train.images))
    by_digit = [torch.nonzero(train.labels == d).flatten() for d in range(10)]
    print("| draw | random digits (MNIST's proportions: the floor) | balanced digits |")
    print("|---|---|---|")
    for draw, floor in enumerate(blob["floor"][a.n]["draws"]):
        g = torch.Generator().manual_seed(draw)
        balanced = torch.cat([idx[torch.randperm(len(idx), generator=g)[:a.n // 10]] for idx in by_digit])
        fid = frechet_distance(*feature_stats(feats[balanced]), blob["test_mu"], blob["test_sigma"])
        print(f"| {draw} | {floor:.3f} | {fid:.3f} |", flush=True)


if __name__ == "__main__":
    main()
