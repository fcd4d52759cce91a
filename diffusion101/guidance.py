"""Guidance rules: how a sampling step combines what the network (and a guide network) predict.

A rule is one function rule(p, sample_cfg, memory) -> the model output to step with,
registered by name in RULES; sample.guidance_rule (flag --guidance-rule) picks it. `p` holds
the predictions the rule asks for (needs()) and where they were made: the batch x_t, the
timestep t and the noise schedule, which moves between the network's output (eps or v) and
the predicted clean image x_0. `memory` is a dict that lives for one reverse walk, for rules
that remember earlier steps. A new rule is one function here, one entry in RULES and the
config's choices (and in needs() if it asks for other predictions), and one test.

- cfg: classifier-free guidance (Ho & Salimans 2022).
- apg: adaptive projected guidance (Sadat et al. 2024): the guidance term split into the part
  parallel to the conditional x_0 (which mostly brightens and saturates) and the part
  orthogonal to it, the parallel part scaled by eta; with momentum and a norm threshold.
- auto: autoguidance (Karras et al. 2024): away from a weaker guide network's prediction for
  the same label, optionally with a classifier-free term as well.

apg and auto combine predicted x_0, not network outputs, so that a guide predicting eps can
guide a model predicting v (cfg's mix is the same in either space: see cfg()).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Predictions(NamedTuple):
    """What the networks said at one step of a walk, and where they said it."""
    x_t: torch.Tensor  # the batch, (B, C, S, S)
    t: int  # its timestep
    schedule: object  # the model's diffusion.NoiseSchedule
    cond: torch.Tensor  # the model, with the labels
    uncond: torch.Tensor | None = None  # the model, with the null label
    guide: torch.Tensor | None = None  # the guide network, with the labels
    guide_prediction: str | None = None  # what the guide predicts: "eps" or "v"


def to_x0(schedule, out: torch.Tensor, t: int, x_t: torch.Tensor,
          prediction: str | None = None) -> torch.Tensor:
    """The x_0 a network output implies at (x_t, t), unclipped; `prediction` is the output's
    kind (default the schedule's own)."""
    a, s = schedule.sqrt_alpha_bar[t], schedule.sqrt_one_minus_alpha_bar[t]
    if (prediction or schedule.prediction) == "eps":
        return (x_t - s * out) / a
    return a * x_t - s * out  # v = a eps - s x_0 and x_t = a x_0 + s eps


def from_x0(schedule, x0: torch.Tensor, t: int, x_t: torch.Tensor) -> torch.Tensor:
    """The output of the schedule's kind (eps or v) that implies x0 at (x_t, t)."""
    a, s = schedule.sqrt_alpha_bar[t], schedule.sqrt_one_minus_alpha_bar[t]
    eps = (x_t - a * x0) / s
    return eps if schedule.prediction == "eps" else a * eps - s * x0


def cfg(p: Predictions, sample_cfg, memory: dict) -> torch.Tensor:
    """Classifier-free guidance: uncond + w (cond - uncond). w = 1 is the conditional model,
    w = 0 the unconditional one, w > 1 pushes away from the unconditional prediction. Eps and
    v are both affine in x_0 at a fixed (x_t, t), and the weights sum to 1, so this mixes the
    predicted x_0 by the same weights (before any clipping)."""
    return p.uncond + sample_cfg.guidance * (p.cond - p.uncond)


def per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> over each image of the batch, shaped to broadcast against it."""
    return (a * b).flatten(1).sum(dim=1).view(-1, *[1] * (a.dim() - 1))


def apg(p: Predictions, sample_cfg, memory: dict) -> torch.Tensor:
    """Adaptive projected guidance, in x_0: diff = x0_cond - x0_uncond, plus momentum times
    the previous guided step's diff (memory), scaled down to norm <= r per image when
    r = sample.apg_norm_threshold > 0, then split into its part parallel to x0_cond and the
    rest; x0 = x0_cond + (w - 1) (orthogonal + eta parallel). With eta = 1, no momentum and
    no threshold this is cfg."""
    x0_c = to_x0(p.schedule, p.cond, p.t, p.x_t)
    diff = x0_c - to_x0(p.schedule, p.uncond, p.t, p.x_t)
    if sample_cfg.apg_momentum and "apg_running" in memory:
        diff = diff + sample_cfg.apg_momentum * memory["apg_running"]
    memory["apg_running"] = diff
    if sample_cfg.apg_norm_threshold > 0:
        norm = per_image(diff, diff).sqrt()
        diff = diff * (sample_cfg.apg_norm_threshold / norm.clamp(min=1e-12)).clamp(max=1.0)
    # the projection in float64: the parallel part is a small difference of large sums
    d64, c64 = diff.double(), x0_c.double()
    parallel = (per_image(d64, c64) / per_image(c64, c64).clamp(min=1e-12) * c64).to(diff.dtype)
    guided = x0_c + (sample_cfg.guidance - 1) * (diff - parallel + sample_cfg.apg_eta * parallel)
    return from_x0(p.schedule, guided, p.t, p.x_t)


def auto(p: Predictions, sample_cfg, memory: dict) -> torch.Tensor:
    """Autoguidance, in x_0: x0_cond + (w - 1) (x0_cond - x0_guide), the guide a weaker model of
    the same data (an earlier snapshot, a smaller network) given the same labels; with
    sample.guide_cfg = w' != 1, also + (w' - 1) (x0_cond - x0_uncond). A guide equal to the
    model gives the conditional model at any w."""
    x0_c = to_x0(p.schedule, p.cond, p.t, p.x_t)
    x0_g = to_x0(p.schedule, p.guide, p.t, p.x_t, p.guide_prediction)
    guided = x0_c + (sample_cfg.guidance - 1) * (x0_c - x0_g)
    if p.uncond is not None:
        guided = guided + (sample_cfg.guide_cfg - 1) * (x0_c - to_x0(p.schedule, p.uncond, p.t, p.x_t))
    return from_x0(p.schedule, guided, p.t, p.x_t)


RULES = {"cfg": cfg, "apg": apg, "auto": auto}


def needs(sample_cfg) -> set:
    """The predictions besides `cond` that the rule of sample_cfg asks for at a guided step."""
    if sample_cfg.guidance_rule == "auto":
        return {"guide"} | ({"uncond"} if sample_cfg.guide_cfg != 1.0 else set())
    return {"uncond"}


def is_guided(sample_cfg) -> bool:
    """Whether the rule changes anything: a scale other than 1 (or auto's classifier-free term)."""
    return sample_cfg.guidance != 1.0 or (sample_cfg.guidance_rule == "auto"
                                          and sample_cfg.guide_cfg != 1.0)
