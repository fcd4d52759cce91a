"""Seconds per training step of the `cpu` preset's UNet and of transformers of given shapes, on
one fixed MNIST batch of 128 at 28 px: flow matching's loss, forward, backward and AdamW,
the median of 7 steps after 2 (docs/EXPERIMENTS.md, "A transformer beside the UNet").

  python benchmarks/backbone_speed.py 128,8,4,4 128,6,2,4   # width,depth,patch,heads each
"""
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusion101.dataset import load_mnist  # noqa: E402
from diffusion101.presets import get_preset  # noqa: E402
from objective_speed import seconds_per_step  # noqa: E402  (the same timed loop)


def main(shapes) -> None:
    x0, y = load_mnist(train=True, img_size=28).batch(torch.arange(128))
    base = get_preset("cpu")
    variants = {"unet (cpu)": {}}
    for shape in shapes:
        w, d, p, h = (int(v) for v in shape.split(","))
        variants[f"dit {shape}"] = dict(backbone="dit", width=w, depth=d, patch_size=p, heads=h)
    for name, changes in variants.items():
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, **changes))
        median, params = seconds_per_step(cfg, x0, y, warmup=2, timed=7)
        print(f"{name:>16}: {params:>9,} parameters, {median:.3f} s per step")


if __name__ == "__main__":
    main(sys.argv[1:])
