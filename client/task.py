"""What a client does with a task, free of Flower: load its partition, budget classes, distill.

The ClientApp (``client/app.py``) only translates messages to and from these functions, so
they can be tested and reused (benchmarks, attacks) without a federation.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from functools import lru_cache
from typing import Any, Mapping

import numpy as np
import torch

from distill.data import (BUNDLED, Dataset, LabeledImages, dataset_key, load_dataset, load_npz, public_stats,
                          source_name)
from distill.factors import BASE_KEY, Factors
from distill.imagefolder import ARCHIVE_SUFFIXES, FolderOptions, is_image_folder, load_image_folder
from distill.methods import config_fields, distill
from distill.params import parameterisation
from distill.partition import partition, split_held_out
from distill.task import DistillTask, method_config, task_budget
from distill.synthetic import SetMetadata, SyntheticSet, concat_sets


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


def _is_path(name: str) -> bool:
    """A dataset given as a file or folder (an ``.npz``, an image folder's archive, anything with a
    path separator), not by name."""
    return name.endswith((".npz", *ARCHIVE_SUFFIXES)) or "/" in name or os.sep in name


def _same_dataset(asked: str, named: str) -> bool:
    """Paths compare as normalised absolute paths (nothing is opened), names as dataset keys."""
    if _is_path(asked) or _is_path(named):
        def norm(p: str) -> str:
            return os.path.normpath(os.path.abspath(os.path.expanduser(p)))
        return _is_path(asked) and _is_path(named) and norm(asked) == norm(named)
    return dataset_key(asked) == dataset_key(named)


def dataset_refusal(task: DistillTask, node_config: Mapping[str, Any]) -> str | None:
    """Why this node will not load the task's ``dataset``, or None.

    A node with ``data-path`` loads that file and never the task's dataset. A partition node
    loads the bundled sample, or a dataset (name, ``.npz`` or image folder) it names itself
    (:func:`node_datasets`); the server cannot point it at any other file or download.
    """
    if "data-path" in node_config:
        return None
    asked = str(task.dataset)
    if not _is_path(asked) and dataset_key(asked) == BUNDLED:
        return None
    if any(_same_dataset(asked, named) for named in node_datasets(node_config)):
        return None
    return (f"dataset {asked[:160]!r}: this node loads only the bundled sample ({BUNDLED}) or a dataset its "
            f"node-config names (dataset=...)")


def load_partition(task: DistillTask, node_config: Mapping[str, Any],
                   public_only: bool = False) -> tuple[LabeledImages, LabeledImages]:
    """This node's (train, held-out) data.

    With ``data-path`` in ``node_config`` (a real deployment) the node's own ``.npz`` or image
    folder is used (:func:`_own_data`): its train split is distilled and its test split is the
    held-out set. ``data-name`` (e.g.
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
        return _own_data(str(node_config["data-path"]), node_config, public_only)
    if (refused := dataset_refusal(task, node_config)) is not None:
        raise DatasetRefused(refused)
    try:
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(f"node_config needs 'partition-id' and 'num-partitions' or 'data-path', "
                         f"got {sorted(node_config)}") from err
    if not 0 <= pid < n:
        raise ValueError(f"partition-id {pid} outside [0, {n})")
    if public_only and _is_path(str(task.dataset)) and public_stats(source_name(task.dataset)) is None:
        raise ValueError(f"dataset {task.dataset!r}: under DP the normalisation must be public, and this file is "
                         "no known dataset (name it after one, e.g. mnist.npz or cifar10.tar.gz, or give the node "
                         "its data-path with "
                         "declared data-mean, data-std and num-classes)")
    part = _partition_indices(task.dataset, n, task.partitioner, task.alpha, task.shards_per_client,
                              task.seed)[pid]
    train_idx, held_idx = split_held_out(part, task.seed, pid, task.holdout_fraction)
    data = cached_dataset(task.dataset).train
    return data.subset(train_idx), data.subset(held_idx)


def _own_data(path: str, node_config: Mapping[str, Any], public_only: bool) -> tuple[LabeledImages, LabeledImages]:
    """A node's own data (``data-path``): an ``.npz``, or an image folder (a directory or archive)
    whose labels follow the node-config's ``data-classes`` (comma-separated) when given, so that
    every node agrees on them even where its folders lack a class."""
    name = str(node_config.get("data-name") or source_name(path))
    stats, classes = declared_statistics(name, node_config, public_only)
    if not is_image_folder(path):
        local = load_npz(path, name, stats=stats, num_classes=classes)
        return local.train, local.test
    declared = str(node_config.get("data-classes", "")).strip()
    options = FolderOptions(classes=tuple(c.strip() for c in declared.split(",")) if declared else None)
    local = load_image_folder(path, name, options=options, stats=stats)
    if classes is not None and classes != local.info.num_classes:
        raise ValueError(f"node-config num-classes {classes}, but {path} has {local.info.num_classes} classes "
                         "(declare them in data-classes)")
    return local.train, local.test


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


def node_method_settings(task: DistillTask, node_config: Mapping[str, Any]) -> dict[str, Any]:
    """What the node, not the server, decides for the task's method (:data:`distill.task.NODE_ONLY`):
    where an expert buffer (MTT, DP-MTT) is kept, the node-config's ``expert-cache`` directory, or
    no file at all (in memory). A server never makes a node write files."""
    if "expert_cache" not in config_fields(task.distill_method):
        return {}
    directory = str(node_config.get("expert-cache", "")).strip()
    return {"expert_cache": directory or None}


def distill_partition(real: LabeledImages, task: DistillTask, seed: int, embedder_state: dict | None = None,
                      node: Mapping[str, Any] | None = None) -> tuple[SyntheticSet, dict[str, Any]]:
    """Distill ``real`` under the task's class budget; returns the set and its report.

    Classes with the same budget are distilled together (the core gives each class
    ``min(ipc, n_c)`` images, so a smaller budget means a separate call with that ipc), and the
    parts joined with :func:`distill.synthetic.concat_sets`, which keeps IDC factors. A
    parameterisation with shared learned networks (haba, latent) is one set with one set of
    networks, so it is distilled in one call at the largest budget and each class then keeps
    its first ``budget[c]`` stored bases (:func:`keep_bases`). ``node``: node-side method settings
    (:data:`distill.task.NODE_ONLY`, e.g. ``device``).
    """
    if task.dp != "none":  # budgets come from exact counts: under DP see client.private
        raise ValueError(f"distill_partition is not private; dp={task.dp!r} goes through client.private")
    start = time.perf_counter()
    hist = real.class_histogram()
    budget = task_budget(task, hist)
    if not budget.counts.any():
        raise ValueError(f"no class has >= {task.min_class_samples} samples (histogram {hist.tolist()})")
    shared_nets = parameterisation(task.param).shared_networks  # one set of networks for every class
    counts = budget.counts
    groups = [int(counts.max())] if shared_nets else sorted(set(counts[counts > 0].tolist()), reverse=True)
    parts: list[SyntheticSet] = []
    for k in groups:
        classes = np.flatnonzero(counts == k if not shared_nets else counts > 0)
        config = method_config(task, seed=seed, ipc=int(k), embedder_state=embedder_state, **(node or {}))
        parts.append(distill(real.of_classes(classes), config))
    meta = parts[0].meta
    report = {"examples": len(real), "class-histogram": hist.tolist(), "classes-capped": budget.capped,
              "classes-skipped": budget.skipped}
    extra = dict(meta.extra, classes_capped=len(budget.capped), classes_skipped=len(budget.skipped))
    meta = replace(meta, ipc=task.ipc, round=task.round, seed=seed, extra=extra)
    syn = keep_bases(parts[0], counts, meta) if shared_nets else concat_sets(parts, meta)
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
