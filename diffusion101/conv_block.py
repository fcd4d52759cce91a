"""The UNet's building block: two conv layers, the timestep added between them, then cross-attention."""
import math

from torch import nn

from .cross_attn import CrossAttention


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    # GroupNorm: the same statistics in training and sampling, so no train/eval gap and
    # nothing for an EMA copy of the weights to get out of step with.
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_emb_dim: int, q_dim: int, v_dim: int,
                 ffn_dim: int, cls_dim: int, norm: str = "batch"):
        super().__init__()
        self.seq1 = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1), make_norm(norm, out_ch), nn.ReLU())
        self.time_emb_linear = nn.Linear(time_emb_dim, out_ch)
        self.relu = nn.ReLU()
        self.seq2 = nn.Sequential(
            nn.Conv2d(out_ch, out_ch, 3, padding=1), make_norm(norm, out_ch), nn.ReLU())
        self.crossattn = CrossAttention(out_ch, q_dim, v_dim, ffn_dim, cls_dim)

    def forward(self, x, t_emb, context):
        # x: (B, in, H, W); t_emb: (B, time_emb_dim); context: (B, L, cls_dim)
        x = self.seq1(x)  # (B, out, H, W)
        x = x + self.relu(self.time_emb_linear(t_emb))[:, :, None, None]  # per-channel shift
        x = self.seq2(x)
        return self.crossattn(x, context)
