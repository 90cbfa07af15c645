"""A client's DP round, free of Flower: plan the spend, ask the ledger, distill once.

Under DP the client makes exactly one distillation call over its whole partition. The
non-private path (:func:`client.task.distill_partition`) splits classes into groups from the
exact histogram; under DP that would leak the histogram, and every call would spend again.
The DP methods choose classes from noisy counts themselves (``privacy.layout``).

A round's spend is fixed from the task alone (never from the data), so the client can ask its
:class:`privacy.PrivacyLedger` whether the round fits the budget before reading anything, and
charge it before distilling: a run that fails midway has still spent.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping

import privacy  # noqa: F401 - registers dp-dm and dpsgd-gm with distill.methods
from distill.data import LabeledImages
from distill.methods import distill, make_config
from distill.synthetic import SyntheticSet
from privacy import DPConfig, PrivacyLedger, PrivacyPlan

from .task import DistillTask


def dp_config(task: DistillTask, seed: int, embedder_state: dict | None = None) -> DPConfig:
    """The DP method's config for one round; initialisation is always noise under DP."""
    if task.dp == "none":
        raise ValueError("dp_config needs a task with dp set")
    return make_config(task.dp, ipc=task.ipc, iterations=task.iterations, init="noise", seed=seed,
                       arch="convnet", arch_kwargs=task.arch_kwargs, embedder_state=embedder_state,
                       embedder_noise=task.embedder_noise, epsilon=task.epsilon, delta=task.delta,
                       clip=task.clip, sigma=task.sigma, sample_rate=task.sample_rate,
                       accountant=task.accountant, rho=task.rho)


def effective_budget(task: DistillTask, node_config: Mapping[str, Any]) -> float | None:
    """The tighter of the run's ``privacy-budget`` and the node's own; ``None`` for no limit.

    The run-config is chosen by whoever starts the run; a data holder may cap its spending with
    ``privacy-budget`` in its node-config, and no run-config can raise that cap. 0 = no limit.
    """
    caps = []
    for value in (task.privacy_budget, node_config.get("privacy-budget", 0.0)):
        cap = float(value)
        if not (cap >= 0 and math.isfinite(cap)):
            raise ValueError(f"privacy-budget must be finite and >= 0, got {value!r}")
        if cap > 0:
            caps.append(cap)
    return min(caps) if caps else None


def load_ledger(state_json: str | None, task: DistillTask, node_config: Mapping[str, Any]) -> PrivacyLedger:
    """This run's ledger: past spends from ``state_json``; accountant, delta and budget from now.

    Only the spends carry over: (sigma, q, steps) compose under any accountant and delta.
    """
    spends = PrivacyLedger.from_state_dict(json.loads(state_json)).spends if state_json else []
    return PrivacyLedger(task.accountant, task.delta, effective_budget(task, node_config), spends)


def ledger_json(ledger: PrivacyLedger) -> str:
    """What the ClientApp keeps in ``context.state`` between rounds (plain JSON, no pickle)."""
    return json.dumps(ledger.state_dict())


def privacy_metrics(plan: PrivacyPlan, ledger: PrivacyLedger) -> dict[str, float | int]:
    """The reply's privacy figures: this round's spend and the run's total so far."""
    return {"epsilon-round": float(plan.epsilon), "epsilon-total": float(ledger.epsilon()),
            "delta": float(plan.delta), "sigma": float(plan.sigma), "sample-rate": float(plan.sample_rate),
            "steps": int(plan.steps), "clip": float(plan.clip), "rho": float(plan.rho),
            "privacy-budget": float(ledger.budget or 0.0)}


def decline_metrics(plan: PrivacyPlan, ledger: PrivacyLedger) -> dict[str, float | int]:
    """What a declining client reports: its total so far and the round it would not pay for."""
    return {"declined": 1, "epsilon-total": float(ledger.epsilon()),
            "epsilon-planned": float(ledger.epsilon_after(plan.spends)), "delta": float(ledger.delta),
            "privacy-budget": float(ledger.budget or 0.0)}


def distill_private(real: LabeledImages, task: DistillTask, config: DPConfig, plan: PrivacyPlan,
                    ledger: PrivacyLedger) -> tuple[SyntheticSet, dict[str, Any]]:
    """One DP distillation of the whole partition, already charged to ``ledger``; set + metrics.

    The metrics hold no exact count of the private data (no ``num-examples`` or histogram).
    """
    start = time.perf_counter()
    syn = distill(real, config)
    syn = syn.with_meta(round=task.round, seed=config.seed)
    metrics: dict[str, Any] = {"seconds": time.perf_counter() - start, "bytes-uploaded": syn.nbytes(),
                               **privacy_metrics(plan, ledger)}
    return syn, metrics
