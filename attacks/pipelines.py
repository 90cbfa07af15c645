"""The pipelines an attacker re-runs: real data in, a trained model (and maybe a synthetic set) out.

A membership attack with shadows must imitate the *whole* pipeline that produced the target
(for a distilled target: distill, then train), or it measures the wrong thing (Carlini,
Feldman & Nasr 2022, "No free lunch in 'privacy for free'"). So a pipeline is one callable,
``pipeline(data, seed) -> PipelineOutput``, used alike for the target and every shadow.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol

from torch import nn

from distill.data import LabeledImages
from distill.methods import MethodConfig, distill
from distill.networks import seeded_network
from distill.synthetic import SyntheticSet
from distill.train import TrainConfig, train_network


@dataclass(frozen=True)
class PipelineOutput:
    """The trained model, and the synthetic set it was trained on (None when trained on real data)."""

    model: nn.Module
    synthetic: SyntheticSet | None = None


class Pipeline(Protocol):
    name: str

    def __call__(self, data: LabeledImages, seed: int) -> PipelineOutput: ...


def _fresh_net(info, config: TrainConfig, seed: int) -> nn.Module:
    return seeded_network(config.arch, info.channels, info.num_classes, (info.height, info.width),
                          seed=seed, device=config.device, **config.arch_kwargs)


@dataclass(frozen=True)
class TrainOnReal:
    """Train a fresh network on the real data itself: the leaky baseline when the set is small."""

    train: TrainConfig
    name: str = "real"

    def __call__(self, data: LabeledImages, seed: int) -> PipelineOutput:
        net = _fresh_net(data.info, self.train, seed)
        return PipelineOutput(train_network(net, data.images, data.labels, self.train, seed=seed))


@dataclass(frozen=True)
class DistillThenTrain:
    """Distill with ``method`` (seeded per run), then train a fresh network on the synthetic set.

    A DP method (``dp-dm``, ``dpsgd-gm``) works the same once :mod:`privacy` is imported;
    :func:`make_pipeline` does that.
    """

    method: MethodConfig
    train: TrainConfig
    name: str = ""

    def __call__(self, data: LabeledImages, seed: int) -> PipelineOutput:
        syn = distill(data, replace(self.method, seed=seed))
        net = _fresh_net(data.info, self.train, seed)
        return PipelineOutput(train_network(net, syn.images, syn.labels, self.train, seed=seed), syn)


def make_pipeline(kind: str, train: TrainConfig, method: MethodConfig | None = None) -> Callable[..., PipelineOutput]:
    """``"real"`` or ``"distill"`` (needs ``method``); DP methods register :mod:`privacy` first."""
    if kind == "real":
        return TrainOnReal(train)
    if kind == "distill":
        if method is None:
            raise ValueError("kind='distill' needs a method config")
        return DistillThenTrain(method, train, name=method.method)
    raise ValueError(f"unknown pipeline kind {kind!r}; known: ['real', 'distill']")
