"""The config-driven central scenario: one client's data, each target pipeline, every attack.

No federation: the "client" is a random slice of the training split. This is what
``python -m attacks.audit config.json --out DIR`` runs; a run store is audited by
:mod:`attacks.store_audit` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from distill.data import Dataset, LabeledImages
from distill.task import config_from_settings
from distill.train import TrainConfig

from .backdoor import Trigger, poison, train_and_score
from .canary import CanaryAudit, canary_audit, make_canaries
from .doorping import SUPPORTED as DOORPING_METHODS, DoorpingConfig, doorping_distill
from .experiment import MembershipReport, run_membership
from .membership import audit_pool
from .metrics import epsilon_lower_bound_from_scores
from .pipelines import make_pipeline
from distill.progress import progress as progress_bar

DP_AUDIT_ATTACK = ("lira-online", "loss")  # fixed before looking at any scores


@dataclass(frozen=True)
class CentralConfig:
    """What to audit; every field has a small default so an empty ``{}`` runs in minutes."""

    dataset: str = "mnist10k"
    seed: int = 0
    pool_size: int = 400
    shadows: int = 8
    train: dict = field(default_factory=lambda: {"arch": "convnet", "arch_kwargs": {"width": 16, "depth": 2},
                                                 "epochs": 50, "batch_size": 64, "dsa": False})
    targets: tuple = ({"kind": "real"}, {"kind": "distill", "method": "dm", "settings": {"ipc": 10, "iterations": 50}})
    backdoor: dict | None = field(default_factory=lambda: {"method": "dm", "settings": {"ipc": 10, "iterations": 50},
                                                           "fraction": 0.1, "size": 3, "target": 0,
                                                           "client_size": 1000, "doorping": True})
    delta: float = 1e-5
    # Canary DP audit of every target: a client of ``client_size`` training images, ``count``
    # canaries (disjoint from it) each inserted with probability 1/2, scored by ``score``.
    canary: dict | None = field(default_factory=lambda: {"kind": "mislabel", "count": 200, "client_size": 500,
                                                         "score": "loss", "runs": 1, "guess_fraction": 0.2,
                                                         "alpha": 0.05})

    def __post_init__(self) -> None:
        if self.pool_size < 20 or self.shadows < 0:
            raise ValueError(f"pool_size must be >= 20 and shadows >= 0: {self}")
        for t in self.targets:
            if t.get("kind") not in ("real", "distill"):
                raise ValueError(f"target kind must be 'real' or 'distill', got {t!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CentralConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known - {"scenario"})
        if unknown:
            raise ValueError(f"unknown audit config keys {unknown}; known: {sorted(known)}")
        d = {k: v for k, v in d.items() if k in known}
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**d)


def _target_pipeline(spec: dict, train: TrainConfig, targets: tuple = ()):
    """The spec's pipeline, named ``spec["name"]`` if given; a name shared by several targets
    (e.g. dp-dm at two epsilons) gets ``#2``, ``#3``... so tables and plots keep them apart."""
    if spec["kind"] == "real":
        pipe = make_pipeline("real", train)
    else:
        pipe = make_pipeline("distill", train, config_from_settings(spec["method"], spec.get("settings", {})))
    name = spec.get("name") or pipe.name

    def base(t: dict) -> str:
        return t.get("name") or ("real" if t["kind"] == "real" else str(t["method"]))

    same = [t for t in targets if base(t) == name]
    if len(same) > 1:
        name = f"{name} #{next(i for i, t in enumerate(same) if t is spec) + 1}"
    return replace(pipe, name=name)


def membership_section(cfg: CentralConfig, data: Dataset, progress: bool) -> list[MembershipReport]:
    train = TrainConfig(**cfg.train)
    pool = audit_pool(data.train, cfg.pool_size, cfg.seed)
    reports = []
    for spec in progress_bar(cfg.targets, "membership targets", progress):
        rep = run_membership(_target_pipeline(spec, train, cfg.targets), pool, data.test, cfg.shadows, cfg.seed, progress=progress)
        reports.append(rep)
    return reports


def dp_rows(reports: list[MembershipReport], delta: float) -> list[dict[str, Any]]:
    """Accountant epsilon (if the target claims one) beside the empirical lower bound of a pre-chosen attack."""
    rows = []
    for rep in reports:
        found = rep.by_attack()
        name = next((a for a in DP_AUDIT_ATTACK if a in found), None)
        if name is None:
            continue
        r = found[name]
        lb = epsilon_lower_bound_from_scores(r.scores_in, r.scores_out, delta=delta)
        rows.append({"target": rep.target, "attack": name, "claimed_epsilon": rep.privacy.get("epsilon", "none"),
                     "empirical_epsilon_lb": lb, "trials": r.metrics.members + r.metrics.non_members})
    return rows


