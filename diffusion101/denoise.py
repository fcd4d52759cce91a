"""The reverse process: start from noise, predict, step, repeat, with guidance.

The loop owns the walk: it calls the sampler's set_timesteps once, then for each timestep asks
the network (twice, batched, where guidance is on: with the label and with the null label; or
beside a guide network, for autoguidance), combines the predictions by the guidance rule, and
hands the output to sampler.step. The job that loads a checkpoint and writes files around this
loop is generate.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import SampleConfig, UserError
from .diffusion import Sampler
from .guidance import RULES, Predictions, is_guided, needs


@dataclass
class Guide:
    """The guide network of autoguidance (sample.guidance_rule=auto), in eval mode on the
    sampling device, and what it predicts ("eps" or "v"; its rule mixes predicted x_0)."""
    net: nn.Module
    prediction: str


def guided_at(sample_cfg: SampleConfig, t: int, num_train_timesteps: int) -> bool:
    """Whether step t is guided: a rule that changes anything (guidance.is_guided), and t / T
    inside sample.guidance_interval (Kynkaeaenniemi et al. 2024: guidance only over an
    interval of noise levels)."""
    lo, hi = sample_cfg.guidance_interval
    return is_guided(sample_cfg) and lo * num_train_timesteps <= t <= hi * num_train_timesteps


def guided(model, x, t, labels, sample_cfg: SampleConfig, schedule, guide: Guide | None = None,
           memory: dict | None = None) -> torch.Tensor:
    """The guided prediction at the timesteps t (one for the whole batch): the predictions the
    rule needs (guidance.needs), the conditional and the unconditional (null-label) passes
    batched into one forward, then combined by the rule sample_cfg.guidance_rule."""
    wanted = needs(sample_cfg)
    if "uncond" in wanted:
        null = torch.full_like(labels, model.null_label)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
    else:
        cond, uncond = model(x, t, labels), None
    extra = {}
    if "guide" in wanted:
        extra = {"guide": guide.net(x, t, labels), "guide_prediction": guide.prediction}
    p = Predictions(x, int(t[0]), schedule, cond, uncond, **extra)
    return RULES[sample_cfg.guidance_rule](p, sample_cfg, {} if memory is None else memory)


def predict(model, sampler: Sampler, x, t: int, labels, sample_cfg: SampleConfig,
            guide: Guide | None = None, memory: dict | None = None) -> torch.Tensor:
    """The network's output at timestep t for the batch x: guided where sample_cfg guides
    step t, else the conditional prediction alone (one forward instead of two)."""
    t_batch = torch.full((labels.shape[0],), t, device=labels.device, dtype=torch.long)
    if guided_at(sample_cfg, t, sampler.num_train_timesteps):
        return guided(model, x, t_batch, labels, sample_cfg, sampler, guide, memory)
    return model(x, t_batch, labels)


def check_guidance(model, sample_cfg: SampleConfig, guide: Guide | None) -> None:
    """What the rule needs, before the walk: a null class for the unconditional pass, a guide
    network for autoguidance."""
    wanted = needs(sample_cfg) if is_guided(sample_cfg) else set()
    if "uncond" in wanted and getattr(model, "null_label", None) is None:
        raise UserError("guidance needs a model trained with a null class "
                        "(model.null_class=true, train.p_uncond > 0)")
    if "guide" in wanted and guide is None:
        raise UserError("the auto guidance rule needs a guide network (--guide CKPT)")


@torch.inference_mode()
def sample(model, sampler: Sampler, labels: torch.Tensor, sample_cfg: SampleConfig,
           generator: torch.Generator | None = None, n_frames: int = 0,
           guide: Guide | None = None):
    """Generate one image per label: predict, step, repeat. Returns (images, frames).

    :param model: the network, already in eval mode; its cfg gives the image size.
    :param sampler: a diffusion.Sampler; this loop sets its timesteps to sample_cfg.steps.
    :param labels: (N,) class labels, on the device to sample on.
    :param sample_cfg: steps, guidance scale, rule and interval (config.SampleConfig).
    :param generator: the source of x_T and of every step's noise.
    :param n_frames: keep x_t at this many evenly spaced points of the walk (the last is the
        final image): frames is (N, n_frames, C, S, S), or None when n_frames is 0.
    :param guide: the guide network of sample.guidance_rule=auto.
    images: (N, C, S, S) in about [-1, 1].
    """
    check_guidance(model, sample_cfg, guide)
    device, n, cfg = labels.device, labels.shape[0], model.cfg
    sampler.set_timesteps(sample_cfg.steps)  # the one reset: a new walk, no history
    gen_device = generator.device if generator is not None else device
    x = torch.randn((n, cfg.in_channels, cfg.img_size, cfg.img_size), generator=generator,
                    device=gen_device).to(device)  # x_T ~ N(0, I)
    steps = len(sampler.timesteps)
    keep = set(np.linspace(0, steps - 1, n_frames).round().astype(int).tolist()) if n_frames else set()
    frames, memory = [], {}  # memory: what a guidance rule keeps over this walk
    for i, t in enumerate(sampler.timesteps.tolist()):
        out = predict(model, sampler, x, t, labels, sample_cfg, guide, memory)
        x = sampler.step(out, t, x, generator=generator).prev_sample
        if i in keep:
            frames.append(x.cpu())
    return x, (torch.stack(frames, dim=1) if frames else None)


def digit_labels(digits, n_per_digit: int, device) -> torch.Tensor:
    """The labels of `digits` repeated n_per_digit times: row k of a grid holds repetition k
    of every digit."""
    return torch.tensor(list(digits) * n_per_digit, dtype=torch.long, device=device)


def cpu_generator(seed: int) -> torch.Generator:
    """The walk's noise drawn on the CPU: the same seed gives the same images on any device."""
    return torch.Generator(device="cpu").manual_seed(seed)


def sample_digits(model, sampler: Sampler, sample_cfg: SampleConfig, digits, n_per_digit: int,
                  seed: int, device, n_frames: int = 0):
    """Images for `digits`, repeated n_per_digit times (digit_labels), from the seed's CPU
    generator. (With a guide network: sample() on the same labels and generator.)"""
    labels = digit_labels(digits, n_per_digit, device)
    return sample(model, sampler, labels, sample_cfg, cpu_generator(seed), n_frames)
