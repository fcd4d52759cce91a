"""Sinusoidal timestep embedding ("Attention Is All You Need", section 3.5), for diffusion steps."""
from __future__ import annotations

import math

import torch
from torch import nn


class TimePositionEmbedding(nn.Module):
    """Integer timesteps (B,) -> (B, dim): a block of sines then a block of cosines.

    freq_i = exp(-i ln(10000) / (half - 1)), i = 0..half-1, so the first frequency is 1 and
    the last 1/10000. The two blocks are concatenated, as the reference does; the interleaved
    layout of the Transformer paper (sin, cos, sin, cos, ...) differs by a fixed permutation,
    which the next Linear absorbs.
    """

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-torch.arange(half, dtype=torch.float64) * math.log(10000.0) / (half - 1))
        # A persistent buffer, as in the reference (which names it half_emb): it is saved with
        # the weights, so the state dict matches the reference's layout (docs/REFERENCE.md).
        self.register_buffer("freqs", freqs.float())

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]  # (B, half)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, dim)


def embed_time(time_emb: nn.Module, interval_emb: nn.Module | None, t: torch.Tensor) -> torch.Tensor:
    """A network's time embedding: time_emb(t) for times t of shape (B,), or, for a network with
    an interval input (interval_emb, model.interval_input), t of shape (B, 2), each image's
    time and the interval t - r, each embedded by its own layers and the two added (as
    MeanFlow's networks take both). Such a network given (B,) times reads an interval of 0:
    the instantaneous velocity, which Euler, Heun and a distilled student's walks ask for."""
    if interval_emb is None:
        return time_emb(t)
    if t.dim() == 1:
        t = torch.stack([t, torch.zeros_like(t)], dim=1)
    return time_emb(t[:, 0]) + interval_emb(t[:, 1])
