"""Cross-attention: image pixels attend to the class-label tokens (Stable Diffusion's mechanism)."""
import math

import torch
from torch import nn


class CrossAttention(nn.Module):
    """Pixels are queries, the label tokens keys and values; then a Transformer-style FFN.

    Attention -> residual + LayerNorm -> FFN -> residual + LayerNorm, LayerNorm over channels
    per pixel. With one label token (the reference) the softmax runs over a single key and is
    always 1: the output is then a per-class vector and w_q, w_k have no effect.
    """

    def __init__(self, channels: int, q_dim: int, v_dim: int, ffn_dim: int, cls_dim: int):
        super().__init__()
        self.q_dim = q_dim
        self.w_q = nn.Linear(channels, q_dim)
        self.w_k = nn.Linear(cls_dim, q_dim)
        self.w_v = nn.Linear(cls_dim, v_dim)
        self.z_linear = nn.Linear(v_dim, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.feedforward = nn.Sequential(
            nn.Linear(channels, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, channels))
        self.norm2 = nn.LayerNorm(channels)

    def attention(self, pixels: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """How much each pixel attends to each label token: softmax(Q K^T / sqrt(q_dim)).
        pixels: (B, HW, C), one token per pixel; context: (B, L, cls_dim). Returns (B, HW, L),
        each row summing to 1 (with L = 1, every entry is 1)."""
        q = self.w_q(pixels)  # (B, HW, q)
        k = self.w_k(context)  # (B, L, q)
        return torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.q_dim), dim=-1)

    def attend(self, pixels: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """softmax(Q K^T / sqrt(q_dim)) V: what each pixel takes from the label tokens,
        (B, HW, v_dim)."""
        return self.attention(pixels, context) @ self.w_v(context)  # (B, HW, L) @ (B, L, v)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) image features; context: (B, L, cls_dim) label tokens (L = 1 in reference)
        b, c, h, w = x.shape
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C): one token per pixel
        z = self.norm1(self.z_linear(self.attend(x, context)) + x)  # back to C channels, residual
        out = self.norm2(self.feedforward(z) + z)
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2)  # back to (B, C, H, W)
