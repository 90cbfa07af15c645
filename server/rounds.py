"""The fedistill round loop, as separate steps: wait, select, send, validate, merge, train, evaluate, store.

Each step is a function that tests call on its own; :func:`run_fedistill` only strings
them together. One bad client never stops a round: its reply is rejected and counted.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from distill.data import LabeledImages
from distill.networks import network_for
from distill.synthetic import SyntheticSet
from distill.train import TrainConfig, accuracy_and_loss, train_network

from .pool import SyntheticPool
from .settings import RunSettings
from .store import RunStore, privacy_summary
from .validate import Expectation, Rejected, check_reply

log = logging.getLogger("fedistill.server")
OnRound = Callable[[dict[str, Any]], None]
OnReply = Callable[[int, int], None]  # (replies so far, messages sent)


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Node ids once ``minimum`` nodes are connected; ``RuntimeError`` after ``timeout`` seconds.

    ``main()`` may start before the nodes register (Ray actors, remote SuperNodes).
    """
    deadline = time.monotonic() + timeout
    while len(ids := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(ids)} of the {minimum} nodes needed connected within {timeout:.0f} s")
        time.sleep(poll)
    return ids


def select_nodes(node_ids: Iterable[int], fraction: float, min_nodes: int, rng: random.Random) -> list[int]:
    """``max(min_nodes, fraction x available)`` nodes (at most all), drawn from a seeded ``rng``."""
    ids = sorted(node_ids)
    n = min(len(ids), max(min_nodes, int(fraction * len(ids))))
    return sorted(rng.sample(ids, n))


def make_messages(node_ids: list[int], config: dict[str, Any], round_: int, message_type: str,
                  global_state: dict | None = None) -> list[Message]:
    """One message per node: the task ``config`` and, when given, the global model as ``arrays``."""
    msgs = []
    for node in node_ids:
        content = RecordDict({"config": ConfigRecord(dict(config, round=round_))})
        if global_state is not None:
            content["arrays"] = ArrayRecord(global_state)
        msgs.append(Message(content, dst_node_id=node, message_type=message_type, group_id=str(round_)))
    return msgs


def payload_bytes(reply: Message) -> int:
    """Bytes of array payload a reply carried (serialised arrays, as they travel)."""
    if not reply.has_content():
        return 0
    return sum(len(arr.data) for rec in reply.content.array_records.values() for arr in rec.values())


@dataclass
class RoundResult:
    """What came back in one round, after validation."""

    round: int
    sent: int
    accepted: list[tuple[int, SyntheticSet]] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)
    reasons: list[str] = field(default_factory=list)
    bytes_by_node: dict[int, int] = field(default_factory=dict)
    client_seconds: list[float] = field(default_factory=list)
    classes_capped: int = 0
    classes_skipped: int = 0
    privacy: dict[int, dict[str, Any]] = field(default_factory=dict)  # node -> its privacy figures


# Privacy figures copied from a reply's metrics into metrics.jsonl (only finite numbers).
PRIVACY_METRICS = ("epsilon-round", "epsilon-total", "epsilon-planned", "delta", "sigma", "sample-rate",
                   "steps", "clip", "rho", "privacy-budget")


def privacy_figures(reply: Message, syn: SyntheticSet | None) -> dict[str, Any]:
    """What a reply says about its client's privacy: figures, accountant, accepted or declined.

    Empty for a reply without privacy figures (no DP, rho 0). Declines are not validated
    beyond this: only finite numbers are kept.
    """
    metrics = reply.content.get("metrics") if reply.has_content() else None
    if not isinstance(metrics, MetricRecord):
        return {}
    figures: dict[str, Any] = {k: metrics[k] for k in PRIVACY_METRICS
                               if isinstance(metrics.get(k), (int, float)) and np.isfinite(metrics[k])}
    if not figures:
        return {}
    if syn is not None and "accountant" in syn.meta.privacy:
        figures["accountant"] = str(syn.meta.privacy["accountant"])
    figures["status"] = "accepted" if syn is not None else "declined"
    return figures


