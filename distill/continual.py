"""Class-incremental learning with a small memory, GDumb-style (Prabhu et al. 2020).

Classes arrive in steps (MNIST: 5 steps of 2). A memory keeps ``k`` images per class seen so
far; when a step arrives its classes enter the memory, either distilled from that step's real
data (DM by default, as in Zhao & Bilen 2023's continual-learning experiment) or as a real
sample (random, or herding), and a fresh model is trained on the memory alone, then tested on
all classes seen so far. A step's real data is handed to the selector at its turn and nowhere
else, and once its turn is over only what the memory kept of it survives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .data import LabeledImages
from .methods import distill, make_config
from .networks import embed_in_chunks, network_for
from .train import TrainConfig, accuracy, random_real_subset, train_network

BUFFERS = ("distill", "random", "herding")
# (one step's real data, k per class, seed) -> (images, int64 labels) of that step's memory
Selector = Callable[[LabeledImages, int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ContinualConfig:
    """The protocol: steps, memory size and how it is filled, and how each model is trained."""

    classes_per_step: int = 2
    k: int = 10
    buffer: str = "distill"
    method: str = "dm"
    method_settings: dict = field(default_factory=lambda: {"iterations": 100, "batch_real": 64})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=300))
    class_order: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.classes_per_step < 1 or self.k < 1:
            raise ValueError(f"classes_per_step and k must be >= 1, got {self.classes_per_step}, {self.k}")
        if self.buffer not in BUFFERS:
            raise ValueError(f"buffer must be one of {BUFFERS}, got {self.buffer!r}")
        clash = sorted({"ipc", "seed"} & set(self.method_settings))
        if clash:
            raise ValueError(f"method_settings may not set {clash}: k and seed come from the protocol")
        if self.buffer == "distill":
            make_config(self.method, ipc=self.k, **self.method_settings)  # unknown names raise here


def class_steps(num_classes: int, classes_per_step: int,
                order: tuple[int, ...] | None = None) -> list[tuple[int, ...]]:
    """The classes of each step, in arrival order (the last step may hold fewer)."""
    order = tuple(range(num_classes)) if order is None else tuple(order)
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"class_order must be a permutation of 0..{num_classes - 1}, got {order}")
    return [order[i:i + classes_per_step] for i in range(0, num_classes, classes_per_step)]


def distilled_memory(method: str = "dm", settings: dict | None = None) -> Selector:
    """A selector that distills ``k`` images per class from the step's data (hard labels kept:
    every step's set trains one model, so one label format)."""
    settings = dict(settings or {})

    def select(data: LabeledImages, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        syn = distill(data, make_config(method, ipc=k, seed=seed, **settings))
        return syn.images, syn.hard_labels()

    return select


def random_memory(data: LabeledImages, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` random real images per class of the step (GDumb's sampler, class-balanced)."""
    sub = random_real_subset(data, k, seed)
    return sub.images, sub.labels


def herding_memory(data: LabeledImages, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` real images per class picked by herding (Welling 2009; iCaRL) in the embedding of a
    seeded random ConvNet: no trained model is needed, so nothing else is learnt from the step."""
    net = network_for(data.info, "convnet", seed=seed)
    picks = []
    for idx in data.class_indices():
        if len(idx) == 0:
            continue
        feats = embed_in_chunks(net, data.images[idx])
        feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
        picks.append(idx[herd(feats, min(k, len(idx)))])
    sub = data.subset(torch.cat(picks))
    return sub.images, sub.labels


def herd(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` rows whose running mean tracks the mean of all rows most closely."""
    mu = features.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    available = torch.ones(len(features), dtype=torch.bool)
    for t in range(k):
        dist = ((mu - (total + features) / (t + 1)) ** 2).sum(1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        total += features[i]
        available[i] = False
    return torch.tensor(chosen, dtype=torch.long)


class Memory:
    """Images per class, filled a step at a time; refuses anything outside the step's classes."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._by_class: dict[int, torch.Tensor] = {}

    def add(self, images: torch.Tensor, labels: torch.Tensor, step_classes: tuple[int, ...]) -> None:
        labels = labels.detach().cpu().long()
        present = set(labels.tolist())
        if not present <= set(step_classes) or present & set(self._by_class):
            raise ValueError(f"a step over classes {step_classes} returned labels {sorted(present)} "
                             f"(memory already holds {sorted(self._by_class)})")
        for c in sorted(present):
            rows = images[labels.to(images.device) == c].detach().cpu()
            if len(rows) > self.k:
                raise ValueError(f"class {c}: {len(rows)} images offered, memory keeps at most {self.k}")
            self._by_class[c] = rows.clone()

    def counts(self) -> dict[int, int]:
        return {c: len(x) for c, x in sorted(self._by_class.items())}

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        classes = sorted(self._by_class)
        x = torch.cat([self._by_class[c] for c in classes])
        y = torch.cat([torch.full((len(self._by_class[c]),), c, dtype=torch.long) for c in classes])
        return x, y


class SeenClasses(torch.nn.Module):
    """``net`` with the logits of classes not yet seen masked out, as GDumb predicts: a class
    that has never arrived cannot be the answer."""

    def __init__(self, net: torch.nn.Module, seen: list[int], num_classes: int) -> None:
        super().__init__()
        self.net = net
        unseen = torch.ones(num_classes, dtype=torch.bool)
        unseen[seen] = False
        self.register_buffer("unseen", unseen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).masked_fill(self.unseen.to(x.device), float("-inf"))


@dataclass(frozen=True)
class StepResult:
    step: int
    classes: tuple[int, ...]
    seen: tuple[int, ...]
    accuracy: float
    memory: dict[int, int]  # images per class in memory after this step


@dataclass(frozen=True)
class ContinualResult:
    steps: tuple[StepResult, ...]

    @property
    def accuracies(self) -> list[float]:
        return [s.accuracy for s in self.steps]

    @property
    def final(self) -> float:
        return self.steps[-1].accuracy

    @property
    def average(self) -> float:
        """Average incremental accuracy (Rebuffi et al. 2017): the mean over steps."""
        return float(np.mean(self.accuracies))

    def to_dict(self) -> dict:
        return {"accuracies": self.accuracies, "final": self.final, "average": self.average,
                "steps": [{"step": s.step, "classes": list(s.classes), "seen": list(s.seen),
                           "accuracy": s.accuracy, "memory": {str(c): n for c, n in s.memory.items()}}
                          for s in self.steps]}


def make_selector(config: ContinualConfig) -> Selector:
    if config.buffer == "distill":
        return distilled_memory(config.method, config.method_settings)
    return random_memory if config.buffer == "random" else herding_memory


def run_continual(train: LabeledImages, test: LabeledImages, config: ContinualConfig,
                  select: Selector | None = None, progress: bool = False) -> ContinualResult:
    """Run the class-incremental protocol; ``select`` overrides the config's memory filler."""
    info = train.info
    select = select if select is not None else make_selector(config)
    memory = Memory(config.k)
    seen: list[int] = []
    results = []
    for step, classes in enumerate(class_steps(info.num_classes, config.classes_per_step, config.class_order)):
        step_data = train.of_classes(classes)  # this step's real data, handed out only now
        step_seed = config.seed * 1000 + step
        images, labels = select(step_data, config.k, step_seed)
        memory.add(images, labels, classes)
        del step_data, images, labels  # from here on only the memory remembers this step
        seen += list(classes)
        x, y = memory.tensors()
        net = network_for(info, config.train.arch, seed=step_seed, device=config.train.device,
                          **config.train.arch_kwargs)
        train_network(net, x, y, config.train, seed=step_seed)
        test_seen = test.of_classes(seen)
        acc = accuracy(SeenClasses(net, seen, info.num_classes), test_seen)
        results.append(StepResult(step, tuple(classes), tuple(seen), acc, memory.counts()))
        if progress:
            print(f"continual step {step} classes {list(classes)}: {100 * acc:.2f} % on {len(seen)} classes",
                  flush=True)
    return ContinualResult(tuple(results))
