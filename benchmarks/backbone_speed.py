"""Seconds per training step of the `cpu` preset's UNet and of transformers of given shapes, on
one fixed MNIST batch of 128 at 28 px: flow matching's loss, forward, backward and AdamW,
the median of 7 steps after 2 (docs/EXPERIMENTS.md, "A transformer beside the UNet").

  python benchmarks/backbone_speed.py 128,8,4,4 128,6,2,4   # width,depth,patch,heads each
"""
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion101.dataset import load_mnist  # noqa: E402
from diffusion101.denoise import make_objective  # noqa: E402
from diffusion101.networks import build_network, count_parameters  # noqa: E402
from diffusion101.presets import get_preset  # noqa: E402
from diffusion101.train import diffusion_loss  # noqa: E402


def main(shapes) -> None:
    x0, y = load_mnist(train=True, img_size=28).batch(torch.arange(128))
    base = get_preset("cpu")
    variants = {"unet (cpu)": {}}
    for shape in shapes:
        w, d, p, h = (int(v) for v in shape.split(","))
        variants[f"dit {shape}"] = dict(backbone="dit", width=w, depth=d, patch_size=p, heads=h)
    for name, changes in variants.items():
        torch.manual_seed(0)
        net = build_network(dataclasses.replace(base.model, **changes))
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        objective, g = make_objective(base.diffusion), torch.Generator().manual_seed(0)
        times = []
        for _ in range(9):
            start = time.perf_counter()
            loss = diffusion_loss(net, objective, (x0, y), g, base.train)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        median = sorted(times[2:])[len(times[2:]) // 2]
        print(f"{name:>16}: {count_parameters(net):>9,} parameters, {median:.3f} s per step")


if __name__ == "__main__":
    main(sys.argv[1:])
