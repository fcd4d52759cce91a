"""LoRA (Hu et al., 2021): low-rank adapters on Linear layers (by default the cross-attention
Q/K/V projections).

Each adapter adds x @ A @ B * alpha / r * strength, with A: (in, r) kaiming-uniform and
B: (r, out) zeros, so a freshly injected model computes exactly what the base computes. A layer
can hold several adapters (a style and a subject, say) with their own strengths. Merging folds
(A @ B)^T * alpha / r * strength into the base weight, computed in float32; unmerging puts back
the very weight that was there before, so merge/unmerge cycles cannot drift.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import UserError

DEFAULT = "default"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.lora_a = nn.ParameterDict()  # adapter name -> (in, r)
        self.lora_b = nn.ParameterDict()  # adapter name -> (r, out)
        self.scale: dict = {}  # adapter name -> alpha / r * strength
        self.merged: list = []  # names merged into base.weight, in order
        self._unmerged_weight = None  # base.weight before the first merge

    def add_adapter(self, name: str, r: int, alpha: float, strength: float = 1.0) -> None:
        a = torch.empty(self.base.in_features, r, device=self.base.weight.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_a[name] = nn.Parameter(a)
        self.lora_b[name] = nn.Parameter(torch.zeros(r, self.base.out_features,
                                                     device=self.base.weight.device))
        self.scale[name] = alpha / r * strength

    def delta_weight(self, name: str) -> torch.Tensor:
        # (out, in), the shape of nn.Linear's weight, in float32 whatever the parameters' dtype
        return (self.lora_a[name].float() @ self.lora_b[name].float()).T * self.scale[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for name in self.lora_a.keys():
            if name not in self.merged:  # a merged adapter already sits in base.weight
                y = y + (x @ self.lora_a[name] @ self.lora_b[name]) * self.scale[name]
        return y

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        w = self.base.weight
        if not self.merged:
            self._unmerged_weight = w.detach().clone()
        w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        # Restore the saved base and re-merge the others: exact, unlike subtracting in float.
        keep = [n for n in self.merged if n != name]
        self.base.weight.copy_(self._unmerged_weight)
        self.merged = []
        for n in keep:
            self.merge(n)


def lora_layers(model: nn.Module):
    """(name, LoRALinear) for every adapted layer in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _target_paths(model: nn.Module, targets):
    """Paths of the Linear layers (wrapped or not) whose path ends with one of `targets`
    ('w_q', 'crossattn.w_v', 'time_emb_linear', ...)."""
    return [path for path, module in model.named_modules()
            if isinstance(module, (nn.Linear, LoRALinear))
            and any(path == t or path.endswith("." + t) for t in targets)]


def _wrap(model: nn.Module, path: str) -> LoRALinear:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layer = getattr(parent, attr)
    if not isinstance(layer, LoRALinear):
        layer = LoRALinear(layer)
        setattr(parent, attr, layer)
    return layer


def inject_lora(model: nn.Module, r: int, alpha: float, targets=("w_q", "w_k", "w_v"),
                name: str = DEFAULT, strength: float = 1.0, freeze: bool = True) -> int:
    """Add adapter `name` to each Linear named in `targets`; freeze everything else.

    Returns the number of adapted layers. With freeze, only this adapter requires grad."""
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    paths = _target_paths(model, targets)
    for path in paths:
        _wrap(model, path).add_adapter(name, r, alpha, strength)
    return len(paths)


def lora_state_dict(model: nn.Module, name: str = DEFAULT) -> dict:
    """One adapter's tensors, keyed '<layer path>.lora_a' / '.lora_b' (independent of its name)."""
    out = {}
    for path, layer in lora_layers(model):
        if name in layer.lora_a:
            out[f"{path}.lora_a"] = layer.lora_a[name].detach().clone()
            out[f"{path}.lora_b"] = layer.lora_b[name].detach().clone()
    return out


def merge_lora(model: nn.Module, name: str | None = None) -> None:
    for _, layer in lora_layers(model):
        for n in ([name] if name else list(layer.lora_a.keys())):
            if n in layer.lora_a:
                layer.merge(n)


def unmerge_lora(model: nn.Module, name: str | None = None) -> None:
    for _, layer in lora_layers(model):
        for n in ([name] if name else list(reversed(layer.merged))):
            layer.unmerge(n)


def apply_lora_file(model: nn.Module, adapter: dict, base_fingerprint: str, where: str,
                    name: str = DEFAULT, strength: float = 1.0) -> None:
    """Add a saved adapter to `model` under `name`, after checking that it was trained on this
    very base (same fingerprint) and that this model has every layer it adapts."""
    model_part = adapter.get("config", {}).get("model", {})  # (a file's: checked as a dict)
    made_for = model_part.get("backbone", "unet") if isinstance(model_part, dict) else "unet"
    base = getattr(getattr(model, "cfg", None), "backbone", "unet")  # (a bare module: no config)
    if made_for != base:
        raise UserError(f"{where} adapts a {made_for} and this base is a {base}: an adapter "
                        f"fits only the network it was trained on")
    if adapter["base_fingerprint"] != base_fingerprint:
        raise UserError(f"{where} was trained on another base model (fingerprint "
                        f"{adapter['base_fingerprint'][:12]}..., this base is "
                        f"{base_fingerprint[:12]}...)")
    lora_config = adapter["lora_config"]
    tensors = adapter["lora"]
    layer_paths = sorted({k.rsplit(".", 1)[0] for k in tensors})
    modules = dict(model.named_modules())
    for path in layer_paths:
        layer = modules.get(path)
        if not isinstance(layer, (nn.Linear, LoRALinear)):
            raise UserError(f"{where} adapts layer '{path}', which this model does not have")
    for path in layer_paths:
        layer = _wrap(model, path)
        a, b = tensors.get(f"{path}.lora_a"), tensors.get(f"{path}.lora_b")
        if a is None or b is None or a.shape != (layer.base.in_features, int(lora_config["r"])) \
                or b.shape != (int(lora_config["r"]), layer.base.out_features):
            raise UserError(f"{where} has tensors of the wrong shape for layer '{path}'")
        layer.add_adapter(name, int(lora_config["r"]), float(lora_config["alpha"]), strength)
        with torch.no_grad():
            layer.lora_a[name].copy_(a)
            layer.lora_b[name].copy_(b)
    for p in model.parameters():
        p.requires_grad_(False)
