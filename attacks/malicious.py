"""A malicious federated client's data, free of Flower: which partitions attack, and how they are poisoned.

The malicious ClientApp (``simulations/malicious_client.py``) wraps the honest client's
partition loading with :func:`poisoning_loader`; everything after loading (class budgets,
distillation, the reply) is the honest code path. The poisoning is NAIVEATTACK (Liu et al.,
NDSS 2023; :mod:`attacks.backdoor`): a fixed ``size`` x ``size`` patch stamped on a ``fraction``
of the partition, those images relabelled to ``target``. The trigger is fully determined by the
:class:`BackdoorSpec`, so whoever holds the spec (the simulation script, after the run) can
measure ASR on the global model without any message carrying the trigger.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from distill.data import DatasetInfo, LabeledImages
from distill.task import DistillTask, method_config, task_budget

from .backdoor import CORNERS, Trigger, poison

PartitionLoader = Callable[..., tuple[LabeledImages, LabeledImages]]


@dataclass(frozen=True)
class BackdoorSpec:
    """What a malicious client plants: a solid patch (pixel ``value``) in ``corner``, ``fraction`` relabelled."""

    target: int = 0
    fraction: float = 0.1
    size: int = 3
    value: float = 1.0
    margin: int = 1
    corner: str = "bottom-right"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"poison fraction must be in [0, 1], got {self.fraction}")
        if self.size < 1 or self.margin < 0 or self.target < 0:
            raise ValueError(f"size >= 1, margin >= 0 and target >= 0 needed: {self}")
        if self.corner not in CORNERS:
            raise ValueError(f"corner must be one of {CORNERS}, got {self.corner!r}")

    def trigger(self, info: DatasetInfo) -> Trigger:
        return Trigger.solid(info, self.size, self.value, self.margin, self.corner)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def malicious_partitions(num_partitions: int, k: int, seed: int | None = None) -> list[int]:
    """The ``k`` attacking partition ids: the first ``k``, or a seeded draw when ``seed`` is given."""
    if not 0 <= k <= num_partitions:
        raise ValueError(f"malicious count {k} outside [0, {num_partitions}]")
    if seed is None:
        return list(range(k))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(num_partitions, size=k, replace=False))


def poison_partition(real: LabeledImages, spec: BackdoorSpec,
                     partition_id: int = 0) -> tuple[LabeledImages, np.ndarray]:
    """NAIVEATTACK on one client's partition: a copy with ``round(fraction * N)`` non-target images stamped
    and relabelled to ``spec.target``; returns it and the poisoned indices. ``real`` is not modified."""
    if spec.target >= real.info.num_classes:
        raise ValueError(f"target {spec.target} outside [0, {real.info.num_classes})")
    return poison(real, spec.trigger(real.info), spec.fraction, spec.target,
                  seed=int(np.random.SeedSequence([spec.seed, partition_id]).generate_state(1)[0]))


def poisoning_loader(load: PartitionLoader, spec: BackdoorSpec, malicious: Iterable[int],
                     partition_of: Callable[[Any], int | None]) -> PartitionLoader:
    """Wrap a ``load(task, node_config) -> (train, held_out)`` function so that a malicious partition's
    train split comes back poisoned; the held-out split and every honest partition are untouched.

    ``partition_of(node_config)`` names the partition (``None``: not a malicious node).
    """
    bad = frozenset(int(i) for i in malicious)

    def load_poisoned(task: Any, node_config: Any, *args: Any, **kwargs: Any):
        train, held_out = load(task, node_config, *args, **kwargs)
        pid = partition_of(node_config)
        if pid is None or pid not in bad:
            return train, held_out
        poisoned, _ = poison_partition(train, spec, pid)
        return poisoned, held_out

    return load_poisoned


ATTACKS = ("naive", "doorping")


def doorping_partition(real: LabeledImages, task: DistillTask, seed: int, embedder_state: dict | None = None,
                       node: Mapping[str, Any] | None = None, *, spec: BackdoorSpec, partition_id: int = 0,
                       on_trigger: Callable[[Trigger], None] | None = None,
                       **doorping: Any) -> tuple[Any, dict[str, Any]]:
    """DOORPING in place of ``client.task.distill_partition`` (same arguments and return).

    The partition is cut to the classes the honest client would distil (``class_budget``) plus the
    target, poisoned with a random trigger that co-evolves during distillation
    (:func:`attacks.doorping.doorping_distill`), distilled in one call at ``task.ipc`` (classes the
    honest path would cap are then cut to their budget, and a target class without budget is
    dropped from the upload, so the reply passes the server's budget check). ``on_trigger`` receives
    the final trigger (the attacker keeps it to trigger the global model). Pixel sets only.
    """
    import time
    from dataclasses import replace

    from .doorping import SUPPORTED, DoorpingConfig, doorping_distill

    if task.method not in SUPPORTED or getattr(task, "param", "pixels") != "pixels":
        raise ValueError(f"DOORPING needs method in {SUPPORTED} and param 'pixels', got {task.method!r}")
    start = time.perf_counter()
    hist = real.class_histogram()
    budget = task_budget(task, hist)
    keep = np.flatnonzero(budget.counts > 0).tolist() + [spec.target]
    data = real.of_classes(keep)
    config = DoorpingConfig(**{"target": spec.target, "fraction": max(spec.fraction, 1e-6), "size": spec.size,
                               "margin": spec.margin, "seed": spec.seed + partition_id,
                               "update_every": max(1, task.iterations // 10), **doorping})
    method = method_config(task, seed=seed, embedder_state=embedder_state, **(node or {}))
    syn, trigger, _ = doorping_distill(data, method, config)
    rows = within_budget(syn.hard_labels().cpu(), budget.counts)  # what the server's budget check allows
    syn = replace(syn, images=syn.images.detach().cpu()[rows], labels=syn.labels.cpu()[rows],
                  meta=replace(syn.meta, ipc=task.ipc, round=task.round, seed=seed))
    if on_trigger is not None:
        on_trigger(Trigger(trigger.pattern.detach().cpu(), trigger.margin, trigger.corner))
    report = {"examples": len(real), "class-histogram": hist.tolist(), "classes-capped": budget.capped,
              "classes-skipped": budget.skipped,
              "seconds": time.perf_counter() - start, "bytes-uploaded": syn.nbytes()}
    return syn, report


def within_budget(labels: torch.Tensor, budget: np.ndarray) -> torch.Tensor:
    """Indices of the first ``budget[c]`` rows of each class ``c`` (in order)."""
    seen: dict[int, int] = {}
    rows = []
    for i, c in enumerate(labels.tolist()):
        if seen.get(c, 0) < int(budget[c]):
            rows.append(i)
            seen[c] = seen.get(c, 0) + 1
    return torch.as_tensor(rows, dtype=torch.long)


def save_trigger(trigger: Trigger, path: str) -> None:
    """A learned trigger as a plain ``.npy`` (read back with :func:`load_trigger`, no pickles)."""
    np.save(path, trigger.pattern.numpy().astype(np.float32), allow_pickle=False)


def load_trigger(path: str, spec: BackdoorSpec) -> Trigger:
    import torch

    return Trigger(torch.from_numpy(np.load(path, allow_pickle=False)), spec.margin, spec.corner)
