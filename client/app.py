"""The ClientApp: translates Flower messages to and from ``client.task`` / ``client.local``.

Wire protocol (keys of the message's RecordDict):

- train in: ``config`` (ConfigRecord, the task in kebab-case keys), optional ``arrays``
  (ArrayRecord, the global model: FedDM-style embedder in iterative mode, the model to
  update under FedAvg).
- fedistill reply: ``synthetic`` (ArrayRecord: images, labels), ``meta`` (ConfigRecord:
  ``set-meta`` JSON of :class:`distill.synthetic.SetMetadata`), ``metrics`` (MetricRecord).
- DP reply (``dp`` set): as above, but ``metrics`` carry the privacy figures (epsilon-round,
  epsilon-total, delta, sigma, sample-rate, steps, clip, rho, privacy-budget) and no exact
  count or timing of the private data. Past the budget the client declines: ``declined``
  (ConfigRecord: kind "budget", reason) and ``metrics`` (declined=1, epsilon-total,
  epsilon-planned, delta, privacy-budget), no arrays. A task the node's privacy policy refuses
  (dp="none" on a DP-only node, a larger delta, a method or size over its limits) is declined
  with kind "policy" and ``metrics`` declined=1 (plus the run's delta in a DP run).
- FedAvg reply: ``arrays`` and ``metrics`` (with ``num-examples``), as Flower's FedAvg expects.
- evaluate in: ``arrays`` (+ ``config``); reply ``metrics``: num-examples, accuracy, loss
  (under DP: declined=1 and num-examples 0, since held-out accuracy is not covered by the guarantee).

The privacy ledger is a file on the node's disk (:mod:`client.private`): with a policy, the
node's lifetime ledger; without one, a ledger per run and node. Every DP draw comes from the
node's secret generator; the public seed reproduces only what does not touch the data.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from distill.partition import client_seed
from distill.synthetic import SyntheticSet
from privacy.policy import NodePolicy

from . import private
from .local import build_network, evaluate_model, train_local
from .task import DistillTask, distill_partition, load_partition

app = ClientApp()


def _task(msg: Message, context: Context) -> tuple[DistillTask, NodePolicy | None]:
    """The task, and the node's own privacy policy (read once per message), threads set."""
    config: dict[str, Any] = dict(msg.content["config"]) if "config" in msg.content else {}
    if "server-round" in config:  # injected by Flower's FedAvg strategy
        config["round"] = int(config.pop("server-round"))
    task = DistillTask.from_config(config)
    policy = private.node_policy(context.node_config)
    threads = task.client_threads
    if policy is not None and policy.max_threads is not None:
        threads = min(threads, policy.max_threads)  # the node's limit wins
    torch.set_num_threads(threads)  # one thread per virtual client: no oversubscription
    return task, policy


def _partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", context.node_id))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Distill the local partition (fedistill) or run local SGD on the global model (FedAvg)."""
    task, policy = _task(msg, context)
    seed = client_seed(task.seed, _partition_id(context), task.round)
    global_state = msg.content["arrays"].to_torch_state_dict() if "arrays" in msg.content else None
    if task.dp != "none":
        return _train_private(msg, context, task, seed, global_state)
    if (declined := private.admit(task, policy)) is not None:
        return _decline(msg, declined)
    real, _ = load_partition(task, context.node_config)
    if task.algorithm == "fedavg":
        net = build_network(task, real.info)
        net.load_state_dict(global_state)
        train_local(net, real, task, seed)
        arrays = ArrayRecord(net.state_dict())
        metrics = MetricRecord({"num-examples": len(real),
                                "bytes-uploaded": sum(a.numpy().nbytes for a in arrays.values())})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
    syn, report = distill_partition(real, task, seed, embedder_state=global_state)
    syn = syn.with_meta(client=str(_partition_id(context)))
    metrics = {
        "num-examples": int(report["examples"]),
        "class-histogram": [int(v) for v in report["class-histogram"]],
        "seconds": float(report["seconds"]),
        "bytes-uploaded": int(report["bytes-uploaded"]),
        "classes-capped": len(report["classes-capped"]),
        "classes-skipped": len(report["classes-skipped"]),
        **({"rho": float(task.rho)} if task.rho > 0 else {}),
    }
    return Message(_set_content(syn, metrics), reply_to=msg)


def _set_content(syn: SyntheticSet, metrics: dict[str, Any]) -> RecordDict:
    return RecordDict({
        "synthetic": ArrayRecord({k: Array(v) for k, v in syn.to_arrays().items()}),
        "meta": ConfigRecord({"set-meta": json.dumps(syn.meta.to_dict())}),
        "metrics": MetricRecord(metrics),
    })


def _decline(msg: Message, declined: private.Declined) -> Message:
    record = ConfigRecord({"kind": declined.kind, "reason": declined.reason})
    return Message(RecordDict({"declined": record, "metrics": MetricRecord(declined.metrics)}), reply_to=msg)


def _train_private(msg: Message, context: Context, task: DistillTask, seed: int,
                   global_state: dict | None) -> Message:
    """One DP round: the node's policy and ledger decide before any private data is read."""
    outcome = private.private_round(task, context.node_config, run_id=context.run_id, node_id=context.node_id,
                                    seed=seed, embedder_state=global_state,
                                    load=lambda: load_partition(task, context.node_config, public_only=True)[0])
    if isinstance(outcome, private.Declined):
        return _decline(msg, outcome)
    syn, metrics = outcome
    syn = syn.with_meta(client=str(_partition_id(context)))
    return Message(_set_content(syn, metrics), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model's accuracy on this node's held-out data."""
    task, policy = _task(msg, context)
    if task.dp != "none" or (policy is not None and policy.dp_required):
        # held-out accuracy is a release the DP accountant does not cover
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0, "accuracy": 0.0, "loss": 0.0,
                                                            "declined": 1})}), reply_to=msg)
    _, holdout = load_partition(task, context.node_config)
    net = build_network(task, holdout.info)
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    acc, loss = evaluate_model(net, holdout)
    metrics = MetricRecord({"num-examples": len(holdout), "accuracy": acc if len(holdout) else 0.0,
                            "loss": loss if len(holdout) else 0.0})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
