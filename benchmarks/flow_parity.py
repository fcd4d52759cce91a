"""Parity with the library people move on to: on the same time grid, the steps of flow.FlowEuler
equal those of diffusers' FlowMatchEulerDiscreteScheduler, to float32 rounding.

diffusers is not a dependency of this package; install it beside it to run this:

  pip install diffusers
  python benchmarks/flow_parity.py [--steps 8] [--shift 3.0]

Both walk the same batch with the same velocity field (a fixed random linear map of x_t plus a
term in t, so that every step sees another velocity); each step's output is compared. The
grid is ours (uniform in t from 1 to 0, shifted), handed to diffusers through
set_timesteps(sigmas=...) with its own shift left at 1, so that both start from one grid.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion101.config import DiffusionConfig  # noqa: E402
from diffusion101.flow import FlowEuler  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--shift", type=float, default=3.0)
    a = p.parse_args()
    try:
        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler
    except ImportError:
        print("needs diffusers: pip install diffusers", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=g) / 4
    x_start = torch.randn(4, 1, 4, 4, generator=g)

    def velocity(x, t):  # any smooth field will do: the walks must agree on it
        return (x.flatten(1) @ mix).view_as(x) + t

    ours = FlowEuler(DiffusionConfig(objective="flow", clip="none"), shift=a.shift)
    ours.set_timesteps(a.steps)
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    theirs.set_timesteps(sigmas=ours.sigmas[:-1].float().numpy())
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}; {a.steps} steps, "
          f"shift {a.shift}")
    print("time grid, max |ours - diffusers|:",
          f"{(ours.sigmas.float() - theirs.sigmas.float()).abs().max().item():.3g}")
    x_ours, x_theirs, worst = x_start.clone(), x_start.clone(), 0.0
    for i, (t, timestep) in enumerate(zip(ours.timesteps.tolist(), theirs.timesteps)):
        x_ours = ours.step(velocity(x_ours, t), t, x_ours).prev_sample
        v = velocity(x_theirs, float(theirs.sigmas[i]))
        x_theirs = theirs.step(v, timestep, x_theirs).prev_sample
        gap = (x_ours - x_theirs).abs().max().item()
        worst = max(worst, gap)
        print(f"step {i + 1}: t {t:.4f} -> max |x_ours - x_diffusers| = {gap:.3g}")
    scale = x_ours.abs().max().item()
    print(f"largest gap over the walk {worst:.3g}, against |x| up to {scale:.3g} "
          f"(float32's rounding at that size: {scale * 2 ** -24:.3g} per operation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
