"""Noise schedules and samplers, as objects apart from the network (the diffusers pattern).

NoiseSchedule is the objective (the contract of objective.py): it knows the betas and
nothing about the network, and training uses it alone. ``sample_timesteps(n, generator)``
draws training timesteps, ``add_noise(x0, noise, t)`` is the closed-form forward process
q(x_t | x_0), ``target(x0, noise, t)`` what the network learns to predict (eps or v);
``predict_x0_eps`` (clipped as diffusion.clip says), ``to_x0`` and ``from_x0`` are the one
place that turns a prediction into x_0 and back. ``NoiseSchedule.samplers`` lists its samplers.

A sampler is a NoiseSchedule with a reverse step, and every sampler keeps one contract:
``set_timesteps(n)`` chooses the n timesteps of the walk (``timesteps``, from T-1 down) and
forgets what a multistep solver remembers, so the owner of a sampling loop calls it once before
the loop; then, for each t, ``step(model_out, t, x_t, generator)`` returns a StepOutput holding
the next sample and the x_0 the network predicted. DDPM, DDIM and DPM-Solver++(2M) share it, so
the sampling loop in denoise.py swaps samplers by taking another object.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import DiffusionConfig, SampleConfig
from .objective import Objective


class StepOutput(NamedTuple):
    """What one reverse step gives back (diffusers' prev_sample and pred_original_sample)."""
    prev_sample: torch.Tensor  # x at the walk's next timestep (the final image after the last)
    pred_original_sample: torch.Tensor  # x0_hat: the clean image the network sees in x_t


def extract(a: torch.Tensor, t: torch.Tensor, shape) -> torch.Tensor:
    """Gather a[t] per batch element and reshape to (B, 1, 1, ...) to broadcast over `shape`."""
    return a.gather(0, t).reshape(t.shape[0], *([1] * (len(shape) - 1)))


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """float64 betas: linear (Ho et al. 2020) or cosine (Nichol & Dhariwal 2021, s = 0.008)."""
    if cfg.schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, cfg.timesteps, dtype=torch.float64)
    s = 0.008
    steps = torch.arange(cfg.timesteps + 1, dtype=torch.float64) / cfg.timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)  # the paper's clip


class NoiseSchedule(Objective):
    """The tables every sampler shares, and the forward process that training uses."""

    def __init__(self, cfg: DiffusionConfig, device="cpu"):
        self.cfg = cfg
        self.device = device
        self.num_train_timesteps = cfg.timesteps
        self.prediction = cfg.prediction
        # Computed in float64 (the cumulative product loses digits in float32), stored float32.
        betas = make_betas(cfg)
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        posterior_var = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        tables = {
            "betas": betas, "alphas": alphas, "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev, "posterior_var": posterior_var,
            "sqrt_alpha_bar": alpha_bar.sqrt(), "sqrt_one_minus_alpha_bar": (1.0 - alpha_bar).sqrt(),
            # The reference's posterior mean: (x_t - eps_coef * eps) * inv_sqrt_alpha
            "eps_coef": (1.0 - alphas) / (1.0 - alpha_bar).sqrt(),
            "inv_sqrt_alpha": 1.0 / alphas.sqrt(),
            "posterior_std": posterior_var.sqrt(),
            # The same mean written through x0: c0 * x0 + ct * x_t
            "posterior_c0": betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            "posterior_ct": (1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar),
        }
        for name, value in tables.items():
            setattr(self, name, value.to(dtype=torch.float32, device=device))
        self._alpha_bar64 = alpha_bar  # float64 copy for the samplers' coefficients

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """A training timestep for each of n images, uniform over 0..T-1, drawn on the
        generator's device."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator,
                             device=generator.device)

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is fed for timestep t: t itself (flow matching scales its own)."""
        return t

    def time_fraction(self, t) -> float:
        return t / self.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, with t of shape (B,)."""
        return (extract(self.sqrt_alpha_bar, t, x0.shape) * x0
                + extract(self.sqrt_one_minus_alpha_bar, t, x0.shape) * noise)

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023), shape (B,): with them
        the loss on eps or v counts as min(SNR_t, gamma) times the squared error in x_0
        (an eps error is an x_0 error times sqrt(SNR); a v error, times sqrt(SNR + 1))."""
        ab = self.alpha_bar[t]
        snr = ab / (1 - ab)
        clipped = snr.clamp(max=gamma)
        return clipped / snr if self.prediction == "eps" else clipped / (snr + 1)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network predicts: eps, or v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022)."""
        if self.prediction == "eps":
            return noise
        return (extract(self.sqrt_alpha_bar, t, x0.shape) * noise
                - extract(self.sqrt_one_minus_alpha_bar, t, x0.shape) * x0)

    def predict_x0_eps(self, model_out: torch.Tensor, t: int, x_t: torch.Tensor):
        """(x0_hat, eps_hat): the clean image and the noise that the network's output at
        timestep t implies, with x0_hat clipped to [-1, 1] when diffusion.clip is "x0".

        :param model_out: the network's prediction (eps or v, as diffusion.prediction says).
        :param t: one timestep for the whole batch.
        :param x_t: the batch the network saw.
        """
        a, s = self.sqrt_alpha_bar[t], self.sqrt_one_minus_alpha_bar[t]
        if self.prediction == "eps":
            eps = model_out
            x0 = (x_t - s * eps) / a
        else:  # v
            x0 = a * x_t - s * model_out
            eps = s * x_t + a * model_out
        if self.cfg.clip == "x0":
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x_t - a * x0) / s  # keep the pair consistent with x_t
        return x0, eps

    def to_x0(self, out: torch.Tensor, t: int, x_t: torch.Tensor,
              prediction: str | None = None) -> torch.Tensor:
        """The x_0 a network output implies at (x_t, t), unclipped; `prediction` is the
        output's kind (default the schedule's own), so that a guide network predicting eps can
        be read beside a model predicting v."""
        a, s = self.sqrt_alpha_bar[t], self.sqrt_one_minus_alpha_bar[t]
        if (prediction or self.prediction) == "eps":
            return (x_t - s * out) / a
        return a * x_t - s * out  # v = a eps - s x_0 and x_t = a x_0 + s eps

    def from_x0(self, x0: torch.Tensor, t: int, x_t: torch.Tensor) -> torch.Tensor:
        """The output of the schedule's kind (eps or v) that implies x0 at (x_t, t)."""
        a, s = self.sqrt_alpha_bar[t], self.sqrt_one_minus_alpha_bar[t]
        eps = (x_t - a * x0) / s
        return eps if self.prediction == "eps" else a * eps - s * x0


def noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise of x's shape, drawn on the generator's device (the CPU by default)
    and moved to x's, so that a seed gives the same images on any device."""
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)


class Sampler(NoiseSchedule):
    """A noise schedule that walks back from noise: the contract of the module docstring."""

    name = ""

    def __init__(self, cfg: DiffusionConfig, device="cpu", timestep_spacing: str = "uniform"):
        super().__init__(cfg, device)
        self.timestep_spacing = timestep_spacing
        self.set_timesteps(cfg.timesteps)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, sample_cfg: SampleConfig, device="cpu"):
        """The sampler with what it reads of sample_cfg (the factory's one way to build one)."""
        return cls(cfg, device, sample_cfg.timestep_spacing)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Walk n timesteps from T-1 down, spaced as self.timestep_spacing says; forget any
        history of an earlier walk. ValueError for an n the sampler cannot take."""
        self.timesteps = self._spaced(num_inference_steps)

    def step(self, model_out: torch.Tensor, t: int, x_t: torch.Tensor,
             generator: torch.Generator | None = None) -> StepOutput:
        """One reverse step for a whole batch at the same timestep t."""
        raise NotImplementedError

    def _spaced(self, n: int) -> torch.Tensor:
        """n distinct timesteps from T-1 down, spaced as self.timestep_spacing says."""
        T = self.num_train_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"steps must be in 1..{T}, not {n}")
        if self.timestep_spacing == "trailing":  # T-1, ..., T/n - 1: the last step jumps to the data
            return (torch.arange(n, 0, -1, dtype=torch.float64) * T / n).round().long() - 1
        if self.timestep_spacing == "logsnr" and n > 1:
            # equal steps in lambda = log(alpha / sigma), each target rounded to the nearest
            # timestep; the steps bunch up near t = 0, so two targets can round to one
            # timestep: then the grid takes the next free one towards the data
            lam = 0.5 * torch.log(self._alpha_bar64 / (1 - self._alpha_bar64))
            targets = torch.linspace(float(lam[T - 1]), float(lam[0]), n, dtype=torch.float64)
            steps, floor = [], T
            for i, target in enumerate(targets.tolist()):
                t = int((lam - target).abs().argmin())
                t = min(t, floor - 1)          # strictly decreasing ...
                t = max(t, n - 1 - i)          # ... with room left for the steps still to come
                steps.append(t)
                floor = t
            return torch.tensor(steps, dtype=torch.long)
        return torch.linspace(T - 1, 0, n, dtype=torch.float64).round().long()


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020): every training step, posterior variance beta-tilde."""

    name = "ddpm"

    def set_timesteps(self, num_inference_steps: int) -> None:
        if num_inference_steps != self.num_train_timesteps:
            raise ValueError(f"DDPM samples with all {self.num_train_timesteps} steps, "
                             f"not {num_inference_steps}; use ddim or dpm for fewer")
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1)

    def step(self, model_out, t, x_t, generator=None) -> StepOutput:
        """x_t -> x_{t-1}: the posterior mean (Ho et al. eq. 7), plus sigma_t z for t > 0."""
        t = int(t)
        x0, _ = self.predict_x0_eps(model_out, t, x_t)
        if self.prediction == "eps" and self.cfg.clip != "x0":
            # 1. the mean through eps (eq. 11), as the reference writes it:
            #    (x_t - (1 - a_t) / sqrt(1 - ab_t) eps) / sqrt(a_t)
            mean = self.inv_sqrt_alpha[t] * (x_t - self.eps_coef[t] * model_out)
        else:
            # 1. the same mean through x0_hat (eq. 7): c0 x0_hat + ct x_t
            mean = self.posterior_c0[t] * x0 + self.posterior_ct[t] * x_t
        if t > 0:  # 2. no noise on the last step: x_0 is the mean
            mean = mean + self.posterior_std[t] * noise_like(x_t, generator)
        if self.cfg.clip == "x_t":
            mean = mean.clamp(-1.0, 1.0)  # 3. the reference clamps x_t at every step
        return StepOutput(mean, x0)


