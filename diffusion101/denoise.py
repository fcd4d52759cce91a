"""The reverse process: start from noise, predict, step, repeat, with guidance.

sample() owns the walk: it calls the sampler's set_timesteps once, then for each timestep asks
predict() for the network's output and hands it to sampler.step. predict() is where guidance
happens: the network asked with the label and with the null label, batched, and the two
combined (or, for the rules apg and auto, the predicted x_0 mixed: guidance.py). The job that
loads a checkpoint and writes files around this loop is generate.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import guidance
from .config import DiffusionConfig, SampleConfig, UserError, check_interrupt
from .diffusion import NoiseSchedule
from .flow import FlowMatching
from .guidance import is_guided, needs_uncond
from .meanflow import MeanFlow
from .memory import check_memory
from .objective import Objective
from .settings import validate


@dataclass
class Guide:
    """The guide network of autoguidance (sample.guidance_rule=auto), in eval mode on the
    sampling device, and what it predicts ("eps" or "v"; its rule mixes predicted x_0)."""
    net: nn.Module
    prediction: str


def predict(model, sampler: Objective, x, t: int, labels, sample_cfg: SampleConfig,
            guide: Guide | None = None, history: dict | None = None) -> torch.Tensor:
    """The network's output at timestep t for the batch x, guided where sample_cfg guides.

    Classifier-free guidance (Ho & Salimans 2022): the network asked with the labels (cond)
    and with the null label (uncond), in one batched forward pass, and pushed away from the
    unconditional answer: uncond + w (cond - uncond). w = 1 is the conditional model. Steps
    outside sample.guidance_interval (in t / T; Kynkaeaenniemi et al. 2024) take the
    conditional prediction alone, one forward instead of two. The rules apg and auto
    (guidance.py) mix predicted x_0 instead, from the same predictions."""
    t_batch = sampler.net_time(torch.full((labels.shape[0],), t, device=labels.device))
    lo, hi = sample_cfg.guidance_interval
    if not (is_guided(sample_cfg) and lo <= sampler.time_fraction(t) <= hi):
        return model(x, t_batch, labels)
    if needs_uncond(sample_cfg):
        null = torch.full_like(labels, model.null_label)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]),
                             torch.cat([labels, null])).chunk(2)
    else:
        cond, uncond = model(x, t_batch, labels), None
    w = sample_cfg.guidance
    if sample_cfg.guidance_rule == "cfg":
        return uncond + w * (cond - uncond)
    if sample_cfg.guidance_rule == "apg":
        return guidance.apg(sampler, x, t, cond, uncond, sample_cfg, {} if history is None else history)
    guided_by = guide.net(x, t_batch, labels)
    return guidance.auto(sampler, x, t, cond, uncond, guided_by, guide.prediction, sample_cfg)


def check_guidance(model, sample_cfg: SampleConfig, guide: Guide | None) -> None:
    """What guidance needs, before the walk: a null class for the unconditional pass, a guide
    network for autoguidance."""
    if not is_guided(sample_cfg):
        return
    if needs_uncond(sample_cfg) and getattr(model, "null_label", None) is None:
        raise UserError("guidance needs a model trained with a null class "
                        "(model.null_class=true, train.p_uncond > 0)")
    if sample_cfg.guidance_rule == "auto" and guide is None:
        raise UserError("the auto guidance rule needs a guide network (--guide CKPT)")


@torch.inference_mode()
def sample(model, sampler: Objective, labels: torch.Tensor, sample_cfg: SampleConfig,
           generator: torch.Generator | None = None, n_frames: int = 0,
           guide: Guide | None = None, start: torch.Tensor | None = None):
    """Generate one image per label: predict, step, repeat. Returns (images, frames).

    :param model: the network, already in eval mode; its cfg gives the image size.
    :param sampler: a sampler of the model's objective (make_sampler); this loop sets its timesteps to sample_cfg.steps.
    :param labels: (N,) class labels, on the device to sample on.
    :param sample_cfg: steps, guidance scale, rule and interval (config.SampleConfig).
    :param generator: the source of x_T and of every step's noise.
    :param n_frames: keep x_t at this many evenly spaced points of the walk (the last is the
        final image): frames is (N, n_frames, C, S, S), or None when n_frames is 0.
    :param guide: the guide network of sample.guidance_rule=auto.
    :param start: x_T itself, (N, C, S, S), instead of a draw from the generator (distillation
        pairs the noise with the image the walk makes of it).
    images: (N, C, S, S) in about [-1, 1].
    """
    check_guidance(model, sample_cfg, guide)
    device, n, cfg = labels.device, labels.shape[0], model.cfg
    check_memory(cfg, n * (2 if is_guided(sample_cfg) and needs_uncond(sample_cfg) else 1), device)
    sampler.set_timesteps(sample_cfg.steps)  # the one reset: a new walk, no history
    gen_device = generator.device if generator is not None else device
    if start is None:
        start = torch.randn((n, cfg.in_channels, cfg.img_size, cfg.img_size), generator=generator,
                            device=gen_device)  # x_T ~ N(0, I)
    x = start.to(device)
    steps = len(sampler.timesteps)
    keep = set(np.linspace(0, steps - 1, n_frames).round().astype(int).tolist()) if n_frames else set()
    frames, history = [], {}  # what a guidance rule keeps over this walk
    for i, t in enumerate(sampler.timesteps.tolist()):
        check_interrupt()  # (a Ctrl-C whose exception was swallowed: config.py)
        out = predict(model, sampler, x, t, labels, sample_cfg, guide, history)
        x = sampler.step(out, t, x, generator=generator).prev_sample
        if i in keep:
            frames.append(x.cpu())
    return x, (torch.stack(frames, dim=1) if frames else None)


def finite_samples(images: torch.Tensor, then: str = "nothing was written") -> torch.Tensor:
    """The images, or a UserError if any came out NaN or inf: such samples must be neither
    written (a black PNG, an all-zero npz) nor scored. `then` ends the error's line: what the
    caller did not do."""
    bad = ~torch.isfinite(images.flatten(1)).all(dim=1)
    if bad.any():
        raise UserError(f"{int(bad.sum())} of {len(images)} samples came out NaN or inf (an "
                        f"unstable schedule, or weights or adapters too large?); {then}")
    return images


def grid_labels(classes, n_per_class: int, device) -> torch.Tensor:
    """The labels of `classes` repeated n_per_class times: row k of a grid holds repetition k
    of every class."""
    return torch.tensor(list(classes) * n_per_class, dtype=torch.long, device=device)


def sampling_batch(device) -> int:
    """How many images to sample at once when there are many: on a CPU a batch whose
    activations fit the cache samples faster per image than a big one (docs/BENCHMARKS.md);
    a GPU wants big batches."""
    return 1000 if torch.device(device).type == "cuda" else 100


def cpu_generator(seed: int) -> torch.Generator:
    """The walk's noise drawn on the CPU: the same seed gives the same images on any device."""
    return torch.Generator(device="cpu").manual_seed(seed)


