"""The UNet's building blocks: the reference's two conv layers with the timestep added between
them, or a residual variant; each followed by cross-attention on the label tokens."""
import math

from torch import nn
from torch.nn import functional as F

from .config import ModelConfig
from .cross_attn import CrossAttention


def make_attention(channels: int, cfg: ModelConfig, attention: bool):
    """The block's cross-attention on the label tokens, or None where the level has none."""
    return CrossAttention(channels, cfg.q_dim, cfg.v_dim, cfg.ffn_dim, cfg.cls_emb_dim) \
        if attention else None


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    # GroupNorm: the same statistics in training and sampling, so no train/eval gap and
    # nothing for an EMA copy of the weights to get out of step with.
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ConvBlock(nn.Module):
    """The reference block: conv-norm-ReLU, + ReLU(Linear(t_emb)) per channel, conv-norm-ReLU.
    cfg gives the sizes of the timestep embedding and the attention, and the norm."""

    def __init__(self, in_ch: int, out_ch: int, cfg: ModelConfig, attention: bool = True):
        super().__init__()
        self.seq1 = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1), make_norm(cfg.norm, out_ch), nn.ReLU())
        self.time_emb_linear = nn.Linear(cfg.time_emb_dim, out_ch)
        self.relu = nn.ReLU()
        self.seq2 = nn.Sequential(
            nn.Conv2d(out_ch, out_ch, 3, padding=1), make_norm(cfg.norm, out_ch), nn.ReLU())
        self.crossattn = make_attention(out_ch, cfg, attention)

    def forward(self, x, t_emb, context):
        # x: (B, in, H, W); t_emb: (B, time_emb_dim); context: (B, L, cls_dim)
        x = self.seq1(x)  # (B, out, H, W)
        x = x + self.relu(self.time_emb_linear(t_emb))[:, :, None, None]  # per-channel shift
        x = self.seq2(x)
        return x if self.crossattn is None else self.crossattn(x, context)


class ResBlock(nn.Module):
    """The residual block of later DDPM UNets (Ho et al. 2020; Dhariwal & Nichol 2021):
    x + conv(SiLU(norm(.))) twice, the timestep scaling and shifting the normalised features
    between the convs. The skip lets the input through unchanged, so an image's brightness
    survives the per-image statistics of GroupNorm."""

    def __init__(self, in_ch: int, out_ch: int, cfg: ModelConfig, attention: bool = True):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_linear = nn.Linear(cfg.time_emb_dim, 2 * out_ch)  # scale and shift
        self.norm2 = make_norm(cfg.norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # A 1x1 conv where the channel count changes, else the identity
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.crossattn = make_attention(out_ch, cfg, attention)

    def forward(self, x, t_emb, context):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        scale, shift = self.time_emb_linear(F.silu(t_emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift  # scale 0 at init would still pass features on
        h = self.conv2(F.silu(h))
        x = self.skip(x) + h
        return x if self.crossattn is None else self.crossattn(x, context)


BLOCKS = {"reference": ConvBlock, "residual": ResBlock}
