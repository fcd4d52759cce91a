"""The Frechet distance between two Gaussians fitted to feature vectors (FID's formula), in
float64: the mathematics of the FID, apart from which network gives the features."""
from __future__ import annotations

import torch


def feature_stats(features: torch.Tensor):
    """Mean (D,) and covariance (D, D), float64, unbiased as numpy's cov."""
    f = features.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) in float64.

    tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}): the inner matrix is symmetric PSD, so
    an eigendecomposition gives the same value as scipy's sqrtm, without complex round-off."""
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    r1 = _sqrtm_psd(s1)
    inner = r1 @ s2 @ r1
    covmean_trace = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * covmean_trace)
