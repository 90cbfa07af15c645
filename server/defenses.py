"""Server-side defenses over a round's accepted synthetic sets (run-config ``defense``).

Both defenses compare clients with each other (robust statistics: median and MAD, so a
minority of bad sets cannot hide by shifting the reference), and need at least three sets:

- ``holdout``: per-client validation. A small ConvNet is trained on each client's set alone
  (``defense-epochs``, no augmentation) and scored on a seeded ``defense-holdout`` images of the
  server's test split: the balanced accuracy over the classes the set covers, predicting only
  among those classes (fair to non-IID clients holding a few classes). A set is dropped when its
  score is below the median by more than ``defense-z`` robust standard deviations (1.4826 x MAD)
  and by more than ``defense-min-gap``. Catches junk and flipped labels; a set with a single
  class cannot be judged (scored ``null``, kept); a stealthy trigger on a small fraction barely
  moves clean accuracy.
- ``outlier``: per-class mean embeddings of each set under one fixed, seeded random ConvNet
  (as distribution matching uses); for each class, a client's distance to the coordinate-wise
  median of every client covering that class (three or more), turned into a robust z-score
  within the class (scale at least ``OUTLIER_SCALE_FLOOR`` x the median distance). A client is
  dropped when its largest z over classes exceeds ``defense-z``. Catches classes stuffed with
  other classes' images (a relabelled backdoor, a label flip), at the price of flagging honest
  clients whose class really looks different (rare writing styles, heavy skew).

Dropped sets are refused with kind ``defense-dropped`` (counted and explained like any
rejection) and never enter the pool; the round goes on with the rest. Sets already in the pool
from other nodes (iterative mode) join the outlier comparison as references but are not judged
again. The holdout is carved out of the server's test split (:func:`split_holdout`): with the
holdout defense on, the global model is evaluated on the rest, so no image that chose the
clients also scores the model they built.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distill.data import LabeledImages
from distill.networks import embed_in_chunks, network_for
from distill.synthetic import SyntheticSet
from distill.train import TrainConfig, train_network

from .validate import Rejected

log = logging.getLogger("fedistill.server")

DEFENSES = ("none", "holdout", "outlier", "both")
FAIL_MODES = ("closed", "open")
MIN_CLIENTS = 3  # median and MAD say nothing about fewer
OUTLIER_SCALE_FLOOR = 0.5  # outlier z-scale >= this x the class's median distance (MAD of 3 points can be ~0)
MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class DefenseConfig:
    mode: str = "none"
    z: float = 3.0
    min_gap: float = 0.25
    epochs: int = 30
    holdout: int = 500
    seed: int = 0
    arch_kwargs: tuple[tuple[str, int], ...] = ()
    fail: str = "closed"  # a defense that raises drops the round's new sets ("closed") or keeps them ("open")

    def __post_init__(self) -> None:
        if self.mode not in DEFENSES:
            raise ValueError(f"defense must be one of {DEFENSES}, got {self.mode!r}")
        if self.fail not in FAIL_MODES:
            raise ValueError(f"defense-fail must be one of {FAIL_MODES}, got {self.fail!r}")
        if not self.z > 0 or not 0 <= self.min_gap <= 1 or self.epochs < 1 or self.holdout < 1:
            raise ValueError(f"defense-z > 0, defense-min-gap in [0, 1], defense-epochs and defense-holdout >= 1: "
                             f"{self}")


def _hard_labels(syn: SyntheticSet) -> torch.Tensor:
    return syn.labels.argmax(1) if syn.soft_labels else syn.labels


def robust_z(values: np.ndarray, floor: float = 0.0) -> tuple[np.ndarray, float, float]:
    """(z-scores, median, scale): scale = max(1.4826 x MAD, ``floor``, tiny)."""
    med = float(np.median(values))
    scale = max(MAD_TO_SD * float(np.median(np.abs(values - med))), floor, 1e-12)
    return (values - med) / scale, med, scale


def split_holdout(test: LabeledImages, config: DefenseConfig) -> tuple[LabeledImages | None, LabeledImages]:
    """(holdout, evaluation split) of the server's test split under ``config``.

    With the holdout defense on, a seeded ``config.holdout`` images (the same every round) score
    the clients and the global model is evaluated on the remaining ones; at least half of the
    test split stays for evaluation. Without it: ``(None, test)``.
    """
    if config.mode not in ("holdout", "both"):
        return None, test
    size = min(config.holdout, len(test) // 2)
    order = np.random.default_rng(np.random.SeedSequence([config.seed, 0x5EED])).permutation(len(test))
    return test.subset(np.sort(order[:size])), test.subset(np.sort(order[size:]))


@torch.no_grad()
def _covered_balanced_accuracy(net: torch.nn.Module, holdout: LabeledImages, covered: np.ndarray) -> float | None:
    mask = torch.full((holdout.info.num_classes,), float("-inf"))
    mask[torch.as_tensor(covered)] = 0.0
    recalls = []
    for c in covered:
        idx = torch.nonzero(holdout.labels == int(c)).flatten()
        if len(idx):
            pred = (net(holdout.images[idx]) + mask).argmax(1)
            recalls.append(float((pred == int(c)).float().mean()))
    return float(np.mean(recalls)) if recalls else None


def holdout_scores(sets: list[tuple[int, SyntheticSet]], holdout: LabeledImages,
                   config: DefenseConfig) -> dict[int, float | None]:
    """Per node: balanced holdout accuracy of a model trained on its set alone (``None``: one class)."""
    kwargs = dict(config.arch_kwargs)
    train = TrainConfig(arch="convnet", arch_kwargs=kwargs, epochs=config.epochs, batch_size=64, dsa=False)
    out: dict[int, float | None] = {}
    for node, syn in sets:
        labels = _hard_labels(syn)
        covered = np.unique(labels.numpy())
        if len(covered) < 2:
            out[node] = None
            continue
        net = network_for(holdout.info, seed=config.seed, **kwargs)
        train_network(net, syn.images, syn.labels, train, seed=config.seed)
        out[node] = _covered_balanced_accuracy(net, holdout, covered)
    return out


def class_means(sets: list[tuple[int, SyntheticSet]], config: DefenseConfig,
                pixels: bool = False) -> dict[int, dict[int, torch.Tensor]]:
    """Per node, per class it holds: the mean embedding of its images under a fixed random ConvNet
    (``pixels``: the mean image instead)."""
    info = sets[0][1].meta.dataset
    net = network_for(info, seed=config.seed + 1, **dict(config.arch_kwargs)).eval()
    out: dict[int, dict[int, torch.Tensor]] = {}
    for node, syn in sets:
        feats = embed_in_chunks(net, syn.images.float())
        if pixels:
            feats = syn.images.float().flatten(1)
        labels = _hard_labels(syn)
        out[node] = {int(c): feats[labels == c].mean(0) for c in torch.unique(labels)}
    return out


def outlier_scores(judged: list[tuple[int, SyntheticSet]], references: list[tuple[int, SyntheticSet]],
                   config: DefenseConfig) -> dict[int, tuple[float, int] | None]:
    """Per judged node: (largest per-class robust z, that class), ``None`` when no class has 3+ holders."""
    z_by_node: dict[int, tuple[float, int] | None] = {node: None for node, _ in judged}
    for pixels in (False, True):
        _class_z(class_means(judged + references, config, pixels), z_by_node)
    return z_by_node


def _class_z(means: dict[int, dict[int, torch.Tensor]], z_by_node: dict[int, tuple[float, int] | None]) -> None:
    """Raise ``z_by_node[node]`` to its largest per-class robust z under ``means``."""
    classes = sorted({c for per in means.values() for c in per})
    for c in classes:
        holders = [node for node in means if c in means[node]]
        if len(holders) < MIN_CLIENTS:
            continue
        stack = torch.stack([means[node][c] for node in holders])
        centre = stack.median(0).values
        dist = (stack - centre).norm(dim=1).numpy().astype(np.float64)
        z, med, _ = robust_z(dist, floor=OUTLIER_SCALE_FLOOR * float(np.median(dist)))
        for node, zi in zip(holders, z):
            if node in z_by_node and (z_by_node[node] is None or zi > z_by_node[node][0]):
                z_by_node[node] = (float(zi), c)


def screen(accepted: list[tuple[int, SyntheticSet]], holdout: LabeledImages | None, config: DefenseConfig,
           references: list[tuple[int, SyntheticSet]] = ()) -> dict[str, Any]:
    """Judge a round's accepted sets; returns ``{"mode", "dropped": {node: reason}, "scores": {...}}``.

    ``holdout``: the labelled images the holdout defense scores on (:func:`split_holdout`).
    ``references``: other nodes' pooled sets, used as outlier references only.
    """
    report: dict[str, Any] = {"mode": config.mode, "dropped": {}, "scores": {}}
    if config.mode == "none" or len(accepted) + len(references) < MIN_CLIENTS:
        if config.mode != "none":
            report["skipped"] = f"fewer than {MIN_CLIENTS} sets to compare"
        return report
    dropped: dict[int, str] = {}
    if config.mode in ("holdout", "both") and len(accepted) >= MIN_CLIENTS:
        if holdout is None:
            raise ValueError(f"defense {config.mode!r} needs holdout images")
        scores = holdout_scores(accepted, holdout, config)
        report["scores"]["holdout"] = {str(n): s for n, s in scores.items()}
        judged = {n: s for n, s in scores.items() if s is not None}
        if len(judged) >= MIN_CLIENTS:
            z, med, scale = robust_z(np.array(list(judged.values())))
            for (node, acc), zi in zip(judged.items(), z):
                if -zi > config.z and med - acc > config.min_gap:
                    dropped[node] = (f"holdout: balanced accuracy {acc:.3f} on its classes, median {med:.3f} "
                                     f"(robust z {zi:.1f} < -{config.z:g})")
    if config.mode in ("outlier", "both"):
        scores = outlier_scores(accepted, list(references), config)
        report["scores"]["outlier"] = {str(n): (None if s is None else {"z": s[0], "class": s[1]})
                                       for n, s in scores.items()}
        for node, s in scores.items():
            if s is not None and s[0] > config.z and node not in dropped:
                dropped[node] = (f"outlier: class {s[1]} mean embedding is {s[0]:.1f} robust SDs from the "
                                 f"clients' median (> {config.z:g})")
    report["dropped"] = {str(n): r for n, r in sorted(dropped.items())}
    return report


def screen_round(result: Any, pool: Any, settings: Any, holdout: LabeledImages | None) -> dict[str, Any] | None:
    """The round loop's hook: screen ``result.accepted`` (a ``RoundResult``) under ``settings.defense``.

    Dropped sets leave ``result.accepted`` and are refused as ``defense-dropped``; returns the
    report for the round's metrics line (``None`` when no defense is on).
    """
    config = settings.defense_config()
    if config.mode == "none":
        return None
    start = time.perf_counter()
    judged = {node for node, _ in result.accepted}
    references = [(node, syn) for node, syn in pool.items() if node not in judged]
    try:
        report = screen(result.accepted, holdout, config, references)
    except Exception as err:  # noqa: BLE001 - a failing defense must not stop the round: it fails as configured
        error = f"{type(err).__name__}: {str(err)[:300]}"
        kept = "keeps its accepted sets" if config.fail == "open" else "drops its new sets"
        log.exception("fedistill: defense %s failed (defense-fail=%s): the round %s", config.mode, config.fail, kept)
        dropped = {} if config.fail == "open" else {str(n): f"defense failed closed ({error})"
                                                    for n, _ in result.accepted}
        report = {"mode": config.mode, "error": error, "dropped": dropped}
    report["fail"] = config.fail
    report["clients"] = {str(node): syn.meta.client for node, syn in result.accepted}  # the set's own claim
    for node, reason in report["dropped"].items():
        result.reject(int(node), Rejected("defense-dropped", reason))
    result.accepted = [(n, s) for n, s in result.accepted if str(n) not in report["dropped"]]
    report["seconds"] = time.perf_counter() - start
    return report


def defense_summary(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's defense part: the mode and every dropped set with its reason (empty without defense)."""
    reports = [(m["round"], m["defense"]) for m in metrics if isinstance(m.get("defense"), dict)]
    if not reports:
        return {}
    return {"defense": reports[-1][1].get("mode"),
            "defense-dropped": [{"round": rnd, "node": int(node), "client": rep.get("clients", {}).get(node, ""),
                                 "reason": reason}
                                for rnd, rep in reports for node, reason in rep.get("dropped", {}).items()]}
