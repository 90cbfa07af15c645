"""Faults in process (issue 6): a ClientApp that raises, a node that vanishes, a slow node,
too few good replies; each is recorded in metrics.jsonl and summary.json."""

from __future__ import annotations

import json
import time
from typing import Iterable

import pytest
from flwr.app import Error, Message

from client.app import app as client_app
from server.app import run
from server.store import read_metrics
from tests.flower_fixtures import InProcessGrid, stored_model_accuracy, task_identity, with_metadata  # noqa: F401

TINY = {"iterations": 1, "ipc": 2, "dm.batch-real": 8, "net-width": 8, "net-depth": 1, "server-epochs": 1,
        "server-dsa": False, "fraction-evaluate": 0.0, "round-timeout": 1.0}
SUPERLINK = 1  # the SuperLink's node id, as seen in an error reply about a vanished node


class FaultyGrid(InProcessGrid):
    """An in-process Grid whose nodes misbehave as Flower shows it to the server.

    ``faults[node]``: ``raise`` (the ClientApp raises: an error reply, code 2), ``vanish``
    (no reply at all), ``lost`` (the SuperLink's code-5 error reply, from its own node id),
    ``slow`` (the reply is ready ``delay`` seconds later, past the round timeout).
    ``rounds`` limits the faults to those rounds (all when empty).
    """

    def __init__(self, num_nodes: int, faults: dict[int, str], rounds: Iterable[int] = (), delay: float = 30.0):
        super().__init__(client_app, num_nodes)
        self.faults, self.rounds, self.delay = faults, set(rounds), delay
        self.ready_at: dict[str, float] = {}

    def _answer(self, msg: Message, node: int) -> list[Message]:
        fault = self.faults.get(node) if not self.rounds or int(msg.metadata.group_id) in self.rounds else None
        reply = self._reply(msg, node, fault)
        self.ready_at[msg.metadata.message_id] = time.monotonic() + (self.delay if fault == "slow" else 0)
        return [reply] if reply is not None else []

    def _reply(self, msg: Message, node: int, fault: str | None) -> Message | None:
        if fault == "vanish":
            return None
        if fault == "lost":
            reply = Message(Error(code=5, reason="node went offline (missed heartbeats)"), reply_to=msg)
            return with_metadata(reply, src_node_id=SUPERLINK)
        if fault == "raise":
            return Message(Error(code=2, reason="ClientApp raised RuntimeError('disk full')"), reply_to=msg)
        return self.client_app(msg, self.contexts[node])

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        now = time.monotonic()
        return list(super().pull_messages([i for i in message_ids if self.ready_at.get(i, 0) <= now]))


def test_raising_vanishing_lost_and_slow_nodes_are_counted_and_the_round_trains_on_the_rest(
        tmp_path, task_identity):  # noqa: F811
    grid = FaultyGrid(5, {102: "raise", 103: "vanish", 104: "lost", 105: "slow"})
    summary = run(grid, {}, runs_dir=str(tmp_path), **TINY)
    (record,) = read_metrics(summary["run"])
    assert record["accepted-nodes"] == [101] and record["accuracy"] == stored_model_accuracy(summary["run"])
    assert (record["rejected-error-reply"], record["rejected-timeout"]) == (2, 2)
    reasons = " ".join(record["rejection-reasons"])
    assert "node 102: error-reply: code 2" in reasons and "node 104: error-reply: code 5" in reasons
    assert summary["status"] == "ok" and summary["rejected-by-kind"] == {"error-reply": 2, "timeout": 2}
    on_disk = json.loads((tmp_path / next(p.name for p in tmp_path.iterdir()) / "summary.json").read_text())
    assert on_disk["rejected-by-kind"] == summary["rejected-by-kind"]


@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_too_few_good_replies_end_the_round_and_the_run_continues_or_stops(policy, tmp_path, task_identity,
                                                                          caplog):  # noqa: F811
    grid = FaultyGrid(2, {101: "raise", 102: "vanish"}, rounds=[2])
    config = {**TINY, "mode": "iterative", "num-server-rounds": 3, "min-replies": 2, "on-too-few-replies": policy}
    summary = run(grid, {}, runs_dir=str(tmp_path), **config)
    metrics = read_metrics(summary["run"])
    assert "fewer than min-replies=2" in caplog.text
    assert metrics[1]["too-few-replies"] and "accuracy" not in metrics[1]
    assert metrics[1]["rejected-error-reply"] == metrics[1]["rejected-timeout"] == 1
    assert summary["rounds-too-few-replies"] == [2]
    if policy == "continue":
        assert [m["round"] for m in metrics] == [1, 2, 3] and "accuracy" in metrics[2]
        assert summary["status"] == "ok"
    else:
        assert [m["round"] for m in metrics] == [1, 2]
        assert summary["status"] == "stopped" and "round 2" in summary["stop-reason"]


def test_on_too_few_replies_must_be_continue_or_stop():
    from server.settings import RunSettings
    with pytest.raises(ValueError, match="on-too-few-replies"):
        RunSettings.from_run_config({"on-too-few-replies": "retry"})
