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
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from google.protobuf.message import DecodeError
from torch import nn

from distill.data import DatasetInfo, LabeledImages
from distill.networks import network_for
from distill.synthetic import SyntheticSet
from distill.task import safe_run_key
from distill.train import TrainConfig, accuracy_and_loss, train_network
from distill.upload import expectation as expectation_of

from .defenses import defense_summary, screen_round, split_holdout
from .pool import SyntheticPool
from .settings import RunSettings
from .store import RunStore, privacy_summary
from .updates import check_evaluation, federated_mean
from .validate import FORGED, Declined, Expectation, Rejected, RunPrivacy, check_figures, check_reply, recorded_figures

log = logging.getLogger("fedistill.server")
OnRound = Callable[[dict[str, Any]], None]
OnReply = Callable[[int, int], None]  # (replies so far, messages sent)
# What Flower's inflation of a reply body raises on bytes it cannot read (seen: a metric item with
# no value, an ArrayChunk where a record belongs). Anything else (a SuperLink or transport fault)
# is not the node's doing: it propagates, and the run resumes from its store.
UNREADABLE = (AttributeError, ValueError, TypeError, KeyError, IndexError, DecodeError)
KEPT_METRICS = ("seconds", "classes-capped", "classes-skipped")  # all a round keeps of an accepted reply's metrics


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
    _reason_nodes: list[int] = field(default_factory=list, repr=False)

    def reject(self, node: int, err: Rejected) -> None:
        """Count, keep and log one refused reply."""
        self.rejected[err.kind] += 1
        self.reasons.append(f"node {node}: {err}")
        self._reason_nodes.append(node)
        log.warning("round %d: rejected node %s: %s", self.round, node, err)

    def in_node_order(self) -> None:
        """Sets and reasons sorted by node (stable: a node's own replies keep their order)."""
        self.accepted.sort(key=lambda pair: pair[0])
        order = sorted(range(len(self.reasons)), key=lambda i: self._reason_nodes[i])
        self.reasons, self._reason_nodes = [self.reasons[i] for i in order], [self._reason_nodes[i] for i in order]

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


def exchange(grid: Grid, messages: list[Message], timeout: float,
             arrive: Callable[[Message, int | None], None],
             unreadable: Callable[[int, Exception], None], poll: float = 0.5) -> set[int]:
    """Push ``messages`` and hand each reply to ``arrive`` as it is pulled, with the node it was
    sent to (``None``: not a reply to one of ``messages``), until all are answered or ``timeout``
    passes; returns the nodes asked. This is the one place replies enter the server: ``arrive``
    validates a reply and keeps only what survives, so a round never holds more than one raw reply.

    Replies are pulled one message at a time: Flower inflates a reply inside ``pull_messages``
    after confirming it received, so a body it cannot inflate raises there and would take the
    other replies of the same call with it. Such a node is handed to ``unreadable`` and not asked
    again; every other node's reply still arrives.

    A dead node's error reply comes from the SuperLink: the message it answers says whom we asked.
    """
    ids = list(grid.push_messages(messages))
    sent_to = {msg_id: msg.metadata.dst_node_id for msg_id, msg in zip(ids, messages)}
    pending = list(ids)
    deadline = time.monotonic() + timeout
    while pending:
        for msg_id in list(pending):
            try:
                replies = list(grid.pull_messages([msg_id]))
            except UNREADABLE as err:  # a hostile body breaks Flower's own decoding (transport errors propagate)
                pending.remove(msg_id)
                unreadable(sent_to[msg_id], err)
                continue
            for reply in replies:
                if reply.metadata.reply_to_message_id in pending:
                    pending.remove(reply.metadata.reply_to_message_id)
                arrive(reply, sent_to.get(reply.metadata.reply_to_message_id))
        if pending and time.monotonic() >= deadline:
            break
        if pending:
            time.sleep(poll)
    return set(sent_to.values())


