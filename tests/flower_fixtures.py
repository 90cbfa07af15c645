"""Test helpers for the Flower app: a task identity and an in-process Grid (no Ray, no SuperLink).

Kept out of conftest.py so other suites are unaffected; test modules import what they use.
``TaskIdentity`` is Flower-internal: it is touched here and nowhere else.
"""

from __future__ import annotations

import uuid
from typing import Callable, Iterable

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Tamper = Callable[[int, Message], Message]


@pytest.fixture
def task_identity():
    """Let tests build instruction Messages outside a Flower runtime."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield TaskIdentity
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def make_context(node_id: int, node_config: dict, run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


class LocalGrid(Grid):
    """What every in-process test Grid shares: no run to set, messages built directly."""

    def set_run(self, run) -> None:  # noqa: D102 - not needed in process
        pass

    @property
    def run(self):  # noqa: D102
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)


class InProcessGrid(LocalGrid):
    """Delivers each message by calling the ClientApp in this process.

    ``tamper(node_id, reply)`` may replace a node's reply (a misbehaving client);
    a ClientApp exception becomes no reply, as a timeout would.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, tamper: Tamper | None = None,
                 extra_node_config: dict | None = None, node_config: Callable[[int], dict] | None = None,
                 run_id: int = 1) -> None:
        self.client_app, self.tamper = client_app, tamper
        self.contexts = {nid: make_context(nid, {"partition-id": i, "num-partitions": num_nodes,
                                                 **(extra_node_config or {}),
                                                 **(node_config(i) if node_config else {})}, run_id)
                         for i, nid in enumerate(range(101, 101 + num_nodes))}
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception:  # noqa: BLE001 - a crashed client just sends nothing here
                reply = None
            if reply is not None and self.tamper is not None:
                reply = self.tamper(node, reply)
            if reply is not None:
                self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        return self.pull_messages(self.push_messages(messages))
