"""The fedistill round loop, as separate steps: wait, select, send, validate, merge, train, evaluate, store.

Each step is a function that tests call on its own; :func:`run_fedistill` only strings
them together. One bad client never stops a round: its reply is rejected and counted.
A round's metrics line is its last write (its completion marker, see server/resume.py),
and every random draw of a round derives from (run seed, round) alone, so a run resumed
after round k continues exactly as an uninterrupted one would.
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

from client.task import safe_run_key
from distill.data import DatasetInfo, LabeledImages
from distill.networks import network_for
from distill.synthetic import SyntheticSet
from distill.train import TrainConfig, accuracy_and_loss, train_network

from .defenses import defense_summary, screen_round, split_holdout
from .pool import SyntheticPool
from .settings import RunSettings
from .store import RunStore, privacy_summary
from .validate import (FORGED, Declined, Expectation, Rejected, RunPrivacy, check_figures, check_reply,
                       factor_spec_json, recorded_figures)

log = logging.getLogger("fedistill.server")
OnRound = Callable[[dict[str, Any]], None]
OnReply = Callable[[int, int], None]  # (replies so far, messages sent)
Candidate = tuple[int, SyntheticSet, Message, dict[str, Any]]  # node, set, reply, validated privacy figures


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


def round_rng(seed: int, round_: int, purpose: str) -> random.Random:
    """The generator for one round's ``purpose`` (node sampling): no state carried across rounds."""
    return random.Random(f"fedistill:{seed}:{round_}:{purpose}")


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
    privacy: dict[int, dict[str, Any]] = field(default_factory=dict)  # node -> its validated privacy figures
    figures_refused: list[str] = field(default_factory=list)  # declines whose figures were not recorded, and why

    def reject(self, node: int, err: Rejected) -> None:
        """Count, keep and log one refused reply."""
        self.rejected[err.kind] += 1
        self.reasons.append(f"node {node}: {err}")
        log.warning("round %d: rejected node %s: %s", self.round, node, err)

    def decline(self, node: int, err: Declined) -> None:
        """Count a decline; record its figures only if they passed validation, else log why not."""
        self.reject(node, err)
        if err.refused:
            self.figures_refused.append(f"node {node}: {FORGED}: {err.refused}")
            log.warning("round %d: node %s declined with %s, not recorded: %s", self.round, node, FORGED,
                        err.refused)
        elif err.figures:
            self.privacy[node] = {**err.figures, "status": "declined"}


def privacy_figures(reply: Message, syn: SyntheticSet, exp: Expectation) -> dict[str, Any]:
    """What an accepted reply says about its client's privacy, from validated figures only.

    Empty for a reply without privacy figures (no DP, rho 0). Raises :class:`Rejected` for
    figures :func:`server.validate.check_figures` refuses (``check_reply`` already did).
    """
    figures: dict[str, Any] = recorded_figures(check_figures(reply.content["metrics"], exp.privacy), exp.privacy)
    if not figures:
        return {}
    if exp.dp != "none":  # check_meta_privacy made sure it names a known accountant
        figures["accountant"] = str(syn.meta.privacy["accountant"])
    figures["status"] = "accepted"
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
    """Send, wait up to ``timeout``, and validate every reply; missing replies count as ``timeout``.

    Replies are handled in node order (arrival order is not reproducible). A reply to a
    message this round did not send is ``unsolicited``; a node's second reply, and every
    set whose metadata claims a client id another node also claims, is ``duplicate``.
    """
    replies = exchange(grid, messages, timeout, on_reply)
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    result = RoundResult(exp.round, len(messages))
    answered: set[int] = set()
    candidates: list[Candidate] = []
    for node, reply in _in_node_order(replies, sent_to):
        if node is None:
            result.reject(reply.metadata.src_node_id, Rejected(
                "unsolicited", f"reply to message {reply.metadata.reply_to_message_id!r}, not sent this round"))
            continue
        result.bytes_by_node[node] = result.bytes_by_node.get(node, 0) + payload_bytes(reply)
        if node in answered:
            result.reject(node, Rejected("duplicate", "a second reply to this round's message"))
            continue
        answered.add(node)
        if (valid := _validated(reply, node, exp, result)) is not None:
            candidates.append((node, *valid))
    for node, syn, reply, figures in _drop_duplicate_claims(candidates, result):
        _keep(result, node, syn, reply, figures)
    missing = len(set(sent_to.values()) - answered)
    if missing > 0:
        result.rejected["timeout"] += missing
        log.warning("round %d: %d of %d nodes sent no reply within %.0f s", exp.round, missing,
                    len(messages), timeout)
    return result


