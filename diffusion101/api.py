"""The Python API, for notebooks and scripts of one's own:

    import diffusion101 as d
    model = d.load()  # the shipped 4-step student; d.load("model.pt") for one's own
    images = d.sample(model, classes=[3, 7], n=4, steps=20, guidance=2.0, seed=0)
    images.shape  # (8, 28, 28): float in [0, 1], digits 3, 7, 3, 7, ...
    d.sample(d.load("shapes.pt"), classes=["circle", "square"])  # a folder's, by name

The same seed and options give the same images as scripts/denoise.py.
"""
from __future__ import annotations

from os import PathLike

import torch

from . import denoise
from .config import SEED_MAX, UserError
from .generate import Pipeline, load_for_sampling, load_guide, resolve_sampler
from .images import channels_last, to_unit
from .model_files import default_checkpoint
from .classes import class_labels, class_names
from .settings import check_range, check_strength
from .speed import resolve_device

__all__ = ["Pipeline", "load", "sample"]


def load(path=None, device: str = "cpu", loras=(), use_ema: bool | None = None) -> Pipeline:
    """A checkpoint for sampling. path None: model.pt in the working folder, else the shipped
    student (with adapters, the shipped checkpoint they were trained on). loras: adapter files, or (file, strength) pairs, merged into the weights (one file
    alone may be given as it is). use_ema None: the checkpoint's own choice. A bad argument is
    a UserError (a ValueError) that names it."""
    if path is not None and not isinstance(path, (str, PathLike)):
        raise UserError(f"path: {path!r} is no path; name a checkpoint, or None for the default")
    if path is not None and not str(path).strip():
        raise UserError("path: an empty path; name a checkpoint, or None for the default")
    if use_ema is not None and not isinstance(use_ema, bool):
        raise UserError(f"use_ema must be True, False or None, not {use_ema!r}")
    adapters = adapter_list(loras)
    return load_for_sampling(default_checkpoint(path, lambda *a: None, adapters=bool(adapters)),
                             resolve_device(device), adapters, use_ema, log=lambda *a: None)


def adapter_list(loras) -> list:
    """[(path, strength), ...] from a path, or a list of paths and (path, strength) pairs."""
    if isinstance(loras, (str, PathLike)):  # one file, not a string of one-letter names
        loras = [loras]
    if not isinstance(loras, (list, tuple)):
        raise UserError(f"loras must be a list of adapter files or (file, strength) pairs, "
                        f"not {type(loras).__name__}")
    pairs = []
    for spec in loras:
        if isinstance(spec, (str, PathLike)):
            spec = (spec, 1.0)
        if not (isinstance(spec, (list, tuple)) and len(spec) == 2
                and isinstance(spec[0], (str, PathLike)) and str(spec[0]).strip()):
            raise UserError(f"loras: {spec!r} is neither an adapter file nor a (file, strength) pair")
        check_strength(str(spec[0]), spec[1])
        pairs.append((spec[0], spec[1]))
    return pairs


def sample(model: Pipeline, classes=None, n: int = 1, seed: int = 0, sampler: str | None = None,
           steps: int | None = None, guidance: float | None = None,
           guidance_rule: str | None = None, guidance_interval=None, eta: float | None = None,
           timestep_spacing: str | None = None, guide=None, **rule_options) -> torch.Tensor:
    """n images of each of `classes` (labels or class names; None: every class), float in
    [0, 1], (n * len(classes), S, S) grey or (n * len(classes), S, S, 3) RGB, ordered like the
    grid of scripts/denoise.py: repetition k of every class, then repetition k + 1. The sampler
    options left at None keep the checkpoint's defaults (model.config.sample).
    guidance_rule="auto" takes `guide`, the guide checkpoint's path; rule_options are the
    rules' other fields (apg_eta, apg_momentum, apg_norm_threshold, guide_cfg) and flow's shift."""
    if not isinstance(model, Pipeline):
        raise UserError(f"model must be what d.load() returns, not {type(model).__name__}")
    if isinstance(classes, (dict, set, frozenset, bytes, bytearray)):  # keys, a set's order or
        # a byte string's character codes: never what was meant
        raise UserError(f"classes must be a label, a name or a list of them, not a "
                        f"{type(classes).__name__}")
    if guidance_interval is not None and not (isinstance(guidance_interval, (list, tuple))
                                              and len(guidance_interval) == 2):
        raise UserError(f"guidance_interval must be a pair (lo, hi) of fractions of the walk, "
                        f"not {guidance_interval!r}")
    names = class_names(model.config.model)
    if classes is None:
        labels = list(range(len(names)))
    else:  # one class ('circle', 3) or several
        one = isinstance(classes, str) or getattr(classes, "ndim", 1) == 0 \
            or not hasattr(classes, "__iter__")
        labels = class_labels([classes] if one else list(classes), names, where="classes")
    check_range("n", n, 1, 1_000_000, integer=True)
    check_range("seed", seed, 0, SEED_MAX, integer=True)
    sample_cfg = resolve_sampler(model.config, sampler=sampler, steps=steps, guidance=guidance,
                                 guidance_rule=guidance_rule, guidance_interval=guidance_interval,
                                 eta=eta, timestep_spacing=timestep_spacing,
                                 guide=None if guide is None else str(guide), **rule_options)
    sampler = denoise.make_sampler(sample_cfg, model.config.diffusion, model.device)
    images, _ = denoise.sample(model.net, sampler, denoise.grid_labels(labels, n, model.device),
                               sample_cfg, denoise.cpu_generator(seed),
                               guide=load_guide(sample_cfg, model))
    return channels_last(to_unit(denoise.finite_samples(images)))
