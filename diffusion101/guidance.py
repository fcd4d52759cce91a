"""Guidance rules: how a sampling step combines the conditional and the unconditional
predictions of the network.

A rule is one function rule(cond, uncond, x_t, t, schedule, scale) -> the model output to
step with, registered by name in RULES; sample.guidance_rule (flag --guidance-rule) picks it.
It gets what a rule may need: both predictions (eps or v, as the network makes them), the
batch x_t they were made from, the timestep t, the noise schedule (to move between eps, v and
x_0: diffusion.NoiseSchedule.predict_x0_eps) and the guidance scale w. A new rule is one
function here, one entry in RULES and the config's choices, and one test.
"""
from __future__ import annotations

import torch


def cfg(cond: torch.Tensor, uncond: torch.Tensor, x_t: torch.Tensor, t: int, schedule,
        scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + w (cond - uncond). w = 1 is the
    conditional model, w = 0 the unconditional one, w > 1 pushes away from the unconditional
    prediction. Eps and v are both affine in x_0 at a fixed (x_t, t), and the weights sum to
    1, so this mixes the predicted x_0 by the same weights (before any clipping)."""
    return uncond + scale * (cond - uncond)


RULES = {"cfg": cfg}
