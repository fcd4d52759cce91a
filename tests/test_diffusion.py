import math

import pytest
import torch

from diffusion101.config import DiffusionConfig
from diffusion101.presets import get_preset
from conftest import sampler_by_name
from diffusion101.diffusion import DDPMSampler, NoiseSchedule, StepOutput, extract


def test_schedule_closed_forms():
    s = DDPMSampler(DiffusionConfig())
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    prod = 1.0
    for t, b in enumerate(betas):
        prev = prod
        prod *= 1 - b
        if t in (0, 1, 10, 500, 999):
            assert math.isclose(s.alpha_bar[t].item(), prod, rel_tol=1e-5)
            var = (1 - (1 - b)) * (1 - prev) / (1 - prod)
            assert math.isclose(s.posterior_var[t].item(), var, rel_tol=1e-5, abs_tol=1e-12)
    assert s.posterior_var[0].item() == 0.0  # alpha_bar_prev(0) = 1
    assert math.isclose(s.alpha_bar[-1].item(), 4.0358e-5, rel_tol=1e-3)


def test_add_noise_closed_form_and_extract():
    s = DDPMSampler(DiffusionConfig())
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 400, 999])
    xt = s.add_noise(x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        ab = s.alpha_bar[ti].item()
        assert torch.allclose(xt[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i], atol=1e-6)
    assert extract(s.alpha_bar, t, x0.shape).shape == (3, 1, 1, 1)


def test_step_matches_formula_and_is_deterministic():
    cfg = DiffusionConfig(clip="none")
    s = DDPMSampler(cfg)
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t = 700
    a, ab, var = s.alphas[t].item(), s.alpha_bar[t].item(), s.posterior_var[t].item()
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    expected = (x - (1 - a) / math.sqrt(1 - ab) * eps) / math.sqrt(a) + math.sqrt(var) * z
    got = s.step(eps, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
    assert torch.allclose(got, expected, atol=1e-5)
    again = s.step(eps, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
    assert torch.equal(got, again)
    # t = 0 adds no noise: the result is the mean itself
    a0, ab0 = s.alphas[0].item(), s.alpha_bar[0].item()
    mean0 = (x - (1 - a0) / math.sqrt(1 - ab0) * eps) / math.sqrt(a0)
    assert torch.allclose(s.step(eps, 0, x).prev_sample, mean0, atol=1e-5)


def test_reference_clamps_every_step():
    s = DDPMSampler(DiffusionConfig())  # clip = "x_t", as the reference
    out = s.step(torch.full((1, 1, 2, 2), -50.0), 10, torch.zeros(1, 1, 2, 2)).prev_sample
    assert out.max().item() <= 1.0 and out.min().item() >= -1.0


# ---- fast samplers (DDIM, DPM-Solver++) -------------------------------------------------

def test_ddim_eta1_all_steps_is_the_ddpm_posterior():
    cfg = DiffusionConfig(clip="none")
    ddpm, ddim = sampler_by_name("ddpm", cfg), sampler_by_name("ddim", cfg, steps=1000, eta=1.0)
    assert torch.equal(ddpm.timesteps, ddim.timesteps)
    x, eps = torch.randn(4096, 1, 1, 1), torch.randn(4096, 1, 1, 1)
    for t in (999, 500, 37, 1):
        # noise-free parts agree (same mean) ...
        zero = torch.Generator()
        mean_ddpm = ddpm.inv_sqrt_alpha[t] * (x - ddpm.eps_coef[t] * eps)
        sigma = 1.0 * math.sqrt((1 - ddim.alpha_bar_prev[t].item()) / (1 - ddim.alpha_bar[t].item())
                                * (1 - ddim.alpha_bar[t].item() / ddim.alpha_bar_prev[t].item()))
        assert math.isclose(sigma ** 2, ddpm.posterior_var[t].item(), rel_tol=1e-4)
        # ... and with the same noise draw the two steps coincide
        a = ddpm.step(eps, t, x, generator=zero.manual_seed(t)).prev_sample
        b = ddim.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert torch.allclose(a, b, atol=1e-4), (t, (a - b).abs().max())
        assert torch.allclose((a - mean_ddpm).std(), torch.tensor(sigma), rtol=0.05)


def test_ddim_eta0_is_deterministic_and_ignores_generator():
    s = sampler_by_name("ddim", DiffusionConfig(clip="x0"), steps=10, eta=0.0)
    assert len(s.timesteps) == 10 and s.timesteps[0] == 999 and s.timesteps[-1] == 0
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    a = s.step(eps, 999, x, generator=torch.Generator().manual_seed(1)).prev_sample
    b = s.step(eps, 999, x, generator=torch.Generator().manual_seed(2)).prev_sample
    assert torch.equal(a, b)


def test_v_prediction_round_trip():
    s = sampler_by_name("ddim", DiffusionConfig(prediction="v", clip="none"), steps=10)
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([900, 900, 900])
    xt = s.add_noise(x0, eps, t)
    x0_hat, eps_hat = s.predict_x0_eps(s.target(x0, eps, t), 900, xt)
    assert torch.allclose(x0_hat, x0, atol=1e-4) and torch.allclose(eps_hat, eps, atol=1e-4)


def test_cosine_schedule_closed_form():
    s = sampler_by_name("ddim", DiffusionConfig(schedule="cosine"), steps=10)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 250, 500, 900):
        assert math.isclose(s.alpha_bar[t].item(), f(t + 1) / f(0), rel_tol=1e-4)


def test_samplers_recover_x0_with_an_oracle():
    # With a model that knows the true x0 (it returns the exact noise of x_t given x0), every
    # sampler must land on x0: the update rules are consistent with the forward process.
    cfg = DiffusionConfig(clip="none")
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    for name, steps in (("ddim", 10), ("dpm", 10), ("ddpm", 1000)):
        s = sampler_by_name(name, cfg, steps=steps)
        x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        for t in s.timesteps.tolist():
            eps = (x - s.sqrt_alpha_bar[t] * x0) / s.sqrt_one_minus_alpha_bar[t]
            x = s.step(eps, t, x, generator=g).prev_sample
        assert torch.allclose(x, x0, atol=1e-3), (name, (x - x0).abs().max())


def test_unknown_sampler_and_bad_steps():
    from diffusion101.config import UserError
    with pytest.raises(UserError):
        sampler_by_name("euler", DiffusionConfig())
    with pytest.raises(UserError):
        sampler_by_name("ddpm", DiffusionConfig(), steps=50)
    with pytest.raises(UserError):
        sampler_by_name("ddim", DiffusionConfig(), steps=0)


def _gaussian_gain_error(name: str, steps: int, spacing: str = "uniform", s: float = 0.5,
                         prediction: str = "eps", schedule: str = "linear") -> float:
    """Data x_0 ~ N(0, s^2) per pixel, with the exact noise prediction for it,
    E[eps | x_t] = sqrt(1 - ab_t) x_t / (ab_t s^2 + 1 - ab_t). The probability-flow ODE then
    maps x_T to x_0 = x_T * s / sqrt(ab_T s^2 + 1 - ab_T) exactly, and a deterministic sampler
    is a solver of that ODE: its relative error in this gain is the solver's own error, step
    by step (an oracle that knows x_0 would hide every intermediate update)."""
    cfg = DiffusionConfig(clip="none", prediction=prediction, schedule=schedule)
    sched = sampler_by_name(name, cfg, steps=steps, timestep_spacing=spacing)
    ab = sched.alpha_bar.double()
    x = torch.ones(1, 1, 1, 1)
    for t in sched.timesteps.tolist():
        eps = math.sqrt(1 - ab[t]) * x.double() / (ab[t] * s * s + 1 - ab[t])
        # v = sqrt(ab) eps - sqrt(1 - ab) x0, with x0 the one that x_t and eps imply
        out = eps if prediction == "eps" else (eps - math.sqrt(1 - ab[t]) * x.double()) / math.sqrt(ab[t])
        x = sched.step(out.float(), t, x).prev_sample
    t_max = sched.timesteps[0].item()
    return x.item() / (s / math.sqrt(ab[t_max] * s * s + 1 - ab[t_max])) - 1


def test_deterministic_samplers_solve_the_flow_of_gaussian_data():
    ddim = {n: _gaussian_gain_error("ddim", n) for n in (10, 20, 50, 1000)}
    dpm = {n: _gaussian_gain_error("dpm", n) for n in (10, 20, 50)}
    # first order: the error shrinks with the steps, and all 1000 of them leave almost none
    assert abs(ddim[10]) > abs(ddim[20]) > abs(ddim[50]) > abs(ddim[1000])
    assert abs(ddim[1000]) < 5e-3 and abs(ddim[10]) > 0.1
    # second order: better than DDIM at equal steps, and close by 50 steps (this grid ends at
    # t = 0 with first-order steps, which caps how close)
    for n in (10, 20, 50):
        assert abs(dpm[n]) < abs(ddim[n]), (n, dpm[n], ddim[n])
    assert abs(dpm[50]) < 1e-2 and abs(dpm[20]) < 0.08


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_solver_error_falls_with_its_order_as_steps_double(prediction, schedule):
    # Doubling the steps halves a first-order solver's error (DDIM) and quarters a second-order
    # one's (DPM-Solver++(2M)); on the log-SNR grid, where the step sizes are even in the
    # variable the solver integrates in.
    steps = (20, 40, 80)
    ddim = [_gaussian_gain_error("ddim", n, "logsnr", prediction=prediction, schedule=schedule)
            for n in steps]
    dpm = [_gaussian_gain_error("dpm", n, "logsnr", prediction=prediction, schedule=schedule)
           for n in steps]
    for i in range(2):
        assert 1.8 < ddim[i] / ddim[i + 1] < 2.2, ddim
        assert dpm[i] / dpm[i + 1] > 3.0, dpm
    assert all(abs(b) < abs(a) for a, b in zip(ddim, dpm)), (ddim, dpm)


@pytest.mark.parametrize("spacing", ["uniform", "logsnr", "trailing"])
def test_timestep_spacings_start_at_the_top_fall_strictly_and_end_where_they_say(spacing):
    for n in (1, 2, 5, 15, 20, 30, 50, 200, 1000):
        steps = sampler_by_name("dpm", DiffusionConfig(), steps=n, timestep_spacing=spacing).timesteps.tolist()
        assert len(steps) == n and steps[0] == 999 and all(a > b for a, b in zip(steps, steps[1:]))
        if n > 1:
            # uniform and logsnr visit t = 0; trailing stops one spacing above it
            assert steps[-1] == (round(1000 / n) - 1 if spacing == "trailing" else 0), (n, steps[-3:])
    if spacing == "logsnr":
        # equal steps in lambda = log(alpha/sigma) before rounding: the early (noisy) steps
        # are long in t, the late ones short
        steps = sampler_by_name("dpm", DiffusionConfig(), steps=20, timestep_spacing=spacing).timesteps.tolist()
        assert steps[0] - steps[1] > 40 and steps[-2] - steps[-1] <= 2


def test_log_snr_grid_solves_the_gaussian_flow_better_than_uniform_at_few_steps():
    def error(spacing, n):
        return abs(_gaussian_gain_error("dpm", n, spacing))
    assert error("logsnr", 10) < 0.05 < error("uniform", 10)
    assert error("logsnr", 20) < 0.5 * error("uniform", 20)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weight_makes_the_loss_min_snr_times_the_x0_error(prediction):
    # Hang et al. 2023: the weighted loss on the network's target equals min(SNR_t, gamma)
    # times the squared error of the x_0 it implies
    cfg = get_preset("tiny").diffusion
    cfg.prediction, cfg.clip = prediction, "none"
    sched = NoiseSchedule(cfg)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 5, 30, 60, 99])
    x0, noise = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    xt = sched.add_noise(x0, noise, t)
    target = sched.target(x0, noise, t)
    pred = target + 0.1 * torch.randn(target.shape, generator=g)
    x0_hat = torch.stack([sched.predict_x0_eps(pred[i:i + 1], int(t[i]), xt[i:i + 1])[0][0] for i in range(5)])
    ab = sched.alpha_bar[t].double()
    snr = ab / (1 - ab)
    gamma = 5.0
    assert (snr > gamma).any() and (snr < gamma).any()  # both sides of the clip are checked
    weighted = sched.min_snr_weight(t, gamma).double() * (pred - target).double().square().flatten(1).mean(1)
    expected = snr.clamp(max=gamma) * (x0_hat - x0).double().square().flatten(1).mean(1)
    assert torch.allclose(weighted, expected, rtol=1e-3)


