"""One trainer for every use: evaluating synthetic sets, real subsets, the whole pool, the global model.

The evaluation protocol follows DC/DSA/DM: SGD (momentum 0.9, weight decay 5e-4), learning
rate 0.01 divided by 10 at half the epochs, batch 256, DSA augmentation on every batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import accel
from .augment import DSA
from .data import LabeledImages
from .networks import seeded_network
from .progress import progress as progress_bar


@dataclass(frozen=True)
class TrainConfig:
    """How to train a fresh network on a small labelled set."""

    arch: str = "convnet"
    arch_kwargs: dict = field(default_factory=dict)
    epochs: int = 300
    lr: float = 0.01
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dsa: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not 0 < self.lr < float("inf"):
            raise ValueError(f"epochs, batch_size and lr must be positive (lr finite): {self}")
        if not (0 <= self.momentum < float("inf") and 0 <= self.weight_decay < float("inf")):
            raise ValueError(f"momentum and weight_decay must be finite and >= 0: {self}")


@dataclass(frozen=True)
class EvalResult:
    """Test accuracies of networks trained from several seeds on the same data."""

    accuracies: tuple[float, ...]
    arch: str
    epochs: int

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} +- {100 * self.std:.2f} % ({self.arch}, {len(self.accuracies)} seeds)"


def train_network(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
                  seed: int = 0, progress: bool = False) -> nn.Module:
    """Train ``net`` in place on ``images`` with hard (int64 [N]) or soft (float [N, K]) labels."""
    device = torch.device(config.device)
    net.to(device).train()
    x, y = images.detach().to(device), labels.detach().to(device)
    gen = torch.Generator().manual_seed(seed)
    aug = DSA() if config.dsa else None
    opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    forward = accel.forward_fn(net)
    n = x.shape[0]
    for epoch in progress_bar(range(config.epochs), "train", progress, leave=False):
        if epoch == config.epochs // 2:
            for group in opt.param_groups:
                group["lr"] = config.lr * 0.1
        for idx in torch.randperm(n, generator=gen).split(config.batch_size):
            xb, yb = x[idx.to(device)], y[idx.to(device)]
            if aug is not None:
                xb = aug(xb, gen)
            loss = F.cross_entropy(forward(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def accuracy_and_loss(net: nn.Module, data: LabeledImages, batch_size: int = 1000,
                      device: str | torch.device | None = None) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) of ``net`` on ``data``; (nan, nan) when it is empty."""
    if len(data) == 0:
        return float("nan"), float("nan")
    device = torch.device(device) if device is not None else next(net.parameters()).device
    was_training = net.training
    net.eval()
    correct, loss = 0, 0.0
    for xb, yb in zip(data.images.split(batch_size), data.labels.split(batch_size)):
        out = net(xb.to(device)).cpu()
        correct += int((out.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
    net.train(was_training)
    return correct / len(data), loss / len(data)


def accuracy(net: nn.Module, data: LabeledImages, batch_size: int = 1000,
             device: str | torch.device | None = None) -> float:
    """Top-1 accuracy of ``net`` on ``data`` (nan when it is empty)."""
    return accuracy_and_loss(net, data, batch_size, device)[0]


def evaluate(images: torch.Tensor, labels: torch.Tensor, test: LabeledImages, config: TrainConfig,
             seeds: tuple[int, ...] = (0, 1, 2), progress: bool = False) -> EvalResult:
    """Train one fresh network per seed on (images, labels) and test each on ``test``."""
    info = test.info
    accs = []
    for s in progress_bar(seeds, f"evaluate {config.arch}", progress, leave=False):
        net = seeded_network(config.arch, info.channels, info.num_classes, (info.height, info.width),
                             seed=s, device=config.device, **config.arch_kwargs)
        train_network(net, images, labels, config, seed=s)
        accs.append(accuracy(net, test))
    return EvalResult(tuple(accs), config.arch, config.epochs)


def random_real_subset(data: LabeledImages, ipc: int, seed: int = 0) -> LabeledImages:
    """``ipc`` random real images per class (fewer where a class has fewer): the baseline."""
    gen = torch.Generator().manual_seed(seed)
    picks = [idx[torch.randperm(len(idx), generator=gen)[:ipc]] for idx in data.class_indices()]
    return data.subset(torch.cat(picks))