def _in_node_order(replies: list[Message], sent_to: dict[str, int]) -> list[tuple[int | None, Message]]:
    """(node asked, reply) sorted by node; ``None`` for a reply to a message not sent.

    A dead node's error reply comes from the SuperLink: the message it answers says whom we asked.
    """
    pairs = [(sent_to.get(r.metadata.reply_to_message_id), r) for r in replies]
    return sorted(pairs, key=lambda p: (p[0] is None, p[0] or 0))


def _validated(reply: Message, node: int, exp: Expectation,
               result: RoundResult) -> tuple[SyntheticSet, Message, dict[str, Any]] | None:
    """The reply's set and its validated privacy figures, or ``None`` after counting why it was
    refused (a decline's figures recorded only if valid); never raises."""
    try:
        syn = check_reply(reply, exp)
        return syn, reply, privacy_figures(reply, syn, exp)
    except Declined as err:
        result.decline(node, err)
    except Rejected as err:
        result.reject(node, err)
    except Exception as err:  # noqa: BLE001 - a hostile payload must never stop the round
        result.reject(node, Rejected("malformed", f"{type(err).__name__}: {str(err)[:300]}"))
    return None


def _drop_duplicate_claims(candidates: list[Candidate], result: RoundResult) -> list[Candidate]:
    """Refuse every set whose metadata names a client another node's set also names.

    The server cannot tell which claimant is genuine, so neither is kept.
    """
    claims = Counter(c[1].meta.client for c in candidates if c[1].meta.client)
    kept = []
    for candidate in candidates:
        node, client = candidate[0], candidate[1].meta.client
        if claims[client] > 1:
            result.reject(node, Rejected("duplicate", f"client id {client[:60]!r} is claimed by "
                                                      f"{claims[client]} nodes this round"))
        else:
            kept.append(candidate)
    return kept


def _keep(result: RoundResult, node: int, syn: SyntheticSet, reply: Message, figures: dict[str, Any]) -> None:
    """Record an accepted set, its (validated) metrics and privacy figures."""
    metrics = reply.content["metrics"]
    result.client_seconds.append(float(metrics.get("seconds", 0.0)))
    result.classes_capped += int(metrics.get("classes-capped", 0))
    result.classes_skipped += int(metrics.get("classes-skipped", 0))
    result.accepted.append((node, syn))
    if figures:
        result.privacy[node] = figures


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
    """Clients' accuracy of the global model on their held-out data, weighted by examples.

    A reply without a finite accuracy in [0, 1] and a positive finite example count is
    ignored and counted (``federated-rejected``): garbage never reaches the average.
    """
    msgs = make_messages(node_ids, settings.task.to_config(), round_, MessageType.EVALUATE, net.state_dict())
    accs, weights, refused = [], [], 0
    for reply in grid.send_and_receive(msgs, timeout=settings.round_timeout):
        if (pair := _evaluation(reply)) is None:
            refused += 1
            continue
        accs.append(pair[0])
        weights.append(pair[1])
    out = {"federated-accuracy": float(np.average(accs, weights=weights)) if weights else float("nan"),
           "federated-replies": len(weights)}
    return {**out, "federated-rejected": refused} if refused else out


def _evaluation(reply: Message) -> tuple[float, float] | None:
    """(accuracy, examples) of a plausible evaluate reply, else ``None``; never raises."""
    if reply.has_error() or not isinstance(reply.content.get("metrics"), MetricRecord):
        return None
    metrics = reply.content["metrics"]
    acc, n = metrics.get("accuracy"), metrics.get("num-examples")
    if metrics.get("declined") == 1:
        return None
    ok = all(isinstance(v, (int, float)) and np.isfinite(v) for v in (acc, n))
    return (float(acc), float(n)) if ok and 0.0 <= acc <= 1.0 and 0 < n < 2**53 else None


@dataclass
class RunState:
    """What a run carries from round to round; on resume it is rebuilt from the run store."""

    pool: SyntheticPool = field(default_factory=SyntheticPool)
    net: nn.Module | None = None
    uploaded: Counter = field(default_factory=Counter)
    last_round: int = 0
    resumed_after: int | None = None  # the last complete round, when this process resumed the run