def exchange(grid: Grid, messages: list[Message], timeout: float, on_reply: OnReply | None = None,
             poll: float = 0.5) -> list[Message]:
    """``grid.send_and_receive`` that also reports each arrival (the CLI's progress display)."""
    pending = set(grid.push_messages(messages))
    total, replies = len(pending), []
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            if on_reply is not None:
                on_reply(len(replies), total)
        if pending and time.monotonic() >= deadline:
            break
        if pending:
            time.sleep(poll)
    return replies


def collect(grid: Grid, messages: list[Message], exp: Expectation, timeout: float,
            on_reply: OnReply | None = None) -> RoundResult:
    """Send, wait up to ``timeout``, and validate every reply; missing replies count as ``timeout``."""
    replies = exchange(grid, messages, timeout, on_reply)
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    result = RoundResult(exp.round, len(messages))
    for reply in replies:
        # A dead node's error reply comes from the SuperLink: map it back to whom we asked.
        node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        result.bytes_by_node[node] = payload_bytes(reply)
        try:
            syn = check_reply(reply, exp)
        except Rejected as err:
            result.rejected[err.kind] += 1
            result.reasons.append(f"node {node}: {err}")
            log.warning("round %d: rejected node %s: %s", exp.round, node, err)
            if err.kind.startswith("declined-") and (figures := privacy_figures(reply, None)):
                result.privacy[node] = figures
            continue
        except Exception as err:  # noqa: BLE001 - a hostile payload must never stop the round
            result.rejected["malformed"] += 1
            result.reasons.append(f"node {node}: malformed: {err!r}")
            log.warning("round %d: rejected node %s: malformed: %r", exp.round, node, err)
            continue
        metrics = reply.content["metrics"]
        result.client_seconds.append(float(metrics.get("seconds", 0.0)))
        result.classes_capped += int(metrics.get("classes-capped", 0))
        result.classes_skipped += int(metrics.get("classes-skipped", 0))
        result.accepted.append((node, syn))
        if figures := privacy_figures(reply, syn):
            result.privacy[node] = figures
    missing = len(messages) - len(replies)
    if missing > 0:
        result.rejected["timeout"] += missing
        log.warning("round %d: %d of %d nodes sent no reply within %.0f s", exp.round, missing,
                    len(messages), timeout)
    return result


def train_global(pool: SyntheticPool, settings: RunSettings, info_seed: int) -> nn.Module:
    """A fresh ConvNet trained on the merged pool with the distill trainer."""
    images, labels = pool.merged()
    net = network_for(pool.items()[0][1].meta.dataset, seed=info_seed, width=settings.task.net_width,
                      depth=settings.task.net_depth)
    config = TrainConfig(arch="convnet", arch_kwargs=settings.task.arch_kwargs, epochs=settings.server_epochs,
                         lr=settings.server_lr, batch_size=settings.server_batch_size, dsa=settings.server_dsa)
    return train_network(net, images, labels, config, seed=info_seed)


def federated_evaluate(grid: Grid, node_ids: list[int], net: nn.Module, settings: RunSettings,
                       round_: int) -> dict[str, float]:
    """Clients' accuracy of the global model on their held-out data, weighted by examples."""
    msgs = make_messages(node_ids, settings.task.to_config(), round_, MessageType.EVALUATE, net.state_dict())
    accs, weights = [], []
    for reply in grid.send_and_receive(msgs, timeout=settings.round_timeout):
        if reply.has_content() and "metrics" in reply.content:
            m = reply.content["metrics"]
            n = float(m.get("num-examples", 0))
            if n > 0 and np.isfinite(float(m.get("accuracy", np.nan))):
                accs.append(float(m["accuracy"]))
                weights.append(n)
    if not weights:
        return {"federated-accuracy": float("nan"), "federated-replies": 0}
    return {"federated-accuracy": float(np.average(accs, weights=weights)), "federated-replies": len(weights)}


