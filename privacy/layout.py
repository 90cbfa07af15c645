"""Which classes get synthetic images, decided from class counts released once with noise.

A client's class composition is private (under a skewed partition it is most of what sets a
client apart), so no DP method may size its synthetic set from the true histogram: it releases
the counts with Gaussian noise (sensitivity 1 under add/remove of one example), accounted as
one full-data release, and everything after is post-processing.
"""

from __future__ import annotations

import torch

from distill.data import DatasetInfo, LabeledImages

from .config import DPConfig
from .noise import gaussian_noise


def noisy_counts(real: LabeledImages, count_sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Class counts plus ``N(0, count_sigma^2)`` on every class, present or not."""
    hist = torch.as_tensor(real.class_histogram(), dtype=torch.float32)
    return hist + gaussian_noise(hist.shape, count_sigma, gen)


def class_counts(real: LabeledImages, config: DPConfig, noise: torch.Generator) -> torch.Tensor:
    """The run's noisy class counts: the node's earlier release when it passes one, else a new one."""
    if config.released_counts is None:
        return noisy_counts(real, config.count_sigma, noise)
    if len(config.released_counts) != real.info.num_classes:
        raise ValueError(f"released_counts has {len(config.released_counts)} classes, the data "
                         f"{real.info.num_classes}")
    return torch.tensor(config.released_counts, dtype=torch.float32)


def expected_total(counts: torch.Tensor, sample_rate: float) -> float:
    """``q * N`` with ``N`` the noisy total: the divisor of a noisy sum, free of the exact size."""
    return sample_rate * max(float(counts.sum()), 1.0)


def public_layout(counts: torch.Tensor, config: DPConfig, info: DatasetInfo) -> LabeledImages:
    """Zero images laid out as the noisy counts dictate, for ``init_synthetic`` to size the set.

    Class ``c`` gets ``min(ipc, noisy n_c)`` images if its noisy count reaches
    ``config.min_count``, none otherwise. Only noisy counts reach this function, so neither
    the class composition nor a private pixel leaks into the initialisation.
    """
    per_class = [0 if n < config.min_count else min(config.ipc, max(1, int(n))) for n in counts.tolist()]
    if not any(per_class):
        raise ValueError(f"no class has a noisy count >= {config.min_count:g} "
                         f"(count_sigma {config.count_sigma}): too little data for {config.method}")
    labels = torch.cat([torch.full((k,), c, dtype=torch.long) for c, k in enumerate(per_class)])
    return LabeledImages(torch.zeros(len(labels), *info.image_shape), labels, info)
