"""The network a config names (model.backbone), built in this one place: training, sampling,
LoRA, export, memory estimates and the API all take whatever it returns. A backbone is an
nn.Module built from a ModelConfig, called as net(x_t, t, y) -> output of x_t's shape, with
`cfg` and `null_label` attributes."""
from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .dit import DiT
from .unet import UNet

BACKBONES = {"unet": UNet, "dit": DiT}


def build_network(m: ModelConfig) -> nn.Module:
    return BACKBONES[m.backbone](m)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
