"""What a client does with a task, free of Flower: load its partition, budget classes, distill.

The ClientApp (``client/app.py``) only translates messages to and from these functions, so
they can be tested and reused (benchmarks, attacks) without a federation.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from distill.data import BUNDLED, Dataset, LabeledImages, dataset_key, load_dataset, load_npz, public_stats
from distill.factors import BASE_KEY, Factors
from distill.methods import available_methods, distill, make_config
from distill.parameterize import RHO_COMPOSES, check_options
from distill.partition import PARTITIONERS, class_budget, partition, split_held_out
from distill.synthetic import SetMetadata, SyntheticSet, concat_sets

ALGORITHMS = ("fedistill", "fedavg")
RUN_KEY = re.compile(r"[A-Za-z0-9._:-]{0,200}")  # printed in a node's ledger: no control characters


def safe_run_key(name: str) -> str:
    """``name`` (the server's run store name) in the characters :data:`RUN_KEY` allows."""
    return re.sub(r"[^A-Za-z0-9._:-]", "_", name)[:200]
INTEGER_FIELDS = ("round", "ipc", "iterations", "client_threads", "net_width", "net_depth", "seed")
# ``dp`` values: no DP, or the name of a DP method (privacy/, a lazy entry of distill.methods). Kept as
# strings here so the server (which imports this module) never needs Opacus.
DP_MODES = ("none", "dpsgd-gm", "dp-dm", "dp-mtt")
DP_ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class DistillTask:
    """What the server asks of a client in one round (the ``config`` record of a train message).

    Every field has the name of its kebab-case wire key with ``-`` turned into ``_``.
    """

    algorithm: str = "fedistill"
    dataset: str = "mnist10k"
    partitioner: str = "dirichlet"
    alpha: float = 0.5
    shards_per_client: int = 2
    seed: int = 0
    round: int = 1
    # Set by the server, not the run-config: the run store's name, stable across a resume, so a
    # node's per-run budget (``privacy-budget``) keeps counting when a crashed run resumes.
    run_key: str = ""
    method: str = "dm"
    ipc: int = 10
    iterations: int = 100
    init: str = "real"
    lr_img: float = 1.0
    batch_real: int = 256
    net_width: int = 32
    net_depth: int = 3
    min_class_samples: int = 10
    samples_per_image: int = 2
    holdout_fraction: float = 0.1
    embedder_noise: float = 0.1
    local_epochs: int = 1
    local_lr: float = 0.01
    local_batch_size: int = 32
    client_threads: int = 1
    # Example-level DP (privacy/, docs/privacy.md): ``dp`` replaces ``method`` when not "none".
    dp: str = "none"
    epsilon: float = 8.0
    delta: float = 1e-5
    clip: float = 1.0
    sigma: float = 0.0
    sample_rate: float = 0.04
    accountant: str = "rdp"
    privacy_budget: float = 0.0
    rho: float = 0.0
    # What clients store and upload (docs/distill.md "Parameterisations"): "pixels", or a
    # factorised set ("idc", "haba", "latent") whose ``ipc`` counts stored bases per class.
    # ``param_kwargs`` is its options as a JSON object string (a dict is turned into one).
    param: str = "pixels"
    param_kwargs: str = "{}"

    def __post_init__(self) -> None:
        if isinstance(self.param_kwargs, dict):  # programmatic callers and ``--set param-kwargs={...}``
            object.__setattr__(self, "param_kwargs", json.dumps(self.param_kwargs, sort_keys=True))
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.partitioner not in PARTITIONERS:
            raise ValueError(f"partitioner must be one of {PARTITIONERS}, got {self.partitioner!r}")
        if self.method not in available_methods():  # at the server, before any client is asked
            raise ValueError(f"unknown method {self.method!r}; known: {available_methods()}")
        if self.ipc < 1 or self.min_class_samples < 1 or self.samples_per_image < 1:
            raise ValueError(f"ipc, min_class_samples and samples_per_image must be >= 1: {self}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if not isinstance(self.run_key, str) or not RUN_KEY.fullmatch(self.run_key):
            raise ValueError(f"run-key must match {RUN_KEY.pattern}, got {str(self.run_key)[:80]!r}")
        wrong = [k for k in INTEGER_FIELDS if not isinstance(getattr(self, k), int) or isinstance(getattr(self, k), bool)]
        if wrong:
            raise ValueError(f"{[k.replace('_', '-') for k in wrong]} must be integers: {self}")
        if self.client_threads < 1 or self.local_epochs < 1:
            raise ValueError(f"client_threads and local_epochs must be >= 1: {self}")
        self._check_param()
        self._check_privacy()

    def _check_param(self) -> None:
        """The parameterisation and its options must be known and compose with the rest."""
        options = self.param_options  # raises on bad JSON
        check_options(self.param, options)
        if self.rho > 0 and self.param not in RHO_COMPOSES:
            raise ValueError(f"rho > 0 does not compose with param {self.param!r}; use one of {RHO_COMPOSES}")
        if self.param != "pixels" and self.dp != "none":
            raise ValueError(f"param={self.param!r} under dp={self.dp!r} is not built: DP clients upload pixels")

    @property
    def param_options(self) -> dict[str, Any]:
        """``param_kwargs`` parsed: the parameterisation's options (``ValueError`` if not a JSON object)."""
        try:
            options = json.loads(self.param_kwargs or "{}")
        except (TypeError, ValueError) as err:
            raise ValueError(f"param-kwargs must be a JSON object string, got {self.param_kwargs!r}") from err
        if not isinstance(options, dict):
            raise ValueError(f"param-kwargs must be a JSON object, got {self.param_kwargs!r}")
        return options

    def _check_privacy(self) -> None:
        """Refuse privacy settings that cannot run, before any message goes out."""
        if self.dp not in DP_MODES:
            raise ValueError(f"dp must be one of {DP_MODES}, got {self.dp!r}")
        if self.method in DP_MODES[1:]:
            raise ValueError(f"method {self.method!r} is a DP method: set dp={self.method!r} instead "
                             "(the client then accounts its spending across rounds)")
        if self.dp != "none" and self.algorithm != "fedistill":
            raise ValueError(f"dp={self.dp!r} needs algorithm 'fedistill' (DP FedAvg is not built)")
        if not 0.0 <= self.rho < 1.0:
            raise ValueError(f"rho must be in [0, 1), got {self.rho}")
        if not (self.privacy_budget >= 0 and math.isfinite(self.privacy_budget)):
            raise ValueError(f"privacy-budget must be finite and >= 0 (0 = no limit), got {self.privacy_budget}")
        if self.dp == "none":
            return
        if not 0.0 < self.delta < 1.0 or not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"delta must be in (0, 1) and sample-rate in (0, 1]: {self.delta}, {self.sample_rate}")
        if not (self.clip > 0 and math.isfinite(self.clip)) or not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise ValueError(f"clip must be finite and > 0, sigma finite and >= 0: {self.clip}, {self.sigma}")
        if self.sigma == 0 and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon must be finite and > 0 when sigma is 0, got {self.epsilon}")
        if self.accountant not in DP_ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {DP_ACCOUNTANTS}, got {self.accountant!r}")

    @property
    def distill_method(self) -> str:
        """The method that produces the upload: the DP method under DP, else ``method``."""
        return self.method if self.dp == "none" else self.dp

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DistillTask":
        """Build from a kebab-case mapping; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        values = {k.replace("-", "_"): v for k, v in config.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown task keys {unknown}")
        return cls(**values)

    def to_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @property
    def arch_kwargs(self) -> dict[str, int]:
        return {"width": self.net_width, "depth": self.net_depth}


@lru_cache(maxsize=4)
def cached_dataset(name_or_path: str) -> Dataset:
    """Load a dataset once per process (Ray actors serve many virtual clients)."""
    return load_dataset(name_or_path)


@lru_cache(maxsize=8)
def _partition_indices(dataset: str, num_partitions: int, partitioner: str, alpha: float,
                       shards_per_client: int, seed: int) -> tuple[np.ndarray, ...]:
    labels = cached_dataset(dataset).train.labels.numpy()
    return tuple(partition(labels, num_partitions, partitioner, alpha=alpha,
                           shards_per_client=shards_per_client, seed=seed))


NODE_DATASETS_ENV = "FEDISTILL_NODE_DATASETS"


class DatasetRefused(ValueError):
    """The task names a dataset this node did not name; nothing was opened."""


def node_datasets(node_config: Mapping[str, Any]) -> tuple[str, ...]:
    """The datasets this node names as its own: node-config ``dataset``, and the
    ``os.pathsep``-separated ``$FEDISTILL_NODE_DATASETS`` of the node's own environment (for
    simulations, whose virtual nodes Flower gives no node-config beyond their partition)."""
    named = [str(node_config["dataset"])] if str(node_config.get("dataset", "")).strip() else []
    named += [d for d in os.environ.get(NODE_DATASETS_ENV, "").split(os.pathsep) if d.strip()]
    return tuple(named)


def _same_dataset(asked: str, named: str) -> bool:
    """Paths compare as normalised absolute paths (nothing is opened), names as dataset keys."""
    if asked.endswith(".npz") or named.endswith(".npz"):
        def norm(p: str) -> str:
            return os.path.normpath(os.path.abspath(os.path.expanduser(p)))
        return asked.endswith(".npz") and named.endswith(".npz") and norm(asked) == norm(named)
    return dataset_key(asked) == dataset_key(named)


def dataset_refusal(task: DistillTask, node_config: Mapping[str, Any]) -> str | None:
    """Why this node will not load the task's ``dataset``, or None.

    A node with ``data-path`` loads that file and never the task's dataset. A partition node
    loads the bundled sample, or a dataset (name or ``.npz`` path) it names itself
    (:func:`node_datasets`); the server cannot point it at any other file or download.
    """
    if "data-path" in node_config:
        return None
    asked = str(task.dataset)
    if not asked.endswith(".npz") and dataset_key(asked) == BUNDLED:
        return None
    if any(_same_dataset(asked, named) for named in node_datasets(node_config)):
        return None
    return (f"dataset {asked[:160]!r}: this node loads only the bundled sample ({BUNDLED}) or a dataset its "
            f"node-config names (dataset=...)")


def load_partition(task: DistillTask, node_config: Mapping[str, Any],
                   public_only: bool = False) -> tuple[LabeledImages, LabeledImages]:
    """This node's (train, held-out) data.

    With ``data-path`` in ``node_config`` (a real deployment) the node's own ``.npz`` is used:
    its train split is distilled and its test split is the held-out set. ``data-name`` (e.g.
    ``mnist``) names the dataset it holds, which fixes its normalisation; without it the file's
    stem does, and an unknown stem means stats of the file's own train split, which the server
    rejects unless they equal its own. Otherwise the
    node's ``partition-id`` of ``num-partitions`` over the run's dataset is taken, and a
    seeded ``holdout-fraction`` of it is held out for federated evaluation; that dataset must be
    the bundled sample or one the node names (:func:`dataset_refusal`, else :class:`DatasetRefused`).

    ``public_only`` (every DP round): the normalisation and the class count must be public, a
    known dataset's or declared in the node-config (``data-mean``, ``data-std``, ``num-classes``),
    never computed from the private data, which would release them outside the accountant.
    """
    if "data-path" in node_config:
        name = str(node_config.get("data-name") or Path(str(node_config["data-path"])).stem)
        stats, classes = declared_statistics(name, node_config, public_only)
        local = load_npz(str(node_config["data-path"]), name, stats=stats, num_classes=classes)
        return local.train, local.test
    if (refused := dataset_refusal(task, node_config)) is not None:
        raise DatasetRefused(refused)
    try:
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(f"node_config needs 'partition-id' and 'num-partitions' or 'data-path', "
                         f"got {sorted(node_config)}") from err
    if not 0 <= pid < n:
        raise ValueError(f"partition-id {pid} outside [0, {n})")
    if public_only and str(task.dataset).endswith(".npz") and public_stats(Path(task.dataset).stem) is None:
        raise ValueError(f"dataset {task.dataset!r}: under DP the normalisation must be public, and this file is "
                         "no known dataset (name it after one, e.g. mnist.npz, or give the node its data-path with "
                         "declared data-mean, data-std and num-classes)")
    part = _partition_indices(task.dataset, n, task.partitioner, task.alpha, task.shards_per_client,
                              task.seed)[pid]
    train_idx, held_idx = split_held_out(part, task.seed, pid, task.holdout_fraction)
    data = cached_dataset(task.dataset).train
    return data.subset(train_idx), data.subset(held_idx)


def declared_statistics(name: str, node_config: Mapping[str, Any], public_only: bool
                        ) -> tuple[tuple[tuple[float, ...], tuple[float, ...]] | None, int | None]:
    """``(stats, num_classes)`` declared in the node-config, or ``(None, None)``: then
    :func:`distill.data.load_npz` uses a known dataset's published ones, or (only when
    ``public_only`` is off) computes them from the data.
    """
    declared = [k for k in ("data-mean", "data-std", "num-classes") if k in node_config]
    if declared:
        if len(declared) < 3:
            raise ValueError(f"node-config declares {declared}: declare data-mean, data-std and num-classes together")
        try:
            mean = tuple(float(v) for v in str(node_config["data-mean"]).split(","))
            std = tuple(float(v) for v in str(node_config["data-std"]).split(","))
            classes = int(node_config["num-classes"])
        except ValueError as err:
            raise ValueError(f"node-config data-mean / data-std (comma-separated numbers) or num-classes: {err}") \
                from err
        if classes < 2 or not all(s > 0 and math.isfinite(s) for s in std) or not all(map(math.isfinite, mean)):
            raise ValueError(f"declared statistics must be finite, std > 0 and num-classes >= 2: {mean}, {std}, "
                             f"{classes}")
        return (mean, std), classes
    if public_only and public_stats(name) is None:
        raise ValueError(f"data {name!r}: under DP the normalisation statistics and the class count must be public; "
                         "set data-name to a known dataset (mnist, fashionmnist, cifar10, svhn) or declare data-mean, "
                         "data-std and num-classes in the node-config (the node never computes them from private "
                         "data)")
    return None, None


def distill_partition(real: LabeledImages, task: DistillTask, seed: int,
                      embedder_state: dict | None = None) -> tuple[SyntheticSet, dict[str, Any]]:
    """Distill ``real`` under the task's class budget; returns the set and its report.

    Classes with the same budget are distilled together (the core gives each class
    ``min(ipc, n_c)`` images, so a smaller budget means a separate call with that ipc), and the
    parts joined with :func:`distill.synthetic.concat_sets`, which keeps IDC factors. A
    parameterisation with shared learned networks (haba, latent) is one set with one set of
    networks, so it is distilled in one call at the largest budget and each class then keeps
    its first ``budget[c]`` stored bases (:func:`keep_bases`).
    """
    if task.dp != "none":  # budgets come from exact counts: under DP see client.private
        raise ValueError(f"distill_partition is not private; dp={task.dp!r} goes through client.private")
    start = time.perf_counter()
    hist = real.class_histogram()
    budget = class_budget(hist, task.ipc, task.min_class_samples, task.samples_per_image)
    skipped = [int(c) for c in np.flatnonzero((hist > 0) & (budget == 0))]
    capped = [int(c) for c in np.flatnonzero((budget > 0) & (budget < task.ipc))]
    if not budget.any():
        raise ValueError(f"no class has >= {task.min_class_samples} samples (histogram {hist.tolist()})")
    shared_nets = task.param in ("haba", "latent")
    groups = [int(budget.max())] if shared_nets else sorted(set(budget[budget > 0].tolist()), reverse=True)
    parts: list[SyntheticSet] = []
    for k in groups:
        classes = np.flatnonzero(budget == k if not shared_nets else budget > 0)
        group = real.of_classes(classes)
        settings: dict[str, Any] = dict(ipc=int(k), iterations=task.iterations, init=task.init, seed=seed,
                                        arch="convnet", arch_kwargs=task.arch_kwargs,
                                        embedder_state=embedder_state, embedder_noise=task.embedder_noise,
                                        rho=task.rho, param=task.param, param_kwargs=task.param_options)
        if task.method == "dm":
            settings.update(lr_img=task.lr_img, batch_real=task.batch_real)
        parts.append(distill(group, make_config(task.method, **settings)))
    meta = parts[0].meta
    report = {"examples": len(real), "class-histogram": hist.tolist(), "classes-capped": capped,
              "classes-skipped": skipped}
    extra = dict(meta.extra, classes_capped=len(capped), classes_skipped=len(skipped))
    meta = replace(meta, ipc=task.ipc, round=task.round, seed=seed, extra=extra)
    syn = keep_bases(parts[0], budget, meta) if shared_nets else concat_sets(parts, meta)
    report["seconds"] = time.perf_counter() - start
    report["bytes-uploaded"] = syn.nbytes()
    return syn, report


def keep_bases(syn: SyntheticSet, budget: np.ndarray, meta: SetMetadata) -> SyntheticSet:
    """``syn`` with only the first ``budget[c]`` stored bases of each class c, under ``meta``.

    For a factorised set with shared networks (haba, latent): the networks are kept whole,
    the per-class base array and the labels of the dropped bases' images are cut.
    """
    if syn.factors is None:
        raise ValueError("keep_bases needs a factorised set")
    per_base = syn.factors.per_base
    base_class = syn.hard_labels()[::per_base].cpu().numpy()
    seen = np.zeros(len(budget), dtype=np.int64)
    keep = []
    for i, c in enumerate(base_class):
        if seen[c] < budget[c]:
            keep.append(i)
            seen[c] += 1
    idx = torch.as_tensor(keep, dtype=torch.long)
    rows = (idx[:, None] * per_base + torch.arange(per_base)).reshape(-1)
    key = BASE_KEY[syn.factors.kind]
    arrays = {**syn.factors.arrays, key: syn.factors.arrays[key][idx].contiguous()}
    return SyntheticSet.from_factors(Factors(syn.factors.spec, arrays), syn.labels[rows].contiguous(), meta,
                                     syn.lr)
