"""The FedAvg baseline: Flower's own FedAvg strategy, same ConvNet and partitions as fedistill.

Only two things are added around the strategy: bytes received per node (so accuracy per
uploaded byte compares side by side) and the same run store as a fedistill run.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from distill.data import LabeledImages
from distill.networks import network_for
from distill.train import accuracy_and_loss

from .rounds import OnRound, finish_run, payload_bytes, wait_for_nodes
from .settings import RunSettings
from .store import RunStore


class CountingFedAvg(FedAvg):
    """Flower's FedAvg that also counts the array bytes each node uploads."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.uploaded: Counter = Counter()

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        for reply in replies:
            self.uploaded[reply.metadata.src_node_id] += payload_bytes(reply)
        return super().aggregate_train(server_round, replies)


def run_fedavg(grid: Grid, settings: RunSettings, store: RunStore, test: LabeledImages,
               on_round: OnRound | None = None) -> dict[str, Any]:
    """FedAvg for ``num-server-rounds`` rounds with server-side evaluation after each."""
    start = time.perf_counter()
    task = settings.task
    net = network_for(test.info, seed=task.seed, width=task.net_width, depth=task.net_depth)
    min_nodes = max(settings.min_available_nodes, settings.min_train_nodes)
    wait_for_nodes(grid, min_nodes, settings.wait_for_nodes)  # FedAvg itself would wait forever
    strategy = CountingFedAvg(fraction_train=settings.fraction_train, fraction_evaluate=settings.fraction_evaluate,
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
                  "elapsed-seconds": time.perf_counter() - start}
        store.save_model(net.state_dict())
        store.append_metrics(record)
        if on_round is not None:
            on_round(record)
        return MetricRecord({"accuracy": acc, "loss": loss})

    # Flower's sample_nodes draws from the global ``random``: seed it for reproducible sampling.
    random.seed(task.seed)
    strategy.start(grid, ArrayRecord(net.state_dict()), num_rounds=settings.rounds, timeout=settings.round_timeout,
                   train_config=ConfigRecord(task.to_config()), evaluate_config=ConfigRecord(task.to_config()),
                   evaluate_fn=evaluate_fn)
    return finish_run(store, settings, record, strategy.uploaded, start)
