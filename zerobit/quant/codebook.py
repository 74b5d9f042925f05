"""Codebook (non-uniform) quantization: 1-D k-means centroids shared by a layer; zero stays exact."""

from __future__ import annotations

import torch


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 30) -> torch.Tensor:
    """k centroids of 1-D `values` (sorted), initialised on quantiles, refined by Lloyd iterations.

    Example:
        >>> kmeans_1d(torch.tensor([-1.0, -1.1, 1.0, 0.9]), 2).tolist()
        [-1.0499999523162354, 0.949999988079071]
    """
    values = values.detach().flatten().float()
    if values.numel() == 0:
        return torch.zeros(k, device=values.device)
    if values.numel() > 50_000:  # a fixed subsample keeps large layers fast
        pick = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:50_000]
        values = values[pick.to(values.device)]
    centroids = torch.quantile(values, torch.linspace(0, 1, k + 2, device=values.device)[1:-1])
    for _ in range(iterations):
        assign = nearest(values, centroids)
        sums = torch.zeros(k, device=values.device).index_add_(0, assign, values)
        counts = torch.zeros(k, device=values.device).index_add_(0, assign, torch.ones_like(values))
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if torch.allclose(updated, centroids):
            break
        centroids = updated
    return torch.sort(centroids).values


def nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (centroids sorted ascending) for every value."""
    mids = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(values, mids)


def codebook_error(values: torch.Tensor, centroids: torch.Tensor) -> float:
    """Sum of squared distances of `values` to their nearest centroid."""
    return float((values - centroids[nearest(values, centroids)]).pow(2).sum())
