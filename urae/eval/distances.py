"""Distances between two sets of feature vectors: the Fréchet distance (FID's formula; FD-DINOv2 on DINOv2
features) and CMMD's maximum mean discrepancy with a Gaussian kernel (on CLIP embeddings).

Both in float64: the matrix square root of FD loses digits fast in float32.
"""

from __future__ import annotations

import torch

# CMMD (Jayasumana et al. 2024, google-research/cmmd distance.py): RBF kernel of bandwidth 10 on unit-norm
# CLIP embeddings, the biased (V-statistic) MMD², reported ×1000.
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors, got shape {tuple(x.shape)}")
    return x.mean(0), torch.cov(x.T)


def frechet_from_stats(mu1, cov1, mu2, cov2) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½).

    Tr((Σ1 Σ2)^½) is the sum of the square roots of the eigenvalues of Σ1^½ Σ2 Σ1^½ (similar to Σ1 Σ2, and
    symmetric positive semi-definite, so eigh applies and no complex roots appear)."""
    mu1, mu2, cov1, cov2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, cov1, cov2))
    e1, v1 = torch.linalg.eigh(cov1)
    root1 = (v1 * e1.clamp(min=0).sqrt()) @ v1.T
    middle = root1 @ cov2 @ root1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    d = mu1 - mu2
    return max(0.0, float(d @ d + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt))  # ≥ 0 up to rounding


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """FD between the Gaussians fitted to two sets of features (rows), with unbiased covariances."""
    return frechet_from_stats(*_stats(x), *_stats(y))


def mmd2(x: torch.Tensor, y: torch.Tensor, sigma: float = CMMD_SIGMA) -> float:
    """Biased MMD² with the kernel exp(−‖a − b‖² / 2σ²): mean k(x, x') + mean k(y, y') − 2 mean k(x, y)."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    gamma = 1 / (2 * sigma**2)

    def k(a, b):
        return torch.exp(-gamma * torch.cdist(a, b).square()).mean()

    return float(k(x, x) + k(y, y) - 2 * k(x, y))


def cmmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """CMMD between two sets of CLIP image embeddings (normalised here, as CMMD does)."""
    x = torch.nn.functional.normalize(x.to(torch.float64), dim=-1)
    y = torch.nn.functional.normalize(y.to(torch.float64), dim=-1)
    return CMMD_SCALE * mmd2(x, y)
