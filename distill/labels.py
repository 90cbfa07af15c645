"""Learnable soft labels (label distillation, Sucholutsky & Schonlau 2021), as logits.

A method that learns labels optimises one logit row per synthetic image and reads the
labels as ``softmax(logits)``: they are probability distributions by construction, which is
what the trainer's cross-entropy expects and what the server's upload check requires.

>>> z = LabelLogits(torch.tensor([0, 2]), 3)
>>> z.probs().argmax(1).tolist(), bool(torch.allclose(z.probs().sum(1), torch.ones(2)))
([0, 2], True)
"""

from __future__ import annotations

import torch

# Logit of the true class at init: softmax puts ~0.9 on it for 10 classes, leaving the other
# classes room to grow (a one-hot start has no gradient signal through a saturated softmax).
INIT_MARGIN = 4.4


class LabelLogits:
    """Learnable label logits, one row per synthetic image, starting near its one-hot class."""

    def __init__(self, labels: torch.Tensor, num_classes: int, margin: float = INIT_MARGIN) -> None:
        init = torch.nn.functional.one_hot(labels, num_classes).float() * margin
        self.logits = init.to(labels.device).requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.logits]

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, 1)

    def export(self) -> torch.Tensor:
        """float32 [N, K] distributions, detached, on the CPU (for :class:`SyntheticSet`)."""
        return self.probs().detach().float().cpu().clone()
