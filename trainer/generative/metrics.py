"""Fréchet distance and KID between two feature sets, computed by torchmetrics (its FID/KID over features
already extracted, so any extractor works), and the real-data features cached per dataset and extractor."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from blocktrain.trainer.io import atomic_path


class _Given(nn.Module):
    """The identity over precomputed features, as torchmetrics' feature extractor."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features):
        return features


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 10, subset_size: int = 100) -> float:
    """KID (polynomial-kernel MMD²), the mean over ``subsets`` random subsets of ``min(subset_size, n)``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, real.shape[0], fake.shape[0])
    metric = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute()[0])


@torch.no_grad()
def extract(features: Callable[[torch.Tensor], torch.Tensor], images: Iterable[torch.Tensor]) -> torch.Tensor:
    """Features of every batch of images (in [-1, 1]), concatenated, on the CPU."""
    return torch.cat([features(x).float().cpu() for x in images])


def cached_real_features(path: Path, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Features of the real data, read from ``path`` or computed once and written there (atomically)."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    feats = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(feats, tmp)
    return feats