def canary_section(cfg: CentralConfig, data: Dataset, progress: bool) -> list[CanaryAudit]:
    """One canary audit per target (same canaries and inclusions for all, so rows compare)."""
    c = cfg.canary or {}
    count, client_size = int(c.get("count", 200)), int(c.get("client_size", 500))
    if count + client_size > len(data.train):
        raise ValueError(f"canary count + client_size must be <= {len(data.train)}")
    perm = np.random.default_rng([cfg.seed, 3]).permutation(len(data.train))
    client = data.train.subset(np.sort(perm[:client_size]))
    source = data.train.subset(np.sort(perm[client_size:]))
    kind = c.get("kind", "mislabel")
    canaries = make_canaries(kind, source, count, cfg.seed)
    train = TrainConfig(**cfg.train)
    audits = []
    for spec in progress_bar(cfg.targets, "canary audit", progress):
        pipe = _target_pipeline(spec, train, cfg.targets)
        score = c.get("score", "loss")
        audits.append(canary_audit(pipe, client, canaries, kind=kind, score=score, seed=cfg.seed,
                                   runs=int(c.get("runs", 1)), alpha=float(c.get("alpha", 0.05)),
                                   guess_fraction=float(c.get("guess_fraction", 0.2))))
    return audits


def backdoor_section(cfg: CentralConfig, data: Dataset, progress: bool) -> list[dict[str, Any]]:
    """Clean run (the false-trigger floor), naive poisoning and, if asked, DOORPING; ASR and CTA each."""
    b = cfg.backdoor or {}
    train = TrainConfig(**cfg.train)
    client = audit_pool(data.train, int(b.get("client_size", 1000)), cfg.seed + 1)
    method = config_from_settings(b.get("method", "dm"), {**b.get("settings", {}), "seed": cfg.seed})
    trigger = Trigger.solid(data.info, size=int(b.get("size", 3)))
    target, frac = int(b.get("target", 0)), float(b.get("fraction", 0.1))

    def evaluate(name: str, real: LabeledImages, trig: Trigger, syn=None) -> dict[str, Any]:
        from distill.methods import distill
        syn = syn if syn is not None else distill(real, method)
        return {"name": name, "fraction": frac if name != "clean" else 0.0,
                **train_and_score(syn.images, syn.labels, data.test, trig, target, train, cfg.seed)}

    steps = ["clean", "naive"] + (["doorping"] if b.get("doorping") else [])
    rows = []
    for step in progress_bar(steps, "backdoor", progress):
        if step == "clean":
            rows.append(evaluate("clean", client, trigger))
        elif step == "naive":
            rows.append(evaluate("naive", poison(client, trigger, frac, target, cfg.seed)[0], trigger))
        elif method.method in DOORPING_METHODS:
            dcfg = DoorpingConfig(target=target, fraction=frac, size=trigger.size, seed=cfg.seed,
                                  **b.get("doorping_settings", {}))
            syn, trig, _ = doorping_distill(client, method, dcfg)
            rows.append(evaluate("doorping", client, trig, syn))
    return rows


def run_central(cfg: CentralConfig, data: Dataset, progress: bool = True) -> dict[str, Any]:
    """Everything the report needs, as plain JSON-able data plus the attack results for plots."""
    reports = membership_section(cfg, data, progress)
    attacks = [{**a, "test_accuracy": rep.test_accuracy} for rep in reports for a in rep.to_dict()["attacks"]]
    backdoor = backdoor_section(cfg, data, progress) if cfg.backdoor else []
    canaries = canary_section(cfg, data, progress) if cfg.canary else []
    notes = ["MIA rows: the pre-chosen attack's lower bound with the threshold picked on half of the pool "
             "(members were a balanced split, so it is indicative). Canary rows: the audit proper, each canary "
             "inserted with probability 1/2; the one-run bound (Steinke, Nasr & Jagielski 2023) is valid with many "
             "canaries per run, the Clopper-Pearson one only with one canary per run (cp_independent)."]
    eps_rows = [{"row": rep.target, "epsilon": rep.privacy.get("epsilon", "inf"), "accuracy": rep.test_accuracy}
                for rep in reports]
    return {"scenario": "central", "membership": reports, "membership_inference": {"attacks": attacks},
            "exposed": [{"target": rep.target, "attack": rep.exposed_attack, "scores": rep.exposed_scores}
                        for rep in reports if rep.exposed is not None],
            "backdoor": {"rows": backdoor},
            "dp_audit": {"rows": dp_rows(reports, cfg.delta), "canary_rows": [a.to_row() for a in canaries],
                         "accuracy_vs_epsilon": eps_rows, "notes": notes}}


def clean_floor(rows: list[dict[str, Any]]) -> float | None:
    return next((r["asr"] for r in rows if r["name"] == "clean"), None)


__all__ = ["CentralConfig", "clean_floor", "run_central"]
