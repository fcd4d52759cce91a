"""The evaluation classifier's chunk size: seconds to classify the 10,000 test digits in chunks
of each size, alternating sizes over repeats so that a slower moment of the machine falls on
all of them alike; the features of every size against those of the first.

  python benchmarks/classify_batch.py --sizes 1000,100 --repeats 2
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion101.classifier import classify  # noqa: E402
from diffusion101.dataset import load_mnist  # noqa: E402
from diffusion101.evaluate import load_classifier, uint8_to_unit  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,100")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    clf, _ = load_classifier()
    x = uint8_to_unit(load_mnist(train=False).images)
    seconds, feats = {s: [] for s in sizes}, {}
    for _ in range(a.repeats):
        for s in sizes:
            start = time.perf_counter()
            _, feats[s] = classify(clf, x, s)
            seconds[s].append(time.perf_counter() - start)
    print(f"{torch.get_num_threads()} threads, {len(x)} digits")
    print("| chunk | seconds (each repeat) | best, against the first size | features, max abs diff |")
    print("|---|---|---|---|")
    for s in sizes:
        diff = (feats[s] - feats[sizes[0]]).abs().max().item()
        print(f"| {s} | {', '.join(f'{t:.2f}' for t in seconds[s])} | "
              f"{min(seconds[sizes[0]]) / min(seconds[s]):.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
