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
  epsilon-planned, delta, privacy-budget), no arrays. A task the node refuses is declined with
  kind "policy" and ``metrics`` declined=1 (plus the run's delta in a DP run): one its privacy
  policy refuses (dp="none" on a DP-only node, a larger delta, a method or size over its limits),
  one over the node's own limits (:mod:`client.limits`), a dataset the node did not name
  (:func:`client.task.dataset_refusal`), or a global model unlike the network the node builds.
- FedAvg reply: ``arrays`` and ``metrics`` (with ``num-examples``), as Flower's FedAvg expects.
- evaluate in: ``arrays`` (+ ``config``); reply ``metrics``: num-examples, accuracy, loss
  (under DP: declined=1 and num-examples 0, since held-out accuracy is not covered by the guarantee;
  the same for an evaluation the node refuses, whose reason stays in the node's log).

The privacy ledger is a file on the node's disk (:mod:`client.private`): with a policy, the
node's lifetime ledger; without one, a ledger per run and node. Every DP draw comes from the
node's secret generator; the public seed reproduces only what does not touch the data.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from distill.data import DatasetInfo, LabeledImages
from distill.partition import client_seed
from distill.synthetic import SyntheticSet
from distill.task import DistillTask
from privacy.policy import NodePolicy

from . import private
from .limits import NodeLimits, checked_state, network_refusal, record_refusal
from .local import build_network, evaluate_model, expected_state, train_local
from .task import dataset_refusal, distill_partition, load_partition, node_method_settings

log = logging.getLogger("fedistill.client")

# What a ClientApp can be given instead of the honest behaviour (a simulation's malicious client):
# ``load(task, node_config, public_only=False) -> (train, held_out)`` and
# ``distill(real, task, seed, embedder_state=None, node=None) -> (set, report)`` (``node``: the
# node-side method settings, :func:`client.task.node_method_settings`).
Loader = Callable[..., tuple[LabeledImages, LabeledImages]]
Distiller = Callable[..., tuple[SyntheticSet, dict[str, Any]]]


def _task(msg: Message, context: Context) -> tuple[DistillTask, NodePolicy | None, NodeLimits]:
    """The task, the node's own privacy policy and limits (read once per message), threads set."""
    config: dict[str, Any] = dict(msg.content["config"]) if "config" in msg.content else {}
    if "server-round" in config:  # injected by Flower's FedAvg strategy
        config["round"] = int(config.pop("server-round"))
    task = DistillTask.from_config(config)
    policy = private.node_policy(context.node_config)
    limits = NodeLimits.from_node_config(context.node_config)
    threads = limits.threads_for(task.client_threads)
    if policy is not None and policy.max_threads is not None:
        threads = min(threads, policy.max_threads)  # the node's limit wins
    torch.set_num_threads(threads)  # one thread per virtual client: no oversubscription
    return task, policy, limits


def _partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", context.node_id))


def _global_model(task: DistillTask, info: DatasetInfo, record: ArrayRecord | None,
                  limits: NodeLimits) -> dict[str, torch.Tensor] | None | str:
    """The global model checked against the network this node builds for the task (None when
    none was sent), or why it is refused: nothing unchecked reaches ``load_state_dict``."""
    try:
        expected = expected_state(task, info)
    except (ValueError, RuntimeError) as err:  # a geometry the network cannot take
        return f"the run's network does not fit this node's data: {err}"
    if (refused := network_refusal(expected, limits, task)) is not None or record is None:
        return refused
    return checked_state(record, expected)


def _arrays(msg: Message) -> ArrayRecord | None:
    record = msg.content.array_records.get("arrays")
    return record if isinstance(record, ArrayRecord) else None


def make_client_app(load: Loader | None = None, distill: Distiller | None = None) -> ClientApp:
    """A ClientApp whose partition loading and distillation are ``load`` and ``distill``.

    The default (None) is the honest client's (:data:`app`); a simulation injects its own
    behaviour here (``simulations/malicious_client.py``) rather than patching this module.
    """
    client_app = ClientApp()

    @client_app.train()
    def train_handler(msg: Message, context: Context) -> Message:
        return train(msg, context, load=load, distill=distill)

    @client_app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        return evaluate(msg, context, load=load)

    return client_app


def train(msg: Message, context: Context, *, load: Loader | None = None,
          distill: Distiller | None = None) -> Message:
    """Distill the local partition (fedistill) or run local SGD on the global model (FedAvg)."""
    load, distill = load or load_partition, distill or distill_partition
    task, policy, limits = _task(msg, context)
    seed = client_seed(task.seed, _partition_id(context), task.round)
    record = _arrays(msg)
    if (declined := private.admit(task, policy, context.node_config)) is not None:
        return _decline(msg, declined)
    if record is not None and (refused := record_refusal(record, limits)) is not None:
        return _decline(msg, private.policy_decline(task, refused))
    if task.dp != "none":
        return _train_private(msg, context, task, seed, record, limits, load)
    real, _ = load(task, context.node_config)
    global_state = _global_model(task, real.info, record, limits)
    if isinstance(global_state, str):
        return _decline(msg, private.policy_decline(task, global_state))
    if task.algorithm == "fedavg":
        if global_state is None:
            return _decline(msg, private.policy_decline(task, "a FedAvg round needs the global model"))
        net = build_network(task, real.info)
        net.load_state_dict(global_state)
        train_local(net, real, task, seed)
        arrays = ArrayRecord(net.state_dict())
        metrics = MetricRecord({"num-examples": len(real),
                                "bytes-uploaded": sum(a.numpy().nbytes for a in arrays.values())})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
    syn, report = distill(real, task, seed, embedder_state=global_state,
                          node=node_method_settings(task, context.node_config))
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


def _train_private(msg: Message, context: Context, task: DistillTask, seed: int, record: ArrayRecord | None,
                   limits: NodeLimits, load: Loader) -> Message:
    """One DP round: the node's policy and ledger decide before any private data is read.

    The global model is checked against the node's network once the data (its geometry) is
    loaded, which is after the round is charged: a mismatch then fails the round (an error reply)
    before anything is loaded into a network, and the charge stands (conservative).
    """
    def embedder(real: LabeledImages) -> dict[str, torch.Tensor] | None:
        checked = _global_model(task, real.info, record, limits)
        if isinstance(checked, str):
            raise ValueError(f"refused: {checked}")
        return checked

    outcome = private.private_round(task, context.node_config, run_id=context.run_id, node_id=context.node_id,
                                    seed=seed, embedder=embedder,
                                    load=lambda: load(task, context.node_config, public_only=True)[0])
    if isinstance(outcome, private.Declined):
        return _decline(msg, outcome)
    syn, metrics = outcome
    syn = syn.with_meta(client=str(_partition_id(context)))
    return Message(_set_content(syn, metrics), reply_to=msg)


def evaluate(msg: Message, context: Context, *, load: Loader | None = None) -> Message:
    """The global model's accuracy on this node's held-out data."""
    load = load or load_partition
    task, policy, limits = _task(msg, context)
    if task.dp != "none" or (policy is not None and policy.dp_required):
        # held-out accuracy is a release the DP accountant does not cover
        return _evaluate_declined(msg)
    record = _arrays(msg)
    refused = dataset_refusal(task, context.node_config)
    if refused is None:
        refused = "no global model sent" if record is None else record_refusal(record, limits)
    if refused is not None:
        log.warning("evaluate declined: %s", refused)
        return _evaluate_declined(msg)
    _, holdout = load(task, context.node_config)
    global_state = _global_model(task, holdout.info, record, limits)
    if not isinstance(global_state, dict):
        log.warning("evaluate declined: %s", global_state)
        return _evaluate_declined(msg)
    net = build_network(task, holdout.info)
    net.load_state_dict(global_state)
    acc, loss = evaluate_model(net, holdout)
    metrics = MetricRecord({"num-examples": len(holdout), "accuracy": acc if len(holdout) else 0.0,
                            "loss": loss if len(holdout) else 0.0})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _evaluate_declined(msg: Message) -> Message:
    """An evaluate reply carries only metrics: a decline is declined=1 with no examples (the
    reason stays in the node's log)."""
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0, "accuracy": 0.0, "loss": 0.0,
                                                        "declined": 1})}), reply_to=msg)


app = make_client_app()
