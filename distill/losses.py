"""Matching objectives as pure functions, apart from the loops that use them."""

from __future__ import annotations

from typing import Sequence

import torch


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean feature vector per class, ``[num_classes, D]`` (zeros for absent classes)."""
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


def mean_embedding_distance(real_means: torch.Tensor, syn_means: torch.Tensor) -> torch.Tensor:
    """Distribution matching (Zhao & Bilen, WACV 2023): squared distance of class-wise means, summed."""
    return ((real_means - syn_means) ** 2).sum()


def gradient_match_distance(grads_syn: Sequence[torch.Tensor], grads_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """Layer-wise gradient distance of Zhao et al. (ICLR 2021), eq. 10.

    Each weight gradient is viewed as ``[out, rest]``; the distance sums ``1 - cos`` over output
    units. One-dimensional gradients (biases, norm parameters) are left out, as in the paper.
    """
    total = grads_syn[0].new_zeros(())
    for gs, gr in zip(grads_syn, grads_real):
        if gs.ndim == 1:
            continue
        gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        cos = (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + 1e-6)
        total = total + (1 - cos).sum()
    return total
