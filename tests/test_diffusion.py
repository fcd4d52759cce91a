import math

import torch

from diffusion101.config import DiffusionConfig
from diffusion101.diffusion import DDPMScheduler, extract


def test_schedule_closed_forms():
    s = DDPMScheduler(DiffusionConfig())
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
    s = DDPMScheduler(DiffusionConfig())
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 400, 999])
    xt = s.add_noise(x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        ab = s.alpha_bar[ti].item()
        assert torch.allclose(xt[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i], atol=1e-6)
    assert extract(s.alpha_bar, t, x0.shape).shape == (3, 1, 1, 1)


def test_step_matches_formula_and_is_deterministic():
    cfg = DiffusionConfig(clip="none")
    s = DDPMScheduler(cfg)
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t = 700
    a, ab, var = s.alphas[t].item(), s.alpha_bar[t].item(), s.posterior_var[t].item()
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    expected = (x - (1 - a) / math.sqrt(1 - ab) * eps) / math.sqrt(a) + math.sqrt(var) * z
    got = s.step(eps, t, x, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(got, expected, atol=1e-5)
    again = s.step(eps, t, x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, again)
    # t = 0 adds no noise: the result is the mean itself
    a0, ab0 = s.alphas[0].item(), s.alpha_bar[0].item()
    mean0 = (x - (1 - a0) / math.sqrt(1 - ab0) * eps) / math.sqrt(a0)
    assert torch.allclose(s.step(eps, 0, x), mean0, atol=1e-5)


def test_reference_clamps_every_step():
    s = DDPMScheduler(DiffusionConfig())  # clip = "x_t", as the reference
    out = s.step(torch.full((1, 1, 2, 2), -50.0), 10, torch.zeros(1, 1, 2, 2))
    assert out.max().item() <= 1.0 and out.min().item() >= -1.0
