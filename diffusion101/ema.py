"""Exponential moving average of the weights (Polyak averaging), used for sampling.

shadow <- d * shadow + (1 - d) * weights after every optimizer step, with the warm-up
d = min(decay, (1 + step) / (10 + step)): early on the weights move fast, and an average over
a long window would keep mixing in the random initialisation, so a short run would sample
from weights that are still mostly noise. Buffers (such as BatchNorm's running statistics) are
copied, since averaging counters makes no sense. The same average can be rebuilt after
training, for any decay, from snapshots of the weights (posthoc_ema.py).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def decay_at(decay: float, step: int) -> float:
    """The decay of update number `step` (0-based): `decay`, less during the warm-up."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return decay_at(self.decay, step)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step number `step` (0-based)."""
        d = self.decay_at(step)
        shadow = list(self.model.parameters())
        live = [p.detach() for p in model.parameters()]
        # lerp: shadow + (1 - d) * (live - shadow) == d * shadow + (1 - d) * live
        torch._foreach_lerp_(shadow, live, 1.0 - d)
        for s, b in zip(self.model.buffers(), model.buffers()):
            s.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()