def collect(grid: Grid, messages: list[Message], exp: Expectation, timeout: float,
            on_reply: OnReply | None = None) -> RoundResult:
    """Send, wait up to ``timeout``, and validate every reply as it arrives; missing replies count as
    ``timeout``.

    A reply to a message this round did not send is ``unsolicited``; a node's second reply is
    ``duplicate``. A set is keyed by the node the SuperLink says sent it (the message we asked);
    its ``client`` claim is only logged. The result lists sets and reasons in node order, since
    arrival order is not reproducible.
    """
    result = RoundResult(exp.round, len(messages))
    answered: set[int] = set()
    claims: dict[str, int] = {}

    def arrive(reply: Message, node: int | None) -> None:
        if node is None:
            result.reject(reply.metadata.src_node_id, Rejected(
                "unsolicited", f"reply to message {str(reply.metadata.reply_to_message_id)[:80]!r}, not sent "
                               "this round"))
        elif node in answered:
            result.reject(node, Rejected("duplicate", "a second reply to this round's message"))
        else:
            answered.add(node)
            result.bytes_by_node[node] = payload_bytes(reply)
            if (valid := _validated(reply, node, exp, result)) is not None:
                _note_claim(claims, node, valid[0], exp.round)
                _keep(result, node, *valid)
        if on_reply is not None:
            on_reply(len(answered), len(messages))

    def unreadable(node: int, err: Exception) -> None:
        answered.add(node)
        result.reject(node, Rejected("malformed", f"Flower could not read the reply ({type(err).__name__}: "
                                                  f"{str(err)[:200]})"))

    asked = exchange(grid, messages, timeout, arrive, unreadable)
    result.in_node_order()
    missing = len(asked - answered)
    if missing > 0:
        result.rejected["timeout"] += missing
        log.warning("round %d: %d of %d nodes sent no reply within %.0f s", exp.round, missing,
                    len(messages), timeout)
    return result


def _validated(reply: Message, node: int, exp: Expectation,
               result: RoundResult) -> tuple[SyntheticSet, dict[str, Any], dict[str, Any]] | None:
    """The reply's set, the metrics the round keeps, and its validated privacy figures; or ``None``
    after counting why it was refused (a decline's figures recorded only if valid). Never raises."""
    try:
        syn = check_reply(reply, exp)
        metrics = reply.content["metrics"]
        kept = {k: metrics[k] for k in KEPT_METRICS if k in metrics}
        return syn, kept, privacy_figures(reply, syn, exp)
    except Declined as err:
        result.decline(node, err)
    except Rejected as err:
        result.reject(node, err)
    except Exception as err:  # noqa: BLE001 - a hostile payload must never stop the round
        result.reject(node, Rejected("malformed", f"{type(err).__name__}: {str(err)[:300]}"))
    return None


def _note_claim(claims: dict[str, int], node: int, syn: SyntheticSet, round_: int) -> None:
    """Log a ``client`` claim another node already made: a claim is a label, never an identity,
    so nobody is refused for it (one node could otherwise have another's set thrown out)."""
    client = syn.meta.client
    if client and claims.setdefault(client, node) != node:
        log.warning("round %d: node %s claims client id %r, as node %s did; both kept (sets are keyed by node)",
                    round_, node, client[:60], claims[client])