# ---- the sampler contract: one test, every sampler -----------------------------------------

# (name, steps, eta): DDPM walks every timestep; DDIM with and without noise; DPM-Solver++.
CONTRACT = [("ddpm", 100, 0.0), ("ddim", 10, 0.0), ("ddim", 10, 1.0), ("dpm", 10, 0.0)]


def _exact_model(sched, x0):
    """The network that knows the data is the one image x0: from x_t it returns the exact eps
    (or v) of x_t given x0."""
    def model(x_t, t):
        a, s = sched.sqrt_alpha_bar[t], sched.sqrt_one_minus_alpha_bar[t]
        eps = (x_t - a * x0) / s
        return eps if sched.prediction == "eps" else a * eps - s * x0
    return model


def _walk(sched, model, x, seed):
    """The sampling loop as its owner runs it: set_timesteps, then step after step."""
    sched.set_timesteps(len(sched.timesteps))
    g = torch.Generator().manual_seed(seed)
    outputs = []
    for t in sched.timesteps.tolist():
        out = sched.step(model(x, t), t, x, generator=g)
        outputs.append(out)
        x = out.prev_sample
    return outputs


@pytest.mark.parametrize("name, steps, eta", CONTRACT, ids=[f"{n}-{e}" for n, _, e in CONTRACT])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_every_sampler_keeps_the_contract(name, steps, eta, prediction):
    cfg = DiffusionConfig(timesteps=100, beta_end=0.2, prediction=prediction, clip="none")
    sched = sampler_by_name(name, cfg, steps=steps, eta=eta)
    assert sched.name == name and len(sched.timesteps) == steps
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
    x_T = torch.randn(x0.shape, generator=g)
    exact = _exact_model(sched, x0)
    walk = _walk(sched, exact, x_T, seed=1)
    # a named result of the input's shape and dtype
    for out in walk:
        assert isinstance(out, StepOutput)
        for tensor in out:
            assert tensor.shape == x0.shape and tensor.dtype == torch.float32
    # the predicted x_0 of an exact model is x_0, at every step of the walk, and so is the end
    for out in walk:
        assert torch.allclose(out.pred_original_sample, x0, atol=1e-3), name
    assert torch.allclose(walk[-1].prev_sample, x0, atol=1e-3)
    # the same generator gives the same walk, bit for bit (a model that is not exact, so the
    # noise the stochastic samplers add shows in the result)
    def rough(x, t):
        return 0.5 * exact(x, t) + 0.1 * x
    a = [o.prev_sample for o in _walk(sched, rough, x_T, seed=7)]
    b = [o.prev_sample for o in _walk(sched, rough, x_T, seed=7)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = _walk(sched, rough, x_T, seed=8)[-1].prev_sample
    assert torch.equal(a[-1], c) == (name == "dpm" or (name == "ddim" and eta == 0))
    # set_timesteps forgets the last walk: after a walk with another model, a walk equals the
    # one a fresh sampler takes
    fresh = sampler_by_name(name, cfg, steps=steps, eta=eta)
    _walk(sched, exact, x_T, seed=3)
    again = _walk(sched, rough, x_T, seed=7)[-1].prev_sample
    assert torch.equal(again, _walk(fresh, rough, x_T, seed=7)[-1].prev_sample)
    assert torch.equal(again, a[-1])


def test_the_contract_covers_every_sampler():
    # (flow matching's samplers keep it in tests/test_flow.py)
    assert {name for name, _, _ in CONTRACT} == set(NoiseSchedule.samplers)


def test_training_uses_the_noise_schedule_without_a_sampler():
    # NoiseSchedule alone has the forward process and no walk to reset
    sched = NoiseSchedule(DiffusionConfig(timesteps=100, beta_end=0.2))
    assert not hasattr(sched, "timesteps") and not hasattr(sched, "step")
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t = torch.tensor([3, 70])
    x_t = sched.add_noise(x0, eps, t)
    x0_hat, eps_hat = sched.predict_x0_eps(sched.target(x0, eps, t)[1:], 70, x_t[1:])
    assert torch.allclose(x0_hat, x0[1:], atol=1e-4) and torch.allclose(eps_hat, eps[1:], atol=1e-4)
