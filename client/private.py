"""A client's DP round, free of Flower: admit under the node's policy, charge its ledger, distill once.

Under DP the client makes exactly one distillation call over its whole partition. The
non-private path (:func:`client.task.distill_partition`) splits classes into groups from the
exact histogram; under DP that would leak the histogram, and every call would spend again.
The DP methods choose classes from noisy counts (``privacy.layout``).

Order of a round, each step before the next:

1. the node's limits (:mod:`client.limits`), its choice of data and its policy
   (:class:`privacy.policy.NodePolicy`, from its node-config) admit the task or decline it with a
   reason: the run cannot raise a cap, a delta or a limit of the node;
2. the round's spend, fixed from the task alone, is charged to the node's ledger file
   (:class:`privacy.node_ledger.NodeLedger`), or the round is declined: nothing is read first;
3. only then is the private data loaded (with public or declared statistics only), the class
   counts released once (kept in the ledger for later rounds and runs), and the set distilled
   with noise from the node's secret generator.

A node without a policy (a simulated node) gets a ledger file of its own (per node and data)
under ``$FEDISTILL_LEDGER_DIR`` (or ``ledger-dir`` in its node-config; default the system's temp
folder); it has no lifetime cap, and the run's ``privacy-budget`` caps each run's entries, so
benchmark runs never share a cap.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

from distill.data import LabeledImages
from distill.methods import distill
from distill.synthetic import SyntheticSet
from distill.task import DistillTask, method_config
from privacy import BudgetExceeded, DPConfig, PrivacyLedger, PrivacyPlan, privacy_plan
from privacy.layout import noisy_counts
from privacy.node_ledger import NodeLedger, file_identity, spends_of
from privacy.policy import NodePolicy, PolicyDeclined
from privacy.randomness import noise_generator

from .limits import NodeLimits
from .task import dataset_refusal, node_method_settings

LEDGER_DIR_ENV = "FEDISTILL_LEDGER_DIR"
COUNTS_RELEASE = "class-counts"


@dataclass(frozen=True)
class Declined:
    """A round the node will not run: ``kind`` "policy" or "budget", the reason, the reply's metrics."""

    kind: str
    reason: str
    metrics: dict[str, float | int]


def refuse_insecure(node_config: Mapping[str, Any]) -> None:
    """Insecure (replayable) noise is for tests of the library; a node never runs with it."""
    if insecure := sorted(str(k) for k in node_config if "insecure" in str(k)):
        raise ValueError(f"node-config {insecure}: insecure noise is for tests only; a ClientApp refuses it")


def node_policy(node_config: Mapping[str, Any]) -> NodePolicy | None:
    """The data holder's policy from its node-config (None for a simulated node that sets none)."""
    refuse_insecure(node_config)
    return NodePolicy.from_node_config(node_config)


def policy_decline(task: DistillTask, reason: str) -> Declined:
    """A ``policy`` decline: the reply's metrics say declined (and, in a DP run, the run's delta)."""
    metrics: dict[str, float | int] = {"declined": 1}
    if task.dp != "none":
        metrics["delta"] = float(task.delta)
    return Declined("policy", reason, metrics)


def admit(task: DistillTask, policy: NodePolicy | None,
          node_config: Mapping[str, Any] | None = None) -> Declined | None:
    """A ``policy`` decline for a task over the node's limits (:mod:`client.limits`), on data the
    node did not name (:func:`client.task.dataset_refusal`), or refused by its privacy policy; else None."""
    node_config = node_config or {}
    refused = NodeLimits.from_node_config(node_config).refusal(task) or dataset_refusal(task, node_config)
    if refused is not None:
        return policy_decline(task, refused)
    if policy is None:
        return None
    try:
        policy.admit(dp=task.dp if task.algorithm == "fedistill" else "none", delta=task.delta,
                     iterations=task.iterations, ipc=task.ipc, threads=task.client_threads)
    except PolicyDeclined as err:
        return policy_decline(task, str(err))
    return None


def dp_config(task: DistillTask, seed: int, embedder_state: dict | None = None, accountant: str | None = None,
              released_counts: tuple[float, ...] | None = None, node: Mapping[str, Any] | None = None) -> DPConfig:
    """The DP method's config for one round (:func:`distill.task.method_config`): noise init and
    secret noise, always; ``accountant`` is the node's ledger's when it has one; ``node`` the
    node-side method settings (:func:`client.task.node_method_settings`)."""
    if task.dp == "none":
        raise ValueError("dp_config needs a task with dp set")
    if accountant is not None and accountant != task.accountant:
        task = replace(task, accountant=accountant)
    config = method_config(task, seed=seed, embedder_state=embedder_state, **(node or {}),
                           insecure_reproducible_noise=False, released_counts=released_counts)
    assert isinstance(config, DPConfig)
    return config


def effective_budget(task: DistillTask, node_config: Mapping[str, Any]) -> float | None:
    """This run's cap: the tighter of the run's ``privacy-budget`` and the node's; None for none.

    A lifetime cap across runs is the policy's ``epsilon-cap``; this one bounds one run.
    """
    caps = []
    for value in (task.privacy_budget, node_config.get("privacy-budget", 0.0)):
        cap = float(value)
        if not (cap >= 0 and math.isfinite(cap)):
            raise ValueError(f"privacy-budget must be finite and >= 0, got {value!r}")
        if cap > 0:
            caps.append(cap)
    return min(caps) if caps else None