def run_privacy(settings: RunSettings) -> RunPrivacy:
    """The run's privacy settings, against which every recorded figure is checked."""
    return RunPrivacy(settings.task.dp, settings.task.delta, settings.task.rho)


def expectation(settings: RunSettings, info: DatasetInfo, round_: int) -> Expectation:
    """What an acceptable upload of ``round_`` looks like in this run."""
    task = settings.task
    return Expectation(info, task.distill_method, task.ipc, round_, settings.max_abs_pixel, task.dp, task.delta,
                       task.rho, min_class_samples=task.min_class_samples,
                       samples_per_image=task.samples_per_image,
                       factor_spec=factor_spec_json(task.param, task.param_options, info))


def check_same_nodes(state: RunState, settings: RunSettings, ids: Iterable[int]) -> None:
    """Refuse to continue a resumed run whose pooled nodes are not in this federation.

    The pool, node sampling and bytes per client are keyed by node id. Flower's simulation
    draws new node ids at every start, so continuing would pool each client twice (old id and
    new) and sample other nodes: the resumed run would silently differ from an uninterrupted one.
    """
    if state.resumed_after is None or state.last_round >= settings.rounds:
        return
    stale = sorted({n for n, _ in state.pool.items()} - set(ids))
    if stale:
        raise RuntimeError(f"cannot resume after round {state.resumed_after}: nodes {stale[:5]} of the pool are "
                           "not in this federation (a simulation draws new node ids at every start); "
                           "resume needs the same nodes, or start the run afresh")


def run_fedistill(grid: Grid, settings: RunSettings, store: RunStore, test: LabeledImages,
                  on_round: OnRound | None = None, on_reply: OnReply | None = None,
                  state: RunState | None = None) -> dict[str, Any]:
    """The whole fedistill run (or its rest, from a resumed ``state``); returns the summary."""
    state = state or RunState()
    record: dict[str, Any] = store.metrics[-1] if store.metrics else {}
    start = time.perf_counter() - float(record.get("elapsed-seconds", 0.0))
    stop_reason = None
    ids = wait_for_nodes(grid, max(settings.min_available_nodes, settings.min_train_nodes), settings.wait_for_nodes)
    check_same_nodes(state, settings, ids)
    for rnd in range(state.last_round + 1, settings.rounds + 1):
        record = play_round(grid, settings, store, test, state, rnd, on_reply)
        record["elapsed-seconds"] = time.perf_counter() - start
        store.append_metrics(record)  # the round's last write: from here on it is complete
        state.last_round = rnd
        if on_round is not None:
            on_round(record)
        if record.get("too-few-replies") and settings.on_too_few_replies == "stop":
            stop_reason = (f"round {rnd}: {record['accepted']} accepted replies, fewer than "
                           f"min-replies={settings.min_replies} (on-too-few-replies=stop)")
            log.error("fedistill: run stopped: %s", stop_reason)
            break
    return finish_run(store, settings, record, state.uploaded, start, stop_reason, state.resumed_after)


def play_round(grid: Grid, settings: RunSettings, store: RunStore, test: LabeledImages, state: RunState,
               rnd: int, on_reply: OnReply | None = None) -> dict[str, Any]:
    """One round: select, send, validate, store accepted sets, train and checkpoint; its metrics record."""
    task = settings.task
    nodes = select_nodes(grid.get_node_ids(), settings.fraction_train, settings.min_train_nodes,
                         round_rng(task.seed, rnd, "train"))
    global_state = state.net.state_dict() if (state.net is not None and settings.mode == "iterative") else None
    config = {**task.to_config(), "run-key": safe_run_key(store.root.name)}  # stable across a resume: per-run budgets
    result = collect(grid, make_messages(nodes, config, rnd, MessageType.TRAIN, global_state),
                     expectation(settings, test.info, rnd), settings.round_timeout, on_reply)
    state.uploaded.update(result.bytes_by_node)
    holdout, test = split_holdout(test, settings.defense_config())  # the holdout never scores the global model
    defense = screen_round(result, state.pool, settings, holdout)  # drops sets before they reach the pool
    for node, syn in result.accepted:
        state.pool.update(node, syn)
        store.save_set(syn, rnd, node)
    record = round_record(result, state)
    if defense is not None:
        record["defense"] = defense
    if state.resumed_after is not None and rnd == state.resumed_after + 1:
        record["resumed-after-round"] = state.resumed_after
    if len(result.accepted) < settings.min_replies:
        record["too-few-replies"] = True
        log.error("round %d: %d accepted replies, fewer than min-replies=%d: the round ends without training "
                  "(rejected: %s)", rnd, len(result.accepted), settings.min_replies, dict(result.rejected) or "none")
    elif len(state.pool):
        t0 = time.perf_counter()
        state.net = train_global(state.pool, settings, task.seed)
        acc, loss = accuracy_and_loss(state.net, test)
        record.update({"accuracy": acc, "loss": loss, "eval-examples": len(test),
                       "train-seconds": time.perf_counter() - t0})
        store.save_model(state.net.state_dict(), rnd)
    # Under DP, clients decline: accuracy on their held-out data is a release nobody accounts.
    if state.net is not None and rnd == settings.rounds and settings.fraction_evaluate > 0 and task.dp == "none":
        eval_nodes = select_nodes(grid.get_node_ids(), settings.fraction_evaluate, 1,
                                  round_rng(task.seed, rnd, "evaluate"))
        record.update(federated_evaluate(grid, eval_nodes, state.net, settings, rnd))
    return record