def run_fedistill(grid: Grid, settings: RunSettings, store: RunStore, test: LabeledImages,
                  on_round: OnRound | None = None, on_reply: OnReply | None = None) -> dict[str, Any]:
    """The whole fedistill run; returns the summary (also written to ``summary.json``)."""
    start = time.perf_counter()
    task = settings.task
    rng = random.Random(task.seed)
    pool, net = SyntheticPool(), None
    uploaded: Counter = Counter()
    record: dict[str, Any] = {}
    wait_for_nodes(grid, max(settings.min_available_nodes, settings.min_train_nodes), settings.wait_for_nodes)
    for rnd in range(1, settings.rounds + 1):
        nodes = select_nodes(grid.get_node_ids(), settings.fraction_train, settings.min_train_nodes, rng)
        state = net.state_dict() if (net is not None and settings.mode == "iterative") else None
        exp = Expectation(test.info, task.distill_method, task.ipc, rnd, settings.max_abs_pixel, task.dp,
                          task.delta, task.rho)
        result = collect(grid, make_messages(nodes, task.to_config(), rnd, MessageType.TRAIN, state), exp,
                         settings.round_timeout, on_reply)
        uploaded.update(result.bytes_by_node)
        for node, syn in result.accepted:
            pool.update(node, syn)
            store.save_set(syn, rnd, node)
        record = {"round": rnd, "sent": result.sent, "accepted": len(result.accepted),
                  "rejected": sum(result.rejected.values()),
                  **{f"rejected-{k}": v for k, v in sorted(result.rejected.items())},
                  "rejection-reasons": result.reasons, "pool-clients": len(pool),
                  "pool-images": pool.num_images(), "classes-capped": result.classes_capped,
                  "classes-skipped": result.classes_skipped,
                  "client-seconds-max": max(result.client_seconds, default=0.0),
                  "mb-uploaded-per-client": _mb_per_client(uploaded)}
        if result.privacy:
            record["privacy"] = {str(node): figs for node, figs in sorted(result.privacy.items())}
        if len(result.accepted) < settings.min_replies:
            log.error("round %d: %d accepted replies, fewer than min-replies=%d: the round ends without "
                      "training", rnd, len(result.accepted), settings.min_replies)
        if len(result.accepted) >= settings.min_replies and len(pool):
            t0 = time.perf_counter()
            net = train_global(pool, settings, task.seed)
            acc, loss = accuracy_and_loss(net, test)
            record.update({"accuracy": acc, "loss": loss, "train-seconds": time.perf_counter() - t0})
            store.save_model(net.state_dict())
        # Under DP, clients decline: accuracy on their held-out data is a release nobody accounts.
        if net is not None and rnd == settings.rounds and settings.fraction_evaluate > 0 and task.dp == "none":
            eval_nodes = select_nodes(grid.get_node_ids(), settings.fraction_evaluate, 1, rng)
            record.update(federated_evaluate(grid, eval_nodes, net, settings, rnd))
        record["elapsed-seconds"] = time.perf_counter() - start
        store.append_metrics(record)
        if on_round is not None:
            on_round(record)
    return finish_run(store, settings, record, uploaded, start)


def _mb_per_client(uploaded: Counter) -> float:
    return float(np.mean(list(uploaded.values())) / 1e6) if uploaded else 0.0


def finish_run(store: RunStore, settings: RunSettings, last: dict[str, Any], uploaded: Counter,
            start: float) -> dict[str, Any]:
    metrics = store.metrics
    trained = [m for m in metrics if m.get("accuracy") is not None]
    summary = {
        "run": str(store.root), "name": settings.name, "algorithm": settings.task.algorithm,
        "mode": settings.mode, "rounds": len(metrics),
        "accuracy": trained[-1]["accuracy"] if trained else None, "federated-accuracy": last.get("federated-accuracy"),
        "accepted": sum(m.get("accepted", 0) for m in metrics),
        "rejected": sum(m.get("rejected", 0) for m in metrics),
        "clients": len(uploaded), "mb-uploaded-per-client": _mb_per_client(uploaded),
        "mb-uploaded-max-client": max(uploaded.values(), default=0) / 1e6,
        "wall-seconds": time.perf_counter() - start,
        "status": "ok" if trained else "no-model",
        "dp": settings.task.dp, **privacy_summary(metrics),
    }
    store.write_json("summary.json", summary)
    return summary
