"""Backdoor poisoning of a client's real data before distillation, and how it is measured.

NAIVEATTACK of Liu, Li, Backes, Shen & Zhang, "Backdoor Attacks Against Dataset Distillation"
(NDSS 2023): stamp a trigger on a fraction of the real images, relabel them to the target
class, distill as usual. Their default trigger is a small white square one pixel in from the
bottom-right corner. ASR is measured on every non-target test image with the trigger, CTA on
the clean test set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distill.data import DatasetInfo, LabeledImages
from distill.networks import seeded_network
from distill.train import TrainConfig, accuracy, train_network

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


@dataclass
class Trigger:
    """A square patch: ``pattern`` ``[C, size, size]`` in the dataset's *normalised* space.

    Stamping replaces exactly the patch's pixels and nothing else.
    """

    pattern: torch.Tensor
    margin: int = 1
    corner: str = "bottom-right"

    def __post_init__(self) -> None:
        if self.pattern.ndim != 3 or self.pattern.shape[1] != self.pattern.shape[2]:
            raise ValueError(f"pattern must be [C, s, s], got {tuple(self.pattern.shape)}")
        if self.corner not in CORNERS:
            raise ValueError(f"corner must be one of {CORNERS}, got {self.corner!r}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")

    @property
    def size(self) -> int:
        return int(self.pattern.shape[1])

    @classmethod
    def solid(cls, info: DatasetInfo, size: int = 2, value: float = 1.0, margin: int = 1,
              corner: str = "bottom-right") -> "Trigger":
        """A uniform patch of pixel ``value`` in [0, 1] (1.0 = white), normalised per channel."""
        if size < 1 or size + margin > min(info.height, info.width):
            raise ValueError(f"trigger size {size} with margin {margin} does not fit {info.image_shape}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"value is a pixel intensity in [0, 1], got {value}")
        per_channel = [(value - m) / s for m, s in zip(info.mean, info.std)]
        pattern = torch.tensor(per_channel, dtype=torch.float32).view(-1, 1, 1).expand(-1, size, size)
        return cls(pattern.clone(), margin, corner)

    def region(self, height: int, width: int) -> tuple[slice, slice]:
        """Rows and columns the patch covers in an image of this size."""
        s, m = self.size, self.margin
        rows = slice(height - m - s, height - m) if self.corner.startswith("bottom") else slice(m, m + s)
        cols = slice(width - m - s, width - m) if self.corner.endswith("right") else slice(m, m + s)
        return rows, cols

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """A copy of ``images`` [N, C, H, W] with the patch pasted in (differentiable in the pattern)."""
        rows, cols = self.region(images.shape[2], images.shape[3])
        out = images.clone()
        out[:, :, rows, cols] = self.pattern.to(images.device, images.dtype)
        return out


def pick_poison(labels: torch.Tensor, fraction: float, target: int, seed: int) -> np.ndarray:
    """Indices of ``round(fraction * N)`` random images whose label is not ``target``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"poison fraction must be in [0, 1], got {fraction}")
    candidates = np.flatnonzero(labels.numpy() != target)
    k = min(int(round(fraction * len(labels))), len(candidates))
    return np.sort(np.random.default_rng(seed).permutation(candidates)[:k])


def poison(data: LabeledImages, trigger: Trigger, fraction: float, target: int,
           seed: int = 0) -> tuple[LabeledImages, np.ndarray]:
    """NAIVEATTACK's data: a copy of ``data`` with the chosen images stamped and relabelled.

    Returns the poisoned data and the poisoned indices (so DOORPING can re-stamp them).
    """
    if not 0 <= target < data.info.num_classes:
        raise ValueError(f"target {target} outside [0, {data.info.num_classes})")
    idx = pick_poison(data.labels, fraction, target, seed)
    images, labels = data.images.clone(), data.labels.clone()
    t = torch.as_tensor(idx, dtype=torch.long)
    if len(idx):
        with torch.no_grad():
            images[t] = trigger.stamp(images[t])
        labels[t] = target
    return LabeledImages(images, labels, data.info), idx


@torch.no_grad()
def attack_success_rate(net: nn.Module, test: LabeledImages, trigger: Trigger, target: int) -> float:
    """Share of triggered test images whose true label is not ``target`` that ``net`` calls ``target``."""
    keep = np.flatnonzero(test.labels.numpy() != target)
    stamped = test.subset(keep)
    triggered = LabeledImages(trigger.stamp(stamped.images), torch.full_like(stamped.labels, target), test.info)
    return accuracy(net, triggered)


def clean_test_accuracy(net: nn.Module, test: LabeledImages) -> float:
    """CTA: plain top-1 accuracy on the untouched test set."""
    return accuracy(net, test)


def train_and_score(images: torch.Tensor, labels: torch.Tensor, test: LabeledImages, trigger: Trigger,
                    target: int, train: TrainConfig, seed: int) -> dict[str, float]:
    """Train a fresh seeded network on a (synthetic) set, as its user would; its ASR and CTA."""
    info = test.info
    net = seeded_network(train.arch, info.channels, info.num_classes, (info.height, info.width),
                         seed=seed, **train.arch_kwargs)
    net = train_network(net, images, labels, train, seed=seed)
    return {"asr": attack_success_rate(net, test, trigger, target), "cta": clean_test_accuracy(net, test)}
