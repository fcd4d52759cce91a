"""LoRA (Hu et al., 2021) for the cross-attention projections.

y = base(x) + x @ (A @ B) * alpha / r, with A: (in, r) kaiming-uniform and B: (r, out) zeros,
so a freshly injected model computes exactly what the base computes. Merging folds
(A @ B)^T * alpha / r into the base weight; unmerging subtracts it back.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .cross_attn import CrossAttention


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.r = r
        self.alpha = alpha
        self.scale = alpha / r
        self.lora_a = nn.Parameter(torch.empty(base.in_features, r))
        self.lora_b = nn.Parameter(torch.zeros(r, base.out_features))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        # (out, in), the shape of nn.Linear's weight; float32 whatever the parameters' dtype
        return (self.lora_a.float() @ self.lora_b.float()).T * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:  # the update already sits in base.weight
            return y
        return y + (x @ self.lora_a @ self.lora_b) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False


def lora_layers(model: nn.Module):
    """(name, LoRALinear) for every adapter in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def inject_lora(model: nn.Module, r: int, alpha: float, targets=("w_q", "w_k", "w_v")) -> int:
    """Wrap each Linear named in `targets` inside every CrossAttention; freeze everything else.

    Returns the number of wrapped layers. Only lora_a / lora_b require grad afterwards.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for module in model.modules():
        if not isinstance(module, CrossAttention):
            continue
        for name in targets:
            layer = getattr(module, name, None)
            if isinstance(layer, nn.Linear):
                setattr(module, name, LoRALinear(layer, r, alpha))
                wrapped += 1
    return wrapped


def lora_state_dict(model: nn.Module) -> dict:
    """Only the adapter tensors, keyed by their names in the model."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.endswith(".lora_a") or k.endswith(".lora_b")}


def merge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def apply_lora_file(model: nn.Module, adapter: dict, base_fingerprint: str, where: str) -> None:
    """Inject the adapter's layers into `model` and load its tensors, after checking that it
    was trained on this very base (same fingerprint) and that every tensor has its layer."""
    from .config import UserError
    if adapter["base_fingerprint"] != base_fingerprint:
        raise UserError(f"{where} was trained on another base model (fingerprint "
                        f"{adapter['base_fingerprint'][:12]}..., this base is "
                        f"{base_fingerprint[:12]}...)")
    lc = adapter["lora_config"]
    inject_lora(model, r=int(lc["r"]), alpha=float(lc["alpha"]), targets=tuple(lc["targets"]))
    own = {k for k in model.state_dict() if k.endswith(".lora_a") or k.endswith(".lora_b")}
    if set(adapter["lora"]) != own:
        missing = sorted(set(adapter["lora"]) ^ own)[:1]
        raise UserError(f"{where} does not fit this model's layers (first mismatch: {missing})")
    try:
        model.load_state_dict(adapter["lora"], strict=False)
    except RuntimeError:
        raise UserError(f"{where} has tensors of the wrong shape for this model") from None
