"""The Python API, for notebooks and scripts of one's own:

    import diffusion101 as d
    model = d.load()  # the shipped checkpoint; d.load("model.pt") for one's own
    images = d.sample(model, digits=[3, 7], n=4, steps=20, guidance=2.0, seed=0)
    images.shape  # (8, 28, 28): float in [0, 1], digits 3, 7, 3, 7, ...

The same seed and options give the same digits as scripts/denoise.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from os import PathLike

import torch
from torch import nn

from .config import SEED_MAX, Config, UserError
from .denoise import load_for_sampling, resolve_sampler, sample_digits
from .diffusion import sampler_for
from .images import to_unit
from .models import default_checkpoint


@dataclass
class Model:
    """A checkpoint ready to sample: the network (in eval mode) and the config it came with,
    whose `sample` section holds the sampler defaults."""
    unet: nn.Module
    config: Config
    device: torch.device


def load(path=None, device: str = "cpu", loras=(), use_ema: bool | None = None) -> Model:
    """A checkpoint for sampling. path None: model.pt in the working folder, else the shipped
    one. loras: adapter files, or (file, strength) pairs, merged into the weights. use_ema
    None: the checkpoint's own choice."""
    pairs = [(spec, 1.0) if isinstance(spec, (str, PathLike)) else tuple(spec) for spec in loras]
    for path, strength in pairs:
        if not (isinstance(strength, (int, float)) and -100 <= strength <= 100):  # NaN fails too
            raise UserError(f"LoRA strength for {path} must be a number in [-100, 100], "
                            f"not {strength!r}")
    unet, cfg = load_for_sampling(default_checkpoint(path, log=lambda *a: None), device, pairs,
                                  use_ema, log=lambda *a: None)
    return Model(unet, cfg, torch.device(device))


def sample(model: Model, digits=range(10), n: int = 1, seed: int = 0, sampler: str | None = None,
           steps: int | None = None, guidance: float | None = None, guidance_interval=None,
           eta: float | None = None, grid: str | None = None) -> torch.Tensor:
    """n images of each digit, (n * len(digits), S, S) in [0, 1], ordered like the grid of
    scripts/denoise.py: repetition k of every digit, then repetition k + 1. The sampler options
    left at None keep the checkpoint's defaults (model.config.sample)."""
    digits = list(digits)
    classes = model.config.model.num_classes
    if not digits or not all(isinstance(d, int) and 0 <= d < classes for d in digits):
        raise UserError(f"digits must be a non-empty list of labels in 0-{classes - 1}, not {digits}")
    if not (isinstance(n, int) and n >= 1) or not (isinstance(seed, int) and 0 <= seed <= SEED_MAX):
        raise UserError(f"n must be an integer >= 1 and seed one in [0, {SEED_MAX}]; got n={n}, "
                        f"seed={seed}")
    sc = resolve_sampler(model.config, sampler=sampler, steps=steps, guidance=guidance,
                         guidance_interval=guidance_interval, eta=eta, grid=grid)
    scheduler = sampler_for(sc, model.config.diffusion, model.device)
    images, _ = sample_digits(model.unet, scheduler, digits, n, seed, model.device,
                              guidance=sc.guidance, guidance_interval=sc.guidance_interval)
    return to_unit(images)[:, 0]
