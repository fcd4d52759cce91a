"""FID's formula on its own: closed forms and scipy's matrix square root."""
import numpy as np
import pytest
import torch

from diffusion101.fid import feature_stats, frechet_distance


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 5, generator=g, dtype=torch.float64)
    mu, sigma = feature_stats(a)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9  # a set against itself
    # N(m1, I) vs N(m2, 4 I) in D dims: |m1 - m2|^2 + D (1 + 4 - 2 * 2) = |dm|^2 + D
    d = 5
    fid = frechet_distance(torch.zeros(d), torch.eye(d), torch.full((d,), 3.0), 4 * torch.eye(d))
    assert abs(fid - (9 * d + d)) < 1e-9
    assert torch.allclose(sigma, torch.from_numpy(np.cov(a.numpy(), rowvar=False)))


def test_frechet_distance_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    y = torch.randn(500, 8, generator=g, dtype=torch.float64) * 2 + 1
    (m1, s1), (m2, s2) = feature_stats(x), feature_stats(y)
    covmean = scipy_linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    ref = float(((m1 - m2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * np.trace(covmean))
    assert abs(frechet_distance(m1, s1, m2, s2) - ref) < 1e-6 * max(1.0, abs(ref))
