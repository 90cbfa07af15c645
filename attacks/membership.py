"""Membership inference: the audit protocol, threshold attacks, and the model-free distance attack.

Protocol (as the literature's standard, e.g. Carlini et al. S&P 2022): an audit pool of real
images from one distribution; the target pipeline sees a random half (members), the other
half never enters it (non-members), so the two groups are balanced and exchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from distill.data import LabeledImages
from distill.networks import embed_in_chunks
from distill.synthetic import SyntheticSet

from .metrics import MIAMetrics, roc_curve, summarize
from .signals import cross_entropy, logits, true_class_probability


@dataclass
class AttackResult:
    """Scores of one attack on one target; higher means "member"."""

    attack: str
    target: str
    scores_in: np.ndarray
    scores_out: np.ndarray
    extra: dict = field(default_factory=dict)

    @property
    def metrics(self) -> MIAMetrics:
        return summarize(self.scores_in, self.scores_out)

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        fpr, tpr, _ = roc_curve(self.scores_in, self.scores_out)
        return fpr, tpr

    def to_dict(self) -> dict:
        return {"attack": self.attack, "target": self.target, **self.metrics.to_dict(), **self.extra}


def split_pool(n: int, seed: int) -> np.ndarray:
    """A boolean mask with exactly ``n // 2`` members, at random positions."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[: n // 2]] = True
    return mask


def audit_pool(data: LabeledImages, size: int, seed: int) -> LabeledImages:
    """``size`` images drawn at random (without replacement) from ``data``."""
    if not 2 <= size <= len(data):
        raise ValueError(f"audit pool size must be in [2, {len(data)}], got {size}")
    return data.subset(np.sort(np.random.default_rng(seed).permutation(len(data))[:size]))


def loss_attack(net: nn.Module, members: LabeledImages, non_members: LabeledImages,
                target: str = "") -> AttackResult:
    """Score = minus the cross-entropy loss (Yeom et al., CSF 2018): members are fit better."""
    s = [-cross_entropy(logits(net, d.images), d.labels).numpy() for d in (members, non_members)]
    return AttackResult("loss", target, *s)


def confidence_attack(net: nn.Module, members: LabeledImages, non_members: LabeledImages,
                      target: str = "") -> AttackResult:
    """Score = the true class's softmax probability (Salem et al., NDSS 2019)."""
    s = [true_class_probability(logits(net, d.images), d.labels).numpy() for d in (members, non_members)]
    return AttackResult("confidence", target, *s)


@torch.no_grad()
def nearest_synthetic_distance(syn: SyntheticSet, data: LabeledImages, same_class: bool = True,
                               embedder: nn.Module | None = None) -> np.ndarray:
    """Per real image, the L2 distance to its nearest synthetic image.

    In pixel space, or in ``embedder.embed`` feature space when an embedder is given (a frozen
    network: memorised images may sit close in features without matching pixel by pixel).
    With ``same_class`` only synthetic images of the real image's class count (an image whose
    class is absent from the set gets +inf).
    """
    def feats(x: torch.Tensor) -> torch.Tensor:
        return (embed_in_chunks(embedder, x) if embedder is not None else x).flatten(1).double()

    s, r = feats(syn.images), feats(data.images)
    d = torch.cdist(r, s)
    if same_class:
        mismatch = data.labels.view(-1, 1) != syn.hard_labels().view(1, -1)
        d = d.masked_fill(mismatch, float("inf"))
    return d.min(dim=1).values.numpy()


def distance_attack(syn: SyntheticSet, members: LabeledImages, non_members: LabeledImages,
                    target: str = "", embedder: nn.Module | None = None) -> AttackResult:
    """Model-free attack on an uploaded set: score = minus the distance to the nearest synthetic image.

    Real-initialised sets start as copies of some members, which this finds at once
    (Dong, Zhao & Lyu, ICML 2022 discuss the leak; Carlini, Feldman & Nasr 2022 the audit).
    Images of classes absent from the set get the lowest finite score seen, minus one.
    """
    s_in, s_out = (-nearest_synthetic_distance(syn, d, embedder=embedder) for d in (members, non_members))
    finite = np.concatenate([s_in, s_out])
    floor = finite[np.isfinite(finite)].min() - 1.0 if np.isfinite(finite).any() else 0.0
    s_in, s_out = np.where(np.isfinite(s_in), s_in, floor), np.where(np.isfinite(s_out), s_out, floor)
    name = "distance-feature" if embedder is not None else "distance-pixel"
    return AttackResult(name, target, s_in, s_out)