class DDIMSampler(Sampler):
    """Song et al. (2021): any subsequence of timesteps; eta = 0 deterministic, eta = 1 is DDPM's
    posterior on that subsequence."""

    name = "ddim"

    def __init__(self, cfg: DiffusionConfig, device="cpu", timestep_spacing: str = "uniform",
                 eta: float = 0.0):
        super().__init__(cfg, device, timestep_spacing)
        self.eta = eta

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, sample_cfg: SampleConfig, device="cpu"):
        return cls(cfg, device, sample_cfg.timestep_spacing, sample_cfg.eta)

    def prev_timestep(self, t: int) -> int:
        later = (self.timesteps < t).nonzero()
        return int(self.timesteps[later[0, 0]]) if len(later) else -1

    def step(self, model_out, t, x_t, generator=None) -> StepOutput:
        """x_t -> x_{t_prev} on the walk's subsequence (Song et al. eq. 12)."""
        t = int(t)
        t_prev = self.prev_timestep(t)
        ab = self._alpha_bar64[t].item()
        ab_prev = self._alpha_bar64[t_prev].item() if t_prev >= 0 else 1.0
        # 1. the predicted x_0 and the noise it leaves in x_t
        x0, eps = self.predict_x0_eps(model_out, t, x_t)
        # 2. sigma_t (eq. 16), eta times the DDPM posterior's standard deviation
        sigma = self.eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        # 3. x0_hat at the noise level of t_prev, plus "the direction pointing to x_t"
        x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x_prev = x_prev + sigma * noise_like(x_t, generator)
        if self.cfg.clip == "x_t":
            x_prev = x_prev.clamp(-1.0, 1.0)
        return StepOutput(x_prev, x0)


class DPMSolverSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep, first order on the first
    and last steps. With lambda = log(alpha / sigma) and h = lambda_t - lambda_s:
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D, where D is x0_hat (first order) or
    (1 + 1/(2r)) x0_s - 1/(2r) x0_prev, r = h_prev / h (second order). It remembers the last
    step's x0_hat and h, which set_timesteps forgets."""

    name = "dpm"

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.timesteps = self._spaced(num_inference_steps)
        self._prev_x0 = None
        self._prev_h = None
        self._i = 0  # how many steps of this walk were taken

    def _alpha_sigma_lambda(self, t: int):
        ab = self._alpha_bar64[t].item()
        alpha, sigma = math.sqrt(ab), math.sqrt(1 - ab)
        return alpha, sigma, math.log(alpha / sigma)

    def step(self, model_out, t, x_t, generator=None) -> StepOutput:
        """x_s -> x_t, the walk's next timestep (Lu et al. 2022, algorithm 2)."""
        t = int(t)
        x0, _ = self.predict_x0_eps(model_out, t, x_t)
        last = self._i == len(self.timesteps) - 1
        self._i += 1
        if last:  # to t = -1 (sigma = 0): the solution is the data prediction itself
            return StepOutput(x0, x0)
        t_next = int(self.timesteps[self._i])
        a_s, s_s, lam_s = self._alpha_sigma_lambda(t)
        a_t, s_t, lam_t = self._alpha_sigma_lambda(t_next)
        h = lam_t - lam_s
        # 1. D: first order on the first and last steps, else the two-point extrapolation
        if self._prev_x0 is None or self._i == len(self.timesteps) - 1:
            d = x0
        else:
            r = self._prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * self._prev_x0
        self._prev_x0, self._prev_h = x0, h
        # 2. the exponential-integrator update
        return StepOutput((s_t / s_s) * x_t - a_t * math.expm1(-h) * d, x0)


NoiseSchedule.samplers = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpm": DPMSolverSampler}
NoiseSchedule.preview = {"sampler": "ddim", "steps": 20, "eta": 0.0}
