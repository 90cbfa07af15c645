"""The FedAvg baseline: Flower's own FedAvg strategy, same ConvNet and partitions as fedistill.

Three things are added around the strategy: every reply is checked before it is averaged
(:class:`CheckedFedAvg`), bytes received per node are counted (so accuracy per uploaded byte
compares side by side), and the run store is the same as a fedistill run's.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from typing import Any, Callable, Iterable

import torch

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

from distill.data import LabeledImages
from distill.networks import network_for
from distill.train import accuracy_and_loss

from .rounds import OnRound, finish_run, payload_bytes, wait_for_nodes
from .settings import RunSettings
from .store import RunStore
from .updates import check_evaluation, check_update
from .validate import Rejected

log = logging.getLogger("fedistill.server")


class CheckedFedAvg(FedAvg):
    """Flower's FedAvg, with every reply checked before it is averaged, and upload bytes counted.

    A train reply must pass :func:`server.updates.check_update` against the current global model
    (keys, shapes, dtypes, finiteness, num-examples in [1, max-examples], no other records);
    evaluate replies pass :func:`server.updates.check_evaluation`. Refused replies are left out
    and counted per round (``rejected-<kind>``, with reasons), as a fedistill round counts them.
    """

    def __init__(self, reference: Callable[[], dict[str, torch.Tensor]], max_examples: int,
                 max_abs_weight: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reference, self.max_examples, self.max_abs_weight = reference, max_examples, max_abs_weight
        self.uploaded: Counter = Counter()
        self.rejected: dict[int, Counter] = {}
        self.reasons: dict[int, list[str]] = {}

    def _refuse(self, server_round: int, node: int, err: Rejected) -> None:
        self.rejected.setdefault(server_round, Counter())[err.kind] += 1
        self.reasons.setdefault(server_round, []).append(f"node {node}: {err}")
        log.warning("round %d: FedAvg reply of node %s refused: %s", server_round, node, err)

    def _checked(self, server_round: int, replies: Iterable[Message],
                 check: Callable[[Message], object]) -> list[Message]:
        """The replies ``check`` passes and does not leave out (``None``: a decline)."""
        kept = []
        for reply in replies:
            try:
                if check(reply) is not None:
                    kept.append(reply)
            except Rejected as err:
                self._refuse(server_round, reply.metadata.src_node_id, err)
            except Exception as err:  # noqa: BLE001 - a hostile reply must never stop the run
                self._refuse(server_round, reply.metadata.src_node_id, Rejected("malformed", type(err).__name__))
        return kept

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        for reply in replies:
            self.uploaded[reply.metadata.src_node_id] += payload_bytes(reply)
        reference = self.reference()
        kept = self._checked(server_round, replies,
                             lambda r: check_update(r, reference, self.max_examples, self.max_abs_weight))
        return self._aggregate(super().aggregate_train, server_round, kept)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        kept = self._checked(server_round, replies, lambda r: check_evaluation(r, self.max_examples))
        return self._aggregate(super().aggregate_evaluate, server_round, kept)

    @staticmethod
    def _aggregate(aggregate: Callable, server_round: int, kept: list[Message]):
        """Flower's aggregation of checked replies; a refusal of Flower's own (it checks the replies'
        consistency once more) skips the round's aggregation instead of ending the run."""
        try:
            return aggregate(server_round, kept)
        except InconsistentMessageReplies as err:
            log.error("round %d: Flower refused to aggregate %d checked replies: %s", server_round, len(kept), err)
            return None, None

    def round_faults(self, server_round: int) -> dict[str, Any]:
        """The round's refusals, for its metrics line (empty when there were none)."""
        counts = self.rejected.get(server_round, Counter())
        if not counts:
            return {}
        return {"rejected": sum(counts.values()), **{f"rejected-{k}": v for k, v in sorted(counts.items())},
                "rejection-reasons": self.reasons.get(server_round, [])}


def run_fedavg(grid: Grid, settings: RunSettings, store: RunStore, test: LabeledImages,
               on_round: OnRound | None = None) -> dict[str, Any]:
    """FedAvg for ``num-server-rounds`` rounds with server-side evaluation after each."""
    start = time.perf_counter()
    task = settings.task
    net = network_for(test.info, seed=task.seed, width=task.net_width, depth=task.net_depth)
    min_nodes = max(settings.min_available_nodes, settings.min_train_nodes)
    wait_for_nodes(grid, min_nodes, settings.wait_for_nodes)  # FedAvg itself would wait forever
    strategy = CheckedFedAvg(lambda: net.state_dict(), settings.max_examples, settings.max_abs_weight,
                             fraction_train=settings.fraction_train, fraction_evaluate=settings.fraction_evaluate,
                              min_train_nodes=settings.min_train_nodes, min_available_nodes=min_nodes,
                              min_evaluate_nodes=1 if settings.fraction_evaluate > 0 else 0)
    record: dict[str, Any] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        nonlocal record
        net.load_state_dict(arrays.to_torch_state_dict())
        acc, loss = accuracy_and_loss(net, test)
        if server_round == 0:
            return MetricRecord({"accuracy": acc, "loss": loss})
        mb = [b / 1e6 for b in strategy.uploaded.values()]
        record = {"round": server_round, "accuracy": acc, "loss": loss,
                  "mb-uploaded-per-client": sum(mb) / max(len(mb), 1),
                  "elapsed-seconds": time.perf_counter() - start, **strategy.round_faults(server_round)}
        store.save_model(net.state_dict())
        store.append_metrics(record)
        log.info("fedistill: FedAvg round %d/%d: accuracy %.4f, %.3f MB uploaded per client, %d replies refused",
                 server_round, settings.rounds, acc, record["mb-uploaded-per-client"], record.get("rejected", 0))
        if on_round is not None:
            on_round(record)
        return MetricRecord({"accuracy": acc, "loss": loss})

    # Flower's sample_nodes draws from the global ``random``: seed it for reproducible sampling.
    random.seed(task.seed)
    strategy.start(grid, ArrayRecord(net.state_dict()), num_rounds=settings.rounds, timeout=settings.round_timeout,
                   train_config=ConfigRecord(task.to_config()), evaluate_config=ConfigRecord(task.to_config()),
                   evaluate_fn=evaluate_fn)
    return finish_run(store, settings, record, strategy.uploaded, start)
