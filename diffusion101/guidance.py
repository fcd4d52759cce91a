"""Guidance: whether a walk is guided at all, and the rules that mix predicted clean images
rather than network outputs. Plain classifier-free guidance, uncond + w (cond - uncond), is one
line in denoise.predict(); these two are called from there by name (sample.guidance_rule):

- apg: adaptive projected guidance (Sadat et al. 2024): the guidance term split into the part
  parallel to the conditional x_0 (which mostly brightens and saturates) and the part
  orthogonal to it, the parallel part scaled by eta; with momentum and a norm threshold.
- auto: autoguidance (Karras et al. 2024): away from a weaker guide network's prediction for
  the same label, optionally with a classifier-free term as well.

Both work in x_0, through the schedule's to_x0 / from_x0, so that a guide predicting eps can
guide a model predicting v. (cfg's mix is the same in either space: eps and v are affine in x_0
at a fixed (x_t, t), and its weights sum to 1.)"""
from __future__ import annotations

import torch

from .config import EVERY_STEP, SampleConfig


def is_guided(sample_cfg: SampleConfig) -> bool:
    """Whether guidance changes anything: a scale other than 1 (or auto's classifier-free term)."""
    return sample_cfg.guidance != 1.0 or (sample_cfg.guidance_rule == "auto"
                                          and sample_cfg.guide_cfg != 1.0)


def needs_uncond(sample_cfg: SampleConfig) -> bool:
    """Whether a guided step asks the network without the label too: always, but for
    autoguidance without its classifier-free term."""
    return sample_cfg.guidance_rule != "auto" or sample_cfg.guide_cfg != 1.0


def interval_text(interval) -> str:
    """' in t/T 0.1..0.7' for a limited guidance interval; '' when it holds every step."""
    lo, hi = interval
    return "" if (lo, hi) == EVERY_STEP else f" in t/T {lo:g}..{hi:g}"


def per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> over each image of the batch, shaped to broadcast against it."""
    return (a * b).flatten(1).sum(dim=1).view(-1, *[1] * (a.dim() - 1))


def apg(schedule, x_t, t: int, cond, uncond, sample_cfg, history: dict) -> torch.Tensor:
    """Adaptive projected guidance, in x_0: diff = x0_cond - x0_uncond, plus momentum times
    the previous guided step's diff (history, a dict that lives for one walk), scaled down to
    norm <= r per image when r = sample.apg_norm_threshold > 0, then split into its part
    parallel to x0_cond and the rest; x0 = x0_cond + (w - 1) (orthogonal + eta parallel). With
    eta = 1, no momentum and no threshold this is cfg."""
    x0_c = schedule.to_x0(cond, t, x_t)
    diff = x0_c - schedule.to_x0(uncond, t, x_t)
    if sample_cfg.apg_momentum and "apg_running" in history:
        diff = diff + sample_cfg.apg_momentum * history["apg_running"]
    history["apg_running"] = diff
    if sample_cfg.apg_norm_threshold > 0:
        norm = per_image(diff, diff).sqrt()
        diff = diff * (sample_cfg.apg_norm_threshold / norm.clamp(min=1e-12)).clamp(max=1.0)
    # the projection in float64: the parallel part is a small difference of large sums
    d64, c64 = diff.double(), x0_c.double()
    parallel = (per_image(d64, c64) / per_image(c64, c64).clamp(min=1e-12) * c64).to(diff.dtype)
    guided = x0_c + (sample_cfg.guidance - 1) * (diff - parallel + sample_cfg.apg_eta * parallel)
    return schedule.from_x0(guided, t, x_t)


def auto(schedule, x_t, t: int, cond, uncond, guide_out, guide_prediction: str,
         sample_cfg) -> torch.Tensor:
    """Autoguidance, in x_0: x0_cond + (w - 1) (x0_cond - x0_guide), the guide a weaker model of
    the same data (an earlier snapshot, a smaller network) given the same labels, predicting
    guide_prediction ("eps" or "v"); with sample.guide_cfg = w' != 1 (uncond given), also
    + (w' - 1) (x0_cond - x0_uncond). A guide equal to the model gives the conditional model
    at any w."""
    x0_c = schedule.to_x0(cond, t, x_t)
    x0_g = schedule.to_x0(guide_out, t, x_t, guide_prediction)
    guided = x0_c + (sample_cfg.guidance - 1) * (x0_c - x0_g)
    if uncond is not None:
        guided = guided + (sample_cfg.guide_cfg - 1) * (x0_c - schedule.to_x0(uncond, t, x_t))
    return schedule.from_x0(guided, t, x_t)