@lru_cache(maxsize=8)
def _file_identity(path: str, size: int, mtime_ns: int) -> str:
    return file_identity(path)


def data_identity(task: DistillTask, node_config: Mapping[str, Any]) -> str:
    """What the ledger guards: the data file's sha256, or the partition a simulated node holds."""
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        st = os.stat(path)
        return _file_identity(path, st.st_size, st.st_mtime_ns)
    spec = {k: node_config.get(k) for k in ("partition-id", "num-partitions")}
    spec.update(dataset=task.dataset, partitioner=task.partitioner, alpha=task.alpha,
                shards=task.shards_per_client, seed=task.seed, holdout=task.holdout_fraction)
    return "partition:" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def run_name(task: DistillTask, run_id: int) -> str:
    """The run a ledger entry belongs to: the server's run key (stable across a resume), else
    Flower's run id."""
    return task.run_key or str(run_id)


def open_ledger(task: DistillTask, node_config: Mapping[str, Any], policy: NodePolicy | None,
                run_id: int, node_id: int) -> NodeLedger:
    """The node's lifetime ledger under a policy, else a ledger file of this node and its data.

    Without a policy there is no lifetime cap: the file only holds each run's entries for the
    run's ``privacy-budget``. Its name comes from the node id and a hash of the data identity,
    never from anything the server sends.
    """
    data_id = (policy.data_id if policy is not None else "") or data_identity(task, node_config)
    if policy is not None:
        return NodeLedger(policy.ledger, data_id, policy.accountant, policy.max_delta, policy.epsilon_cap)
    root = Path(str(node_config.get("ledger-dir") or os.environ.get(LEDGER_DIR_ENV)
                    or Path(tempfile.gettempdir()) / "fedistill-ledgers"))
    data = hashlib.sha256(data_id.encode()).hexdigest()[:16]
    return NodeLedger(root / f"node-{node_id}-{data}.json", data_id, task.accountant, task.delta)


def privacy_metrics(plan: PrivacyPlan, run_total: float, budget: float | None) -> dict[str, float | int]:
    """The reply's privacy figures: this round's spend and the run's total so far (run's delta)."""
    return {"epsilon-round": float(plan.epsilon), "epsilon-total": float(run_total),
            "delta": float(plan.delta), "sigma": float(plan.sigma), "sample-rate": float(plan.sample_rate),
            "steps": int(plan.steps), "clip": float(plan.clip), "rho": float(plan.rho),
            "privacy-budget": float(budget or 0.0)}


def decline_metrics(plan: PrivacyPlan, run: PrivacyLedger) -> dict[str, float | int]:
    """What a declining client reports: this run's total so far and the total it would not pay for."""
    return {"declined": 1, "epsilon-total": float(run.epsilon()),
            "epsilon-planned": float(run.epsilon_after(plan.spends)), "delta": float(run.delta),
            "privacy-budget": float(run.budget or 0.0)}


def private_round(task: DistillTask, node_config: Mapping[str, Any], *, run_id: int, node_id: int, seed: int,
                  load: Callable[[], LabeledImages], embedder_state: dict | None = None,
                  embedder: Callable[[LabeledImages], dict | None] | None = None,
                  ) -> tuple[SyntheticSet, dict[str, Any]] | Declined:
    """One DP round (see the module docstring): the set and its metrics, or why it was declined.

    ``embedder`` (instead of ``embedder_state``): the global model for the loaded data, which the
    caller checks against the network it builds for that data's geometry (it may raise).
    """
    policy = node_policy(node_config)
    if (declined := admit(task, policy, node_config)) is not None:
        return declined
    ledger = open_ledger(task, node_config, policy, run_id, node_id)
    kept = ledger.release(COUNTS_RELEASE)
    counts = tuple(kept["counts"]) if isinstance(kept, dict) and "counts" in kept else None
    config = dp_config(task, seed, embedder_state, ledger.base.accountant, counts,
                       node=node_method_settings(task, node_config))
    plan = privacy_plan(config)
    run = PrivacyLedger(config.accountant, task.delta, effective_budget(task, node_config))
    try:
        charge = ledger.charge(plan.spends, run=run_name(task, run_id), round=task.round, method=task.dp,
                               run_budget=run, flower_run=str(run_id))
    except BudgetExceeded as err:
        run.spends = spends_of(ledger.read(), run_name(task, run_id), str(run_id))
        return Declined("budget", str(err), decline_metrics(plan, run))
    real = load()  # charged: from here on the round has spent, whatever happens
    if embedder is not None:
        config = replace(config, embedder_state=embedder(real))
    if counts is None:
        released = noisy_counts(real, config.count_sigma, noise_generator(seed))
        counts = tuple(float(c) for c in released.tolist())
        ledger.keep_release(COUNTS_RELEASE, {"sigma": config.count_sigma, "counts": list(counts)})
    syn = distill(real, replace(config, sigma=plan.sigma, released_counts=counts))
    count_sigma = float(kept["sigma"]) if isinstance(kept, dict) and "sigma" in kept else config.count_sigma
    syn = syn.with_meta(round=task.round, seed=config.seed, privacy=plan.meta(count_sigma=count_sigma))
    metrics: dict[str, Any] = {"bytes-uploaded": syn.nbytes(), **privacy_metrics(plan, charge.run, run.budget)}
    return syn, metrics