def _keep(result: RoundResult, node: int, syn: SyntheticSet, metrics: dict[str, Any], figures: dict[str, Any]) -> None:
    """Record an accepted set, its (validated) metrics and privacy figures."""
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
                       round_: int) -> dict[str, Any]:
    """Clients' accuracy of the global model on their held-out data.

    Averaged as ``evaluate-weighting`` says: by examples (each node's count at most the server's
    ``max-examples``) or unweighted. A reply that is not a plausible report (an accuracy outside
    [0, 1], a count outside [1, max-examples], other records or metrics, a second reply) is left out
    and counted (``federated-rejected``): one node can move the mean by its bounded weight, never more.
    """
    msgs = make_messages(node_ids, settings.task.to_config(), round_, MessageType.EVALUATE, net.state_dict())
    results: dict[int, tuple[float, int]] = {}
    answered: set[int] = set()
    refused = 0

    def arrive(reply: Message, node: int | None) -> None:
        nonlocal refused
        try:
            if node is None or node in answered:
                raise Rejected("unsolicited", "not a first reply to this round's evaluate message")
            answered.add(node)
            if (result := check_evaluation(reply, settings.max_examples)) is not None:
                results[node] = result
        except Rejected as err:
            refused += 1
            log.warning("round %d: evaluate reply of node %s left out: %s", round_, node, err)
        except Exception as err:  # noqa: BLE001 - a hostile reply must never stop the run
            refused += 1
            log.warning("round %d: evaluate reply of node %s left out: %s", round_, node, type(err).__name__)

    def unreadable(node: int, err: Exception) -> None:
        nonlocal refused
        refused += 1
        log.warning("round %d: evaluate reply of node %s unreadable: %s", round_, node, type(err).__name__)

    exchange(grid, msgs, settings.round_timeout, arrive, unreadable)
    out = {"federated-accuracy": federated_mean([results[n] for n in sorted(results)], settings.evaluate_weighting),
           "federated-replies": len(results), "federated-weighting": settings.evaluate_weighting,
           "federated-max-examples": settings.max_examples}
    return {**out, "federated-rejected": refused} if refused else out


@dataclass
class RunState:
    """What a run carries from round to round; on resume it is rebuilt from the run store."""

    pool: SyntheticPool = field(default_factory=SyntheticPool)
    net: nn.Module | None = None
    uploaded: Counter = field(default_factory=Counter)
    last_round: int = 0
    resumed_after: int | None = None  # the last complete round, when this process resumed the run
    quarantined: list[str] = field(default_factory=list)  # stored sets resume set aside, with why


def run_privacy(settings: RunSettings) -> RunPrivacy:
    """The run's privacy settings, against which every recorded figure is checked."""
    return RunPrivacy(settings.task.dp, settings.task.delta, settings.task.rho)


def expectation(settings: RunSettings, info: DatasetInfo, round_: int) -> Expectation:
    """What an acceptable upload of ``round_`` looks like in this run (:func:`distill.upload.expectation`)."""
    return expectation_of(settings.task, info, round_, settings.max_abs_pixel)


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
        log.info("fedistill: round %d/%d: %d of %d replies accepted (rejected: %s), pool %d sets, accuracy %s, "
                 "%.0f s",
                 rnd, settings.rounds, record["accepted"], record["sent"],
                 {k[len("rejected-"):]: v for k, v in record.items() if k.startswith("rejected-")} or "none",
                 record["pool-clients"], f"{record['accuracy']:.4f}" if "accuracy" in record else "not trained",
                 record["elapsed-seconds"])
        if on_round is not None:
            on_round(record)
        if record.get("too-few-replies") and settings.on_too_few_replies == "stop":
            stop_reason = (f"round {rnd}: {record['accepted']} accepted replies, fewer than "
                           f"min-replies={settings.min_replies} (on-too-few-replies=stop)")
            log.error("fedistill: run stopped: %s", stop_reason)
            break
    unrecorded = state.quarantined if state.last_round <= (state.resumed_after or 0) else []  # no round played
    return finish_run(store, settings, record, state.uploaded, start, stop_reason, state.resumed_after, unrecorded)


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
        if state.quarantined:
            record["resume-quarantined"] = state.quarantined
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
               start: float, stop_reason: str | None = None, resumed_after: int | None = None,
               quarantined: list[str] | None = None) -> dict[str, Any]:
    """Write ``summary.json``: results, and every fault of the run (rejections by kind, short rounds, resumes,
    stored sets quarantined on resume: those of played rounds' lines plus ``quarantined``)."""
    metrics = store.metrics
    quarantined = quarantined or []
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
        "resume-quarantined": [q for m in metrics for q in m.get("resume-quarantined", [])] + quarantined,
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
