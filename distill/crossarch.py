"""Cross-architecture evaluation: does a set distilled with one network teach the others?

A synthetic set is only useful beyond its distillation network if unseen architectures learn
from it too (Zhao et al. 2021, DC; Zhao & Bilen 2023, DM, Table 3). Each architecture is
trained from several seeds with the one trainer of :mod:`distill.train` and tested on real data.

>>> import torch
>>> from distill.data import load_dataset
>>> ds = load_dataset("mnist10k")
>>> idx = torch.cat([i[:2] for i in ds.train.class_indices()])
>>> few = ds.train.subset(idx)
>>> report = cross_arch_evaluate(few.images, few.labels, ds.test.subset(range(50)),
...                              TrainConfig(epochs=1, dsa=False), archs=("mlp", "lenet"), seeds=(0,))
>>> report.archs
('mlp', 'lenet')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .data import LabeledImages
from .networks import NETWORKS
from .train import EvalResult, TrainConfig, evaluate

DEFAULT_ARCHS = ("convnet", "mlp", "lenet", "alexnet", "resnet18")


@dataclass(frozen=True)
class CrossArchReport:
    """One :class:`EvalResult` per architecture, in the order evaluated."""

    results: tuple[EvalResult, ...]

    @property
    def archs(self) -> tuple[str, ...]:
        return tuple(r.arch for r in self.results)

    def __getitem__(self, arch: str) -> EvalResult:
        for r in self.results:
            if r.arch == arch:
                return r
        raise KeyError(f"no result for {arch!r}; have {list(self.archs)}")

    def rows(self) -> list[dict]:
        """Tidy rows (one per architecture) for JSON or a table."""
        return [{"arch": r.arch, "mean": r.mean, "std": r.std, "accuracies": list(r.accuracies),
                 "epochs": r.epochs} for r in self.results]

    def markdown(self, name: str = "set") -> str:
        head = "| " + name + " | " + " | ".join(self.archs) + " |"
        sep = "| --- " * (len(self.results) + 1) + "|"
        cells = [f"{100 * r.mean:.2f} +- {100 * r.std:.2f}" if math.isfinite(r.mean) else "-"
                 for r in self.results]
        return "\n".join([head, sep, "| accuracy % | " + " | ".join(cells) + " |"])


def cross_arch_evaluate(images: torch.Tensor, labels: torch.Tensor, test: LabeledImages,
                        config: TrainConfig | None = None, archs: tuple[str, ...] = DEFAULT_ARCHS,
                        seeds: tuple[int, ...] = (0, 1, 2),
                        arch_kwargs: dict[str, dict] | None = None,
                        epochs: dict[str, int] | None = None,
                        progress: bool = False) -> CrossArchReport:
    """Train each of ``archs`` on (images, labels) from every seed; test on ``test``.

    Parameters
    ----------
    config
        The shared training protocol (its ``arch`` and ``arch_kwargs`` are replaced per
        architecture); default: :class:`TrainConfig`'s DC/DSA/DM evaluator.
    arch_kwargs
        Constructor options per architecture, e.g. ``{"convnet": {"width": 32}}``; only the
        named architectures get any, so one network's option never reaches another.
    epochs
        Per-architecture epoch overrides (a ResNet-18 costs ~100x a small ConvNet on a CPU).
    """
    config = config if config is not None else TrainConfig()
    arch_kwargs = dict(arch_kwargs or {})
    epochs = dict(epochs or {})
    keys = [a.lower().replace("-", "").replace("_", "") for a in archs]
    unknown = sorted(set(keys) - set(NETWORKS))
    unknown += sorted(set(arch_kwargs) - set(keys)) + sorted(set(epochs) - set(keys))
    if unknown:
        raise ValueError(f"unknown or unused architectures {unknown}; evaluating {list(keys)}, "
                         f"known {sorted(NETWORKS)}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    results = []
    for arch in keys:
        cfg = replace(config, arch=arch, arch_kwargs=dict(arch_kwargs.get(arch, {})),
                      epochs=epochs.get(arch, config.epochs))
        results.append(evaluate(images, labels, test, cfg, seeds=tuple(seeds), progress=progress))
    return CrossArchReport(tuple(results))
