"""The Gaussian mechanism's pieces as pure functions: Poisson sampling, clipping, noisy sums.

Each draws its randomness from a ``torch.Generator`` passed in, so a DP run is reproducible
with a seed. That generator is not cryptographically secure: fine for research, not for a
deployment (see docs/privacy.md, ``secure_mode``).
"""

from __future__ import annotations

from typing import Sequence

import torch


def poisson_sample(n: int, sample_rate: float, gen: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample: each of ``n`` examples is in with probability ``sample_rate``.

    The subsampled Gaussian analysis of Opacus's accountants assumes exactly this sampling.
    """
    return torch.nonzero(torch.rand(n, generator=gen) < sample_rate).flatten()


def clip_rows(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale each row of ``x`` to L2 norm at most ``clip`` (differentiable)."""
    norms = x.norm(dim=1, keepdim=True)
    return x * (clip / (norms + 1e-6)).clamp(max=1.0)


def gaussian_noise(shape: Sequence[int], std: float, gen: torch.Generator,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """``N(0, std^2)`` of ``shape``, drawn on the CPU from ``gen`` (same numbers on any device)."""
    return (torch.randn(tuple(shape), generator=gen) * std).to(device)


def noisy_class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int, clip: float,
                     sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Class-wise sums of row-clipped ``features`` plus ``N(0, sigma^2 clip^2)`` on every entry.

    One example changes one class's row by at most ``clip`` in L2 norm, so the whole
    ``[num_classes, D]`` release is one Gaussian mechanism of sensitivity ``clip``. Noise goes
    on every class, present or not: which classes are empty is private too.
    """
    sums = features.new_zeros(num_classes, features.shape[1])
    sums.index_add_(0, labels, clip_rows(features, clip))
    return sums + gaussian_noise(sums.shape, sigma * clip, gen, sums.device)


def clip_and_sum_grad_samples(grad_samples: Sequence[torch.Tensor], clip: float) -> list[torch.Tensor]:
    """Flat clipping of per-example gradients over all parameters, then the sum over examples.

    ``grad_samples[j]`` is ``[B, *param_j.shape]``; example ``i``'s gradient is scaled by
    ``min(1, clip / ||g_i||)`` with ``||g_i||`` its norm across every parameter (Abadi et al. 2016).
    """
    flat = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in grad_samples], dim=1)
    factor = (clip / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...->...", factor, g) for g in grad_samples]
