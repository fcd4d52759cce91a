"""The diffusion transformer f_theta(x_t, t, y) (Peebles and Xie 2023, "DiT"): the image cut
into patches, each patch a token, N transformer blocks, and the tokens put back as an image.

- Patches: an S x S image with patch size p is (S/p)^2 tokens of C p^2 numbers each (patchify),
  each mapped to the model's width and given a fixed 2-D sine-cosine position; unpatchify is
  the exact inverse of patchify.
- The time: adaLN-Zero. The timestep embedding sets, per block, a shift, a scale and a gate
  for the attention and for the MLP; the gates start at zero, so every new block is the
  identity and the network starts by predicting zero.
- The label: joint attention. The label's tokens (model.cond_tokens of them, a learned row per
  class and one for the null label) join the patch tokens in one self-attention, as Stable
  Diffusion 3's MMDiT joins text and image tokens (with one set of weights for both, where
  MMDiT keeps two). Each patch's softmax then weighs the label against the other patches in
  one place, which a reader can draw (attention_to_label); the UNet's cross-attention, by
  contrast, can only ever attend to the label. The attention's w_q, w_k, w_v are named as the
  UNet's, so LoRA's default targets adapt the transformer unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .time_position_emb import TimePositionEmbedding, embed_time


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, (S/p)^2, C p^2): patches in row-major order, each flattened
    channel-first."""
    b, c, s, _ = x.shape
    n = s // p
    x = x.reshape(b, c, n, p, n, p).permute(0, 2, 4, 1, 3, 5)  # (B, row, col, C, p, p)
    return x.reshape(b, n * n, c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """(B, (S/p)^2, C p^2) -> (B, C, S, S): the inverse of patchify."""
    b, count, _ = tokens.shape
    n = math.isqrt(count)
    x = tokens.reshape(b, n, n, channels, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, row, p, col, p)
    return x.reshape(b, channels, n * p, n * p)


def position_embedding(side: int, width: int) -> torch.Tensor:
    """(side^2, width) fixed 2-D sine-cosine positions: half the width encodes the row, half
    the column, each as sines then cosines of geometrically spaced frequencies."""
    quarter = width // 4
    freqs = torch.exp(-torch.arange(quarter, dtype=torch.float64) * math.log(10000.0) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angles = coord[:, None].double() * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, width - emb.shape[1])).float()  # a width not divisible by 4: zeros


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: the normalised tokens scaled and shifted per image, (B, N, W) by (B, W)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class JointAttention(nn.Module):
    """Multi-head self-attention over the label tokens and the patch tokens together."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.w_q = nn.Linear(width, width)
        self.w_k = nn.Linear(width, width)
        self.w_v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape  # (B, N, W) -> (B, heads, N, W / heads)
        return x.view(b, n, self.heads, w // self.heads).transpose(1, 2)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d)) per head: (B, heads, N, N), each row summing to 1."""
        q, k = self.split(self.w_q(x)), self.split(self.w_k(x))
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.w_q(x)), self.split(self.w_k(x)), self.split(self.w_v(x))
        z = F.scaled_dot_product_attention(q, k, v)  # the weights above, times V, fused
        return self.out(z.transpose(1, 2).reshape(x.shape))


class DiTBlock(nn.Module):
    """x + gate * attention(adaLN(x)), then x + gate * MLP(adaLN(x)); the six adaLN numbers
    per channel come from the time embedding through a zero-initialised Linear."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = JointAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.ada[1].weight)  # adaLN-Zero: every gate starts at 0
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """Patchify, add positions, prepend the label tokens, N blocks, drop the label tokens,
    a final adaLN and Linear (zero-initialised) per patch, unpatchify."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        w, p = cfg.width, cfg.patch_size
        self.null_label = cfg.num_classes if cfg.null_class else None
        self.patch_in = nn.Linear(cfg.in_channels * p * p, w)
        self.register_buffer("pos", position_embedding(cfg.img_size // p, w), persistent=False)
        def time_layers():
            return nn.Sequential(TimePositionEmbedding(cfg.time_emb_dim),
                                 nn.Linear(cfg.time_emb_dim, w), nn.SiLU(), nn.Linear(w, w))
        self.time_emb = time_layers()
        self.interval_emb = time_layers() if cfg.interval_input else None  # MeanFlow's t - r
        self.cls_emb = nn.Embedding(cfg.num_classes + int(cfg.null_class), w * cfg.cond_tokens)
        self.blocks = nn.ModuleList(DiTBlock(w, cfg.heads) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.patch_out = nn.Linear(w, cfg.in_channels * p * p)
        for layer in (self.ada_out[1], self.patch_out):  # the network starts at zero
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def tokens(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """(label and patch tokens, time embedding) before the first block."""
        labels = self.cls_emb(y).view(y.shape[0], self.cfg.cond_tokens, self.cfg.width)
        patches = self.patch_in(patchify(x, self.cfg.patch_size)) + self.pos
        return torch.cat([labels, patches], dim=1), embed_time(self.time_emb, self.interval_emb, t)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x: (B, C, S, S) noisy images; t: (B,) times as the objective feeds them (or (B, 2)
        # with the interval: model.interval_input); y: (B,) labels
        h, c = self.tokens(x, t, y)  # (B, L + N, W), (B, W)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(c).chunk(2, dim=1)
        h = self.patch_out(modulate(self.norm_out(h[:, self.cfg.cond_tokens:]), shift, scale))
        return unpatchify(h, self.cfg.patch_size, self.cfg.in_channels)

    @torch.no_grad()
    def attention_to_label(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, depth, N): the share of each patch's attention, per block (mean over heads),
        that goes to the label tokens; the rest goes to the patches."""
        h, c = self.tokens(x, t, y)
        shares = []
        for block in self.blocks:
            shift1, scale1 = block.ada(c).chunk(6, dim=1)[:2]
            weights = block.attn.weights(modulate(block.norm1(h), shift1, scale1))
            labels = self.cfg.cond_tokens
            shares.append(weights[:, :, labels:, :labels].sum(-1).mean(1))  # (B, N)
            h = block(h, c)
        return torch.stack(shares, dim=1)
