"""Seconds per training step of presets' objectives on one fixed MNIST batch of 128 at 28 px:
the loss (each preset's own objective and network), backward and AdamW, the median of 15 steps
after 3. A name with "+flow" trains that preset's network by flow matching instead, so that
the cost of an objective is read on the same network (docs/EXPERIMENTS.md, "One step from
scratch").

  python benchmarks/objective_speed.py cpu cpu-onestep+flow cpu-onestep
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


def seconds_per_step(cfg, x0, y, warmup: int = 3, timed: int = 15) -> tuple:
    """(the median seconds of `timed` training steps after `warmup`, the trainable
    parameters) of cfg's network and objective on the batch (x0, y)."""
    torch.manual_seed(0)
    net = build_network(cfg.model)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    objective, g = make_objective(cfg.diffusion), torch.Generator().manual_seed(0)
    times = []
    for _ in range(warmup + timed):
        start = time.perf_counter()
        loss = diffusion_loss(net, objective, (x0, y), g, cfg.train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return sorted(times[warmup:])[timed // 2], count_parameters(net)


def main(names) -> None:
    x0, y = load_mnist(train=True, img_size=28).batch(torch.arange(128))
    for name in names:
        cfg = get_preset(name.removesuffix("+flow"))
        if name.endswith("+flow"):
            cfg.diffusion = dataclasses.replace(get_preset("cpu").diffusion)
        seconds, params = seconds_per_step(cfg, x0, y)
        print(f"{name:>18} ({cfg.diffusion.objective}): {params:>9,} parameters, "
              f"{seconds:.3f} s per step")


if __name__ == "__main__":
    main(sys.argv[1:])
