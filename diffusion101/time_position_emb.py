"""Sinusoidal timestep embedding ("Attention Is All You Need", section 3.5), for diffusion steps."""
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
        angles = t.float()[:, None] * self.freqs[None, :]  # (B, half)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, dim)
