"""Distilled sets as a neural-architecture-search proxy (DC: Zhao et al. 2021; DM: Zhao & Bilen 2023).

Training every candidate on the whole training set is what NAS wants to avoid. A good proxy
set ranks the candidates as whole-set training does, at a fraction of the cost. Here: a grid of
ConvNet variants (depth, width, norm, activation, pooling) is trained on each proxy (the
distilled set, a random real subset of the same size) and on the whole pool (the ground
truth); candidates are ranked by test accuracy and the proxies judged by the Spearman rank
correlation with the ground truth, and by the true accuracy of the candidate each would pick.

>>> spearman([1, 2, 3, 4], [10, 20, 30, 40])
1.0
>>> spearman([1, 2, 2, 3], [3, 2, 2, 1])
-1.0
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from .data import LabeledImages
from .networks import ACTIVATIONS, NORMS, POOLINGS
from .train import TrainConfig, evaluate

GROUND_TRUTH = "full"


def rankdata(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing the average of the ranks they span (scipy's ``"average"``)."""
    a = np.asarray(x, dtype=float)
    if a.ndim != 1:
        raise ValueError(f"expected a 1-D sequence, got shape {a.shape}")
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=float)
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and a[order[j + 1]] == a[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1  # positions i..j (0-based) share their mean rank
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks; nan if either side is constant."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.shape != ya.shape:
        raise ValueError(f"x and y differ in shape: {xa.shape} vs {ya.shape}")
    if len(xa) < 2:
        raise ValueError("spearman needs at least two pairs")
    if np.isnan(xa).any() or np.isnan(ya).any():
        return float("nan")
    rx, ry = rankdata(xa), rankdata(ya)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denom if denom > 0 else float("nan")


@dataclass(frozen=True)
class Candidate:
    """One ConvNet variant: its constructor options and a readable name."""

    depth: int = 3
    width: int = 128
    norm: str = "instancenorm"
    activation: str = "relu"
    pooling: str = "avgpool"

    def __post_init__(self) -> None:
        if self.depth < 1 or self.width < 1:
            raise ValueError(f"depth and width must be >= 1: {self}")
        for value, known in ((self.norm, NORMS), (self.activation, ACTIVATIONS), (self.pooling, POOLINGS)):
            if value not in known:
                raise ValueError(f"unknown option {value!r}; known: {list(known)}")

    @property
    def name(self) -> str:
        return f"D{self.depth}W{self.width}-{self.norm}-{self.activation}-{self.pooling}"

    def kwargs(self) -> dict:
        return {"depth": self.depth, "width": self.width, "norm": self.norm,
                "activation": self.activation, "pooling": self.pooling}


def convnet_grid(depths: Sequence[int] = (1, 2, 3), widths: Sequence[int] = (32,),
                 norms: Sequence[str] = ("instancenorm", "batchnorm", "none"),
                 activations: Sequence[str] = ("relu", "sigmoid"),
                 poolings: Sequence[str] = ("avgpool", "maxpool")) -> list[Candidate]:
    """The product of the options (DC's search space is 4 x 4 x 5 x 3 x 3 = 720; this default is
    3 x 1 x 3 x 2 x 2 = 36, sized for a 2-core CPU). Pooling ``none`` keeps every layer at full
    resolution and costs ~4x per layer, hence left out by default."""
    return [Candidate(d, w, n, a, p)
            for d, w, n, a, p in itertools.product(depths, widths, norms, activations, poolings)]


@dataclass(frozen=True)
class NASReport:
    """Test accuracy of every candidate trained on every source (proxies and the ground truth)."""

    candidates: tuple[Candidate, ...]
    accuracies: dict[str, tuple[float, ...]]  # source -> mean accuracy per candidate
    stds: dict[str, tuple[float, ...]]

    @property
    def proxies(self) -> tuple[str, ...]:
        return tuple(s for s in self.accuracies if s != GROUND_TRUTH)

    def ranking(self, source: str) -> list[str]:
        """Candidate names, best first, as ``source`` ranks them (stable for ties)."""
        acc = self.accuracies[source]
        order = sorted(range(len(acc)), key=lambda i: -acc[i])
        return [self.candidates[i].name for i in order]

    def correlation(self, source: str) -> float:
        """Spearman rho between ``source``'s and the ground truth's accuracies over candidates."""
        return spearman(self.accuracies[source], self.accuracies[GROUND_TRUTH])

    def selected(self, source: str) -> tuple[str, float]:
        """The candidate ``source`` ranks first, and its ground-truth accuracy."""
        acc = self.accuracies[source]
        best = max(range(len(acc)), key=lambda i: acc[i])
        return self.candidates[best].name, self.accuracies[GROUND_TRUTH][best]

    def summary(self) -> dict:
        best = max(self.accuracies[GROUND_TRUTH])
        out = {}
        for s in self.proxies:
            name, true_acc = self.selected(s)
            out[s] = {"spearman": self.correlation(s), "selected": name, "selected_true_acc": true_acc,
                      "best_true_acc": best}
        return out

    def rows(self) -> list[dict]:
        return [{"candidate": c.name, **c.kwargs(),
                 **{f"acc_{s}": a[i] for s, a in self.accuracies.items()},
                 **{f"std_{s}": a[i] for s, a in self.stds.items()}}
                for i, c in enumerate(self.candidates)]


def nas_proxy(proxies: dict[str, tuple[torch.Tensor, torch.Tensor]], pool: LabeledImages,
              test: LabeledImages, candidates: Sequence[Candidate],
              proxy_config: TrainConfig, pool_config: TrainConfig,
              seeds: tuple[int, ...] = (0,), progress: bool = False) -> NASReport:
    """Train every candidate on each proxy (images, labels) and on ``pool``; test on ``test``.

    ``proxy_config`` and ``pool_config`` set the budgets (a small set needs many epochs, the
    pool few); their ``arch`` is forced to ``convnet`` with each candidate's options.
    """
    if GROUND_TRUTH in proxies:
        raise ValueError(f"{GROUND_TRUTH!r} names the ground truth; pick another proxy name")
    if len(candidates) < 2:
        raise ValueError(f"ranking needs at least two candidates, got {len(candidates)}")
    sources = {**proxies, GROUND_TRUTH: (pool.images, pool.labels)}
    means: dict[str, list[float]] = {s: [] for s in sources}
    stds: dict[str, list[float]] = {s: [] for s in sources}
    for cand in candidates:
        for source, (x, y) in sources.items():
            base = pool_config if source == GROUND_TRUTH else proxy_config
            cfg = replace(base, arch="convnet", arch_kwargs=cand.kwargs())
            res = evaluate(x, y, test, cfg, seeds=tuple(seeds))
            means[source].append(res.mean)
            stds[source].append(res.std)
            if progress:
                print(f"nas {cand.name:<40} {source:<10} {100 * res.mean:.2f} %", flush=True)
    return NASReport(tuple(candidates), {s: tuple(v) for s, v in means.items()},
                     {s: tuple(v) for s, v in stds.items()})
