"""Flow matching (rectified flow), the objective Stable Diffusion 3 and Flux train with, beside
diffusion.py's DDPM, on the same network and the same contracts.

Time runs continuously from t = 0 (data) to t = 1 (noise) along a straight line:
x_t = (1 - t) x_0 + t eps (Lipman et al. 2023; Liu et al. 2023), and the network predicts the
velocity dx_t/dt = eps - x_0. Sampling solves that ODE from noise at t = 1 down to t = 0 with
Euler or Heun steps on a time grid, which SD3's shift (Esser et al. 2024) bends towards the
noisy end. FlowMatching is the objective (objective.py's contract, as NoiseSchedule is for
DDPM); FlowEuler and FlowHeun are its samplers, with the diffusion samplers' contract:
set_timesteps(n), then step(model_out, t, x_t) -> StepOutput(next sample, predicted x_0).
"""
from __future__ import annotations

import torch

from .config import DiffusionConfig, SampleConfig
from .diffusion import StepOutput
from .objective import Objective

T_MIN = 0.05  # x_0 prediction: the least t a velocity (x_t - x_0) / t is divided by


class FlowMatching(Objective):
    """The forward process, the training target, the time the network is fed, and the
    conversions between a predicted velocity and x_0."""

    def __init__(self, cfg: DiffusionConfig, device="cpu"):
        self.cfg, self.device = cfg, device
        # The network reads time as DDPM's timesteps, 0..T-1; it is fed t on that scale.
        self.time_scale = float(cfg.timesteps - 1)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """A training time for each of n images: uniform on (0, 1), or logit-normal (SD3's
        default: sigmoid of a normal of mean diffusion.logit_mean and scale
        diffusion.logit_std, which puts more of training in the middle of the path), or one of
        the times 1/k, 2/k, ..., 1 that a walk of k = diffusion.walk_steps Euler steps visits
        (and so every walk of a divisor of k steps: a few-step student's, distill.py)."""
        if self.cfg.t_sampling == "uniform":
            return torch.rand(n, generator=generator, device=generator.device)
        if self.cfg.t_sampling == "walk":
            k = self.cfg.walk_steps
            return torch.randint(1, k + 1, (n,), generator=generator, device=generator.device) / k
        u = torch.randn(n, generator=generator, device=generator.device)
        return torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * u)

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.time_scale

    def time_fraction(self, t) -> float:
        return t  # the path's own time runs from 0 to 1

    @staticmethod
    def _column(t, x: torch.Tensor):
        """t, a number or one per image, shaped to broadcast against the batch x."""
        return t.view(-1, *[1] * (x.dim() - 1)) if torch.is_tensor(t) else t

    def velocity_of(self, out: torch.Tensor, t, x_t: torch.Tensor) -> torch.Tensor:
        """The velocity a network output means: the output itself, or for a network that
        predicts x_0 (diffusion.prediction="x0"), (x_t - x_0) / t, with t kept above T_MIN so
        that the division stays finite near the data."""
        if self.cfg.prediction != "x0":
            return out
        t = self._column(t, x_t)
        return (x_t - out) / (t.clamp(min=T_MIN) if torch.is_tensor(t) else max(t, T_MIN))

    def prediction_and_target(self, net, x0, noise, t, labels) -> tuple:
        """The velocity the network's output means, against the path's: with x_0 prediction
        the loss is still on the velocity (Li and He 2025's x-prediction with v-loss)."""
        x_t = self.add_noise(x0, noise, t)
        return self.velocity_of(net(x_t, self.net_time(t), labels), t, x_t), self.target(x0, noise, t)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = (1 - t) x_0 + t eps."""
        t = self._column(t, x0)
        return (1 - t) * x0 + t * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The velocity of the straight path, eps - x_0 (the same at every t)."""
        return noise - x0

    def to_x0(self, out: torch.Tensor, t, x_t: torch.Tensor, prediction=None) -> torch.Tensor:
        """The x_0 a network output implies at (x_t, t): x_t - t v (or the output itself)."""
        if (prediction or self.cfg.prediction) == "x0":
            return out
        return self.x0_along(out, self._column(t, x_t), x_t)

    def from_x0(self, x0: torch.Tensor, t, x_t: torch.Tensor) -> torch.Tensor:
        """The output that implies x0 at (x_t, t): the velocity (x_t - x_0) / t (or x0)."""
        if self.cfg.prediction == "x0":
            return x0
        return (x_t - x0) / self._column(t, x_t)

    def x0_along(self, v: torch.Tensor, t, x_t: torch.Tensor) -> torch.Tensor:
        """Where the velocity v at (x_t, t) lands at t = 0: x_t - t v (t a number, or a
        column per image)."""
        return x_t - t * v

    def velocity(self, out: torch.Tensor, t: float, x_t: torch.Tensor) -> torch.Tensor:
        """The velocity to step with: the network's, or with diffusion.clip="x0" the one whose
        x_0 is clipped to [-1, 1] (as DDPM's samplers clip the predicted x_0)."""
        v = self.velocity_of(out, t, x_t)
        if self.cfg.clip != "x0" or t == 0:
            return v
        return (x_t - self.x0_along(v, t, x_t).clamp(-1.0, 1.0)) / t


