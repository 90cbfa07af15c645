"""What a black-box attacker reads off a model: logits per query, and the per-example signals.

A query is the image itself or a small shift of it (Carlini et al., S&P 2022 average over
such augmentations; digits are never flipped). Shifts use ``torch.roll``: the bundled digits
have empty borders, so a roll of a pixel or two equals a shift with background padding.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_SHIFTS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


@torch.no_grad()
def logits(net: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """``float64 [N, K]`` logits of ``net`` in eval mode (the caller's mode is restored)."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out = torch.cat([net(x.to(device)).double().cpu() for x in images.split(batch_size)])
    net.train(was_training)
    return out


def query_logits(net: nn.Module, images: torch.Tensor,
                 shifts: tuple[tuple[int, int], ...] = DEFAULT_SHIFTS) -> torch.Tensor:
    """``float64 [N, Q, K]``: logits on each shifted copy (``(0, 0)`` is the image itself)."""
    return torch.stack([logits(net, torch.roll(images, s, dims=(2, 3))) for s in shifts], dim=1)


def scaled_logit(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LiRA's signal ``log p_y - log sum_{j != y} p_j`` (Carlini et al. 2022), stable in float64.

    With logits ``z`` this is ``z_y - logsumexp_{j != y} z_j``: no softmax is formed, so it
    neither saturates at p_y = 1 nor loses precision. Works on ``[N, K]`` or ``[N, Q, K]``.
    """
    z = z.double()
    y = labels.view(-1, *([1] * (z.ndim - 1))).expand(*z.shape[:-1], 1)
    z_y = z.gather(-1, y).squeeze(-1)
    others = z.scatter(-1, y, float("-inf"))
    return z_y - torch.logsumexp(others, dim=-1)


def cross_entropy(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example loss ``-log p_y`` (``[N]`` from ``[N, K]`` logits)."""
    z = z.double()
    return torch.logsumexp(z, -1) - z.gather(-1, labels.view(-1, 1)).squeeze(-1)


def true_class_probability(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``p_y`` per example: the confidence attack's score."""
    return torch.exp(-cross_entropy(z, labels))
