"""The reverse process: start from noise, predict, step, repeat, with guidance.

The loop owns the walk: it calls the sampler's set_timesteps once, then for each timestep asks
the network (twice, batched, where guidance is on: with the label and with the null label) and
hands the output to sampler.step. The job that loads a checkpoint and writes files around this
loop is generate.py.
"""
from __future__ import annotations

import numpy as np
import torch

from .config import SampleConfig, UserError
from .diffusion import Sampler
from .guidance import RULES


def guided_at(sample_cfg: SampleConfig, t: int, num_train_timesteps: int) -> bool:
    """Whether step t is guided: a scale other than 1, and t / T inside sample.guidance_interval
    (Kynkaeaenniemi et al. 2024: guidance only over an interval of noise levels)."""
    lo, hi = sample_cfg.guidance_interval
    return sample_cfg.guidance != 1.0 and lo * num_train_timesteps <= t <= hi * num_train_timesteps


def guided(model, x, t, labels, scale: float, rule: str = "cfg", schedule=None) -> torch.Tensor:
    """The guided prediction: the conditional and the unconditional (null-label) passes batched
    into one forward, then combined by the guidance rule `rule` (guidance.RULES)."""
    null = torch.full_like(labels, model.null_label)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
    cond, uncond = both.chunk(2)
    return RULES[rule](cond, uncond, x, int(t[0]), schedule, scale)


def predict(model, sampler: Sampler, x, t: int, labels, sample_cfg: SampleConfig) -> torch.Tensor:
    """The network's output at timestep t for the batch x: guided where sample_cfg guides
    step t, else the conditional prediction alone (one forward instead of two)."""
    t_batch = torch.full((labels.shape[0],), t, device=labels.device, dtype=torch.long)
    if guided_at(sample_cfg, t, sampler.num_train_timesteps):
        return guided(model, x, t_batch, labels, sample_cfg.guidance, sample_cfg.guidance_rule,
                      sampler)
    return model(x, t_batch, labels)


@torch.inference_mode()
def sample(model, sampler: Sampler, labels: torch.Tensor, sample_cfg: SampleConfig,
           generator: torch.Generator | None = None, n_frames: int = 0):
    """Generate one image per label: predict, step, repeat. Returns (images, frames).

    :param model: the network, already in eval mode; its cfg gives the image size.
    :param sampler: a diffusion.Sampler; this loop sets its timesteps to sample_cfg.steps.
    :param labels: (N,) class labels, on the device to sample on.
    :param sample_cfg: steps, guidance scale, rule and interval (config.SampleConfig).
    :param generator: the source of x_T and of every step's noise.
    :param n_frames: keep x_t at this many evenly spaced points of the walk (the last is the
        final image): frames is (N, n_frames, C, S, S), or None when n_frames is 0.
    images: (N, C, S, S) in about [-1, 1].
    """
    if sample_cfg.guidance != 1.0 and getattr(model, "null_label", None) is None:
        raise UserError("guidance needs a model trained with a null class "
                        "(model.null_class=true, train.p_uncond > 0)")
    device, n, cfg = labels.device, labels.shape[0], model.cfg
    sampler.set_timesteps(sample_cfg.steps)  # the one reset: a new walk, no history
    gen_device = generator.device if generator is not None else device
    x = torch.randn((n, cfg.in_channels, cfg.img_size, cfg.img_size), generator=generator,
                    device=gen_device).to(device)  # x_T ~ N(0, I)
    steps = len(sampler.timesteps)
    keep = set(np.linspace(0, steps - 1, n_frames).round().astype(int).tolist()) if n_frames else set()
    frames = []
    for i, t in enumerate(sampler.timesteps.tolist()):
        out = predict(model, sampler, x, t, labels, sample_cfg)
        x = sampler.step(out, t, x, generator=generator).prev_sample
        if i in keep:
            frames.append(x.cpu())
    return x, (torch.stack(frames, dim=1) if frames else None)


def sample_digits(model, sampler: Sampler, sample_cfg: SampleConfig, digits, n_per_digit: int,
                  seed: int, device, n_frames: int = 0):
    """Images for `digits`, repeated n_per_digit times (row k holds repetition k of every
    digit), from a generator seeded with `seed` on the CPU: the same seed gives the same
    images on any device."""
    labels = torch.tensor(list(digits) * n_per_digit, dtype=torch.long, device=device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return sample(model, sampler, labels, sample_cfg, generator, n_frames)
