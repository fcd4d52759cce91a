"""The noise schedule, as an object apart from the network (the diffusers pattern).

A scheduler knows the betas and nothing about the UNet:
- ``add_noise(x0, noise, t)``: the closed-form forward process q(x_t | x_0), for training;
- ``set_timesteps(n)``, ``timesteps``, ``step(eps, t, x_t, generator)``: the reverse process.
"""
from __future__ import annotations

import torch

from .config import DiffusionConfig


def extract(a: torch.Tensor, t: torch.Tensor, shape) -> torch.Tensor:
    """Gather a[t] per batch element and reshape to (B, 1, 1, ...) to broadcast over `shape`."""
    return a.gather(0, t).reshape(t.shape[0], *([1] * (len(shape) - 1)))


class DDPMScheduler:
    """Ho et al. (2020): linear betas, posterior q(x_{t-1} | x_t, x_0) with variance beta-tilde."""

    def __init__(self, cfg: DiffusionConfig, device="cpu"):
        self.cfg = cfg
        self.num_train_timesteps = cfg.timesteps
        # Computed in float64 (the cumulative product loses digits in float32), stored float32.
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        posterior_var = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        as32 = dict(dtype=torch.float32, device=device)
        self.betas = betas.to(**as32)
        self.alphas = alphas.to(**as32)
        self.alpha_bar = alpha_bar.to(**as32)
        self.alpha_bar_prev = alpha_bar_prev.to(**as32)
        self.posterior_var = posterior_var.to(**as32)
        self.sqrt_alpha_bar = alpha_bar.sqrt().to(**as32)
        self.sqrt_one_minus_alpha_bar = (1.0 - alpha_bar).sqrt().to(**as32)
        # Coefficient of eps in the posterior mean: (1 - alpha_t) / sqrt(1 - alpha_bar_t) / sqrt(alpha_t)
        self.eps_coef = ((1.0 - alphas) / (1.0 - alpha_bar).sqrt()).to(**as32)
        self.inv_sqrt_alpha = (1.0 / alphas.sqrt()).to(**as32)
        self.posterior_std = posterior_var.sqrt().to(**as32)
        self.timesteps = torch.arange(cfg.timesteps - 1, -1, -1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, with t of shape (B,)."""
        return (extract(self.sqrt_alpha_bar, t, x0.shape) * x0
                + extract(self.sqrt_one_minus_alpha_bar, t, x0.shape) * noise)

    def set_timesteps(self, num_inference_steps: int) -> None:
        # Ancestral DDPM visits every training step; a shorter walk needs another sampler.
        if num_inference_steps != self.num_train_timesteps:
            raise ValueError(f"DDPM samples with all {self.num_train_timesteps} steps, "
                             f"not {num_inference_steps}")
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1)

    def step(self, eps: torch.Tensor, t: int, x_t: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One reverse step x_t -> x_{t-1} for a whole batch at the same timestep t."""
        t = int(t)
        mean = self.inv_sqrt_alpha[t] * (x_t - self.eps_coef[t] * eps)
        if t > 0:  # no noise on the last step: x_0 is the mean
            z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
            mean = mean + self.posterior_std[t] * z
        if self.cfg.clip == "x_t":
            mean = mean.clamp(-1.0, 1.0)  # the reference clamps x_t at every step
        return mean

    def to(self, device) -> "DDPMScheduler":
        return DDPMScheduler(self.cfg, device=device)