def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift: t -> s t / (1 + (s - 1) t). s > 1 spends more of the steps at high
    noise, where a bigger image (or a coarser one) needs them; s = 1 leaves t as it is."""
    return shift * t / (1 + (shift - 1) * t)


class FlowSampler(FlowMatching):
    """The time grid of a walk: n steps from t = 1 to t = 0, uniform then shifted."""

    name = ""

    def __init__(self, cfg: DiffusionConfig, device="cpu", shift: float = 1.0):
        super().__init__(cfg, device)
        self.shift = shift
        self.set_timesteps(10)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, sample_cfg: SampleConfig, device="cpu"):
        """The sampler with what it reads of sample_cfg (the factory's one way to build one)."""
        return cls(cfg, device, sample_cfg.shift)

    def set_timesteps(self, num_inference_steps: int) -> None:
        if not 1 <= num_inference_steps <= 10_000:
            raise ValueError(f"steps must be in 1..10000, not {num_inference_steps}")
        grid = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)
        self.sigmas = shifted(grid, self.shift)  # t_0 = 1 > t_1 > ... > t_n = 0
        self.timesteps = self.sigmas[:-1].float()
        self._i = 0  # the steps of this walk taken so far

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """x after a step, clamped to [-1, 1] when diffusion.clip is "x_t" (as DDPM does)."""
        return x.clamp(-1.0, 1.0) if self.cfg.clip == "x_t" else x


class FlowEuler(FlowSampler):
    """Euler's method: x_{t_next} = x_t + (t_next - t) v(x_t, t). One network call a step;
    exact wherever the velocity is constant along the path, as it is for a single image."""

    name = "euler"

    def step(self, model_out, t, x_t, generator=None) -> StepOutput:
        t, t_next = float(self.sigmas[self._i]), float(self.sigmas[self._i + 1])
        self._i += 1
        v = self.velocity(model_out, t, x_t)
        return StepOutput(self.finish(x_t + (t_next - t) * v), self.x0_along(v, t, x_t))


class FlowHeun(FlowSampler):
    """Heun's method (second order; Karras et al. 2022's sampler): an Euler step to t_next, the
    velocity asked again there, and the step taken again with the mean of the two; the last
    step, to t = 0, is Euler's, so the network is never asked at the data itself. Two network
    calls a step but the last: its timesteps list t_0, t_1, t_1, t_2, ..., t_{n-1}, t_{n-1}
    (a predictor at t_i, then its corrector at t_{i+1}); step() tells the two apart."""

    name = "heun"

    def set_timesteps(self, num_inference_steps: int) -> None:
        super().set_timesteps(num_inference_steps)
        s = self.sigmas.float()
        pairs = torch.stack([s[:-2], s[1:-1]], dim=1).flatten()  # predictor, corrector
        self.timesteps = torch.cat([pairs, s[-2:-1]])
        self._start = None  # (x_t, v) of the predictor, until its corrector comes

    def step(self, model_out, t, x_t, generator=None) -> StepOutput:
        t_i, t_next = float(self.sigmas[self._i]), float(self.sigmas[self._i + 1])
        if self._start is None:  # 1. predictor (or the last step): Euler to t_next
            v = self.velocity(model_out, t_i, x_t)
            x_next, x0 = x_t + (t_next - t_i) * v, self.x0_along(v, t_i, x_t)
            if t_next == 0:
                self._i += 1
                return StepOutput(self.finish(x_next), x0)
            self._start = (x_t, v)
            return StepOutput(x_next, x0)
        x_i, v_i = self._start  # 2. corrector: from x_i with the mean of both velocities
        v_next = self.velocity(model_out, t_next, x_t)
        self._start, self._i = None, self._i + 1
        return StepOutput(self.finish(x_i + (t_next - t_i) * (v_i + v_next) / 2),
                          self.x0_along(v_next, t_next, x_t))


FlowMatching.samplers = {"euler": FlowEuler, "heun": FlowHeun}
FlowMatching.preview = {"sampler": "euler", "steps": 8}
