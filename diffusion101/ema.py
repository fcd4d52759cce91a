"""Exponential moving average of the weights (Polyak averaging), used for sampling.

shadow <- decay * shadow + (1 - decay) * weights after every optimizer step; buffers (such as
BatchNorm's running statistics) are copied, since averaging counters makes no sense.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        shadow = list(self.model.parameters())
        live = [p.detach() for p in model.parameters()]
        # lerp: shadow + (1 - decay) * (live - shadow) == decay * shadow + (1 - decay) * live
        torch._foreach_lerp_(shadow, live, 1.0 - self.decay)
        for s, b in zip(self.model.buffers(), model.buffers()):
            s.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
