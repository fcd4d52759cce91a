"""The objective's contract: what training and sampling ask of DDPM (diffusion.py), flow
matching (flow.py) or any third objective, so that neither the loss nor the sampling loop
names one.

An objective knows a path from data to noise and nothing about the network. Training draws a
time per image (sample_timesteps), noises along the path (add_noise), feeds the network the
time on its own scale (net_time), and scores the output against the target (prediction_and_
target, which an objective whose target needs the network itself may override). Guidance
reads outputs through x_0 (to_x0, from_x0) and measures its interval on the fraction of the
path a time stands at (time_fraction). `samplers` maps each sampler name this objective takes
to its class; every sampler is built the same way, `cls.from_config(diffusion_cfg,
sample_cfg, device)`, then keeps the walk contract: set_timesteps(n), then step(out, t, x_t).
"""
from __future__ import annotations

import torch

from .config import UserError


class Objective:
    """The contract; subclasses fill in the path. `samplers` is set where they are defined."""

    samplers: dict = {}
    # The walk of the grids drawn during training on a CPU, where the preset's own is long:
    # a few steps of one of `samplers` (train.grid_sampling).
    preview: dict = {}

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """A training time for each of n images, drawn on the generator's device."""
        raise NotImplementedError

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time as the network is fed it."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t, the forward process at time t (one per image)."""
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What the network learns to output at (x_t, t)."""
        raise NotImplementedError

    def to_x0(self, out: torch.Tensor, t, x_t: torch.Tensor, prediction=None) -> torch.Tensor:
        """The clean image an output implies at (x_t, t)."""
        raise NotImplementedError

    def from_x0(self, x0: torch.Tensor, t, x_t: torch.Tensor) -> torch.Tensor:
        """The output that implies x0 at (x_t, t)."""
        raise NotImplementedError

    def time_fraction(self, t) -> float:
        """Where time t lies on the path, 0 at the data and 1 at the noise: the axis that
        sample.guidance_interval is measured on."""
        raise NotImplementedError

    def prediction_and_target(self, net, x0, noise, t, labels) -> tuple:
        """(the network's output, its target) for a noised batch: one forward at (x_t, t)."""
        pred = net(self.add_noise(x0, noise, t), self.net_time(t), labels)
        return pred, self.target(x0, noise, t)

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Per-image loss weights of Min-SNR-gamma, for objectives with a signal-to-noise ratio."""
        raise UserError(f"train.snr_gamma weights by a signal-to-noise ratio, which "
                        f"{type(self).__name__} does not define (set it to 0)")