def round_record(result: RoundResult, state: RunState) -> dict[str, Any]:
    """The round's metrics.jsonl line (before training): counts by kind, reasons, what was accepted."""
    record = {"round": result.round, "sent": result.sent, "accepted": len(result.accepted),
              "accepted-nodes": [node for node, _ in result.accepted],
              "rejected": sum(result.rejected.values()),
              **{f"rejected-{k}": v for k, v in sorted(result.rejected.items())},
              "rejection-reasons": result.reasons, "pool-clients": len(state.pool),
              "pool-images": state.pool.num_images(), "classes-capped": result.classes_capped,
              "classes-skipped": result.classes_skipped,
              "client-seconds-max": max(result.client_seconds, default=0.0),
              "uploaded-bytes": {str(n): b for n, b in sorted(result.bytes_by_node.items())},
              "mb-uploaded-per-client": _mb_per_client(state.uploaded)}
    if result.privacy:
        record["privacy"] = {str(node): figs for node, figs in sorted(result.privacy.items())}
    if result.figures_refused:
        record["privacy-figures-refused"] = result.figures_refused
    return record


def _mb_per_client(uploaded: Counter) -> float:
    return float(np.mean(list(uploaded.values())) / 1e6) if uploaded else 0.0


def finish_run(store: RunStore, settings: RunSettings, last: dict[str, Any], uploaded: Counter,
               start: float, stop_reason: str | None = None, resumed_after: int | None = None) -> dict[str, Any]:
    """Write ``summary.json``: results, and every fault of the run (rejections by kind, short rounds, resumes)."""
    metrics = store.metrics
    trained = [m for m in metrics if m.get("accuracy") is not None]
    rejected_by_kind: Counter = Counter()
    for m in metrics:
        rejected_by_kind.update({k[len("rejected-"):]: v for k, v in m.items()
                                 if k.startswith("rejected-") and isinstance(v, int)})
    resumes = {m["resumed-after-round"] for m in metrics if "resumed-after-round" in m}
    summary = {
        "run": str(store.root), "name": settings.name, "algorithm": settings.task.algorithm,
        "mode": settings.mode, "rounds": len(metrics),
        "accuracy": trained[-1]["accuracy"] if trained else None, "federated-accuracy": last.get("federated-accuracy"),
        "accepted": sum(m.get("accepted", 0) for m in metrics),
        "rejected": sum(m.get("rejected", 0) for m in metrics),
        "rejected-by-kind": dict(sorted(rejected_by_kind.items())),
        "rounds-too-few-replies": [m["round"] for m in metrics if m.get("too-few-replies")],
        "resumed-after-rounds": sorted(resumes | ({resumed_after} if resumed_after is not None else set())),
        "clients": len(uploaded), "mb-uploaded-per-client": _mb_per_client(uploaded),
        "mb-uploaded-max-client": max(uploaded.values(), default=0) / 1e6,
        "wall-seconds": time.perf_counter() - start,
        "status": "stopped" if stop_reason else ("ok" if trained else "no-model"),
        "dp": settings.task.dp, **privacy_summary(metrics, run_privacy(settings)), **defense_summary(metrics),
    }
    if stop_reason:
        summary["stop-reason"] = stop_reason
    store.write_json("summary.json", summary)
    return summary
