"""Noise schedules and samplers, as objects apart from the network (the diffusers pattern).

A scheduler knows the betas and nothing about the UNet:
- ``add_noise(x0, noise, t)`` and ``target(x0, noise, t)``: the closed-form forward process
  q(x_t | x_0) and what the network learns to predict (eps or v), for training;
- ``set_timesteps(n)``, ``timesteps``, ``step(model_out, t, x_t, generator)``: the reverse
  process. DDPM, DDIM and DPM-Solver++(2M) share that interface, so the sampling loop in
  denoise.py swaps samplers by taking another object.
"""
from __future__ import annotations

import math

import torch

from .config import DiffusionConfig


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


class NoiseSchedule:
    """The tables every scheduler shares, and the training-side forward process."""

    def __init__(self, cfg: DiffusionConfig, device="cpu", grid: str = "uniform"):
        self.cfg = cfg
        self.device = device
        self.grid = grid
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
        self.set_timesteps(cfg.timesteps)

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.timesteps = self._spaced(num_inference_steps)

    # --- training ---
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

    # --- sampling helpers ---
    def split(self, model_out: torch.Tensor, t: int, x_t: torch.Tensor):
        """(x0_hat, eps_hat) from the network's output at timestep t, with x0 clipped if asked."""
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

    def noise_like(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # Drawn on the generator's device (CPU by default) so a seed gives the same images anywhere.
        gen_device = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)

    def _spaced(self, n: int) -> torch.Tensor:
        """n distinct timesteps from T-1 down, spaced as self.grid says (config.SampleConfig)."""
        T = self.num_train_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"steps must be in 1..{T}, not {n}")
        if self.grid == "trailing":  # T-1, ..., T/n - 1: the last step jumps to the data
            return (torch.arange(n, 0, -1, dtype=torch.float64) * T / n).round().long() - 1
        if self.grid == "logsnr" and n > 1:
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


class DDPMScheduler(NoiseSchedule):
    """Ancestral sampling (Ho et al. 2020): every training step, posterior variance beta-tilde."""

    name = "ddpm"

    def set_timesteps(self, num_inference_steps: int) -> None:
        if num_inference_steps != self.num_train_timesteps:
            raise ValueError(f"DDPM samples with all {self.num_train_timesteps} steps, "
                             f"not {num_inference_steps}; use ddim or dpm for fewer")
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1)

    def step(self, model_out: torch.Tensor, t: int, x_t: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One reverse step x_t -> x_{t-1} for a whole batch at the same timestep t."""
        t = int(t)
        if self.prediction == "eps" and self.cfg.clip != "x0":
            # The reference's formula: (x_t - (1 - a_t)/sqrt(1 - ab_t) eps) / sqrt(a_t)
            mean = self.inv_sqrt_alpha[t] * (x_t - self.eps_coef[t] * model_out)
        else:
            x0, _ = self.split(model_out, t, x_t)
            mean = self.posterior_c0[t] * x0 + self.posterior_ct[t] * x_t
        if t > 0:  # no noise on the last step: x_0 is the mean
            mean = mean + self.posterior_std[t] * self.noise_like(x_t, generator)
        if self.cfg.clip == "x_t":
            mean = mean.clamp(-1.0, 1.0)  # the reference clamps x_t at every step
        return mean


class DDIMScheduler(NoiseSchedule):
    """Song et al. (2021): any subsequence of timesteps; eta = 0 deterministic, eta = 1 is DDPM's
    posterior on that subsequence."""

    name = "ddim"

    def __init__(self, cfg: DiffusionConfig, device="cpu", eta: float = 0.0, grid: str = "uniform"):
        super().__init__(cfg, device, grid)
        self.eta = eta

    def prev_timestep(self, t: int) -> int:
        later = (self.timesteps < t).nonzero()
        return int(self.timesteps[later[0, 0]]) if len(later) else -1

    def step(self, model_out, t, x_t, generator=None):
        t = int(t)
        t_prev = self.prev_timestep(t)
        ab = self._alpha_bar64[t].item()
        ab_prev = self._alpha_bar64[t_prev].item() if t_prev >= 0 else 1.0
        x0, eps = self.split(model_out, t, x_t)
        sigma = self.eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x_prev = x_prev + sigma * self.noise_like(x_t, generator)
        if self.cfg.clip == "x_t":
            x_prev = x_prev.clamp(-1.0, 1.0)
        return x_prev


class DPMSolverScheduler(NoiseSchedule):
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep, first order on the first
    and last steps. With lambda = log(alpha / sigma) and h = lambda_t - lambda_s:
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D, where D is x0_hat (first order) or
    (1 + 1/(2r)) x0_s - 1/(2r) x0_prev, r = h_prev / h (second order)."""

    name = "dpm"

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.timesteps = self._spaced(num_inference_steps)
        self._prev_x0 = None
        self._prev_h = None
        self._i = 0

    def _alpha_sigma_lambda(self, t: int):
        ab = self._alpha_bar64[t].item()
        alpha, sigma = math.sqrt(ab), math.sqrt(1 - ab)
        return alpha, sigma, math.log(alpha / sigma)

    def step(self, model_out, t, x_t, generator=None):
        t = int(t)
        x0, _ = self.split(model_out, t, x_t)
        last = self._i == len(self.timesteps) - 1
        self._i += 1
        if last:  # to t = -1 (sigma = 0): the solution is the data prediction itself
            return x0
        t_next = int(self.timesteps[self._i])
        a_s, s_s, lam_s = self._alpha_sigma_lambda(t)
        a_t, s_t, lam_t = self._alpha_sigma_lambda(t_next)
        h = lam_t - lam_s
        if self._prev_x0 is None or self._i == len(self.timesteps) - 1:
            d = x0
        else:
            r = self._prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * self._prev_x0
        self._prev_x0, self._prev_h = x0, h
        return (s_t / s_s) * x_t - a_t * math.expm1(-h) * d


SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverScheduler}


def make_scheduler(name: str, cfg: DiffusionConfig, device="cpu", steps: int | None = None,
                   eta: float = 0.0, grid: str = "uniform") -> NoiseSchedule:
    """A sampler by name, with its timesteps set (all of them when steps is None)."""
    if name not in SAMPLERS:
        from .config import UserError
        raise UserError(f"unknown sampler '{name}' (known: {', '.join(SAMPLERS)})")
    extra = {"eta": eta} if name == "ddim" else {}
    sched = SAMPLERS[name](cfg, device, grid=grid, **extra)
    try:
        sched.set_timesteps(steps if steps is not None else cfg.timesteps)
    except ValueError as e:
        from .config import UserError
        raise UserError(str(e)) from None
    return sched


def sampler_for(sc, cfg: DiffusionConfig, device="cpu") -> NoiseSchedule:
    """The scheduler a SampleConfig asks for (sampler, steps, eta, grid)."""
    return make_scheduler(sc.sampler, cfg, device, sc.steps, sc.eta, sc.grid)