def sample_classes(model, sampler: Objective, sample_cfg: SampleConfig, classes, n_per_class: int,
                   seed: int, device, n_frames: int = 0):
    """Images of `classes` (labels), repeated n_per_class times (grid_labels), from the seed's
    CPU generator. (With a guide network: sample() on the same labels and generator.)"""
    labels = grid_labels(classes, n_per_class, device)
    return sample(model, sampler, labels, sample_cfg, cpu_generator(seed), n_frames)


# Each objective by its name (diffusion.objective); each lists the samplers it takes.
OBJECTIVES = {"ddpm": NoiseSchedule, "flow": FlowMatching, "meanflow": MeanFlow}


def make_objective(cfg: DiffusionConfig, device="cpu") -> Objective:
    """What training noises with and learns to predict, as diffusion.objective names it."""
    return OBJECTIVES[cfg.objective](cfg, device)


def make_sampler(sample_cfg: SampleConfig, cfg: DiffusionConfig, device="cpu") -> Objective:
    """The sampler a config.SampleConfig names (sample.sampler), from the table of the
    objective it walks, its timesteps set to sample.steps. A bad name or step count, or a
    sampler of another objective, is a UserError."""
    table = OBJECTIVES[cfg.objective].samplers
    if sample_cfg.sampler not in table:
        known = ", ".join(f"{name} ({obj})" for obj, kind in OBJECTIVES.items() for name in kind.samplers)
        names = list(table)
        either = ", ".join(names[:-1]) + " or " * (len(names) > 1) + names[-1]
        raise UserError(f"sample.sampler={sample_cfg.sampler} does not walk diffusion.objective="
                        f"{cfg.objective}: use {either} (known: {known})")
    sampler = table[sample_cfg.sampler].from_config(cfg, sample_cfg, device)
    try:
        sampler.set_timesteps(sample_cfg.steps)
    except ValueError as e:
        raise UserError(str(e)) from None
    return sampler


def check_config(cfg) -> None:
    """A config a run or a file will use: every field and rule (settings.validate), then the
    sampler it names built with its steps, so that a walk the sampler cannot take fails before
    any work or write, not at the first grid."""
    validate(cfg)
    make_sampler(cfg.sample, cfg.diffusion)
