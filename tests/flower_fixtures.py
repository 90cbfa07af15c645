"""Test helpers for the Flower app: a task identity and an in-process Grid (no Ray, no SuperLink).

Kept out of conftest.py so other suites are unaffected; test modules import what they use.
``TaskIdentity`` is Flower-internal: it is touched here and nowhere else.
"""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import pytest
from flwr.app import DEFAULT_TTL, Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Tamper = Callable[[int, Message], Message]
# An attacker node: the replies it sends for one message (none, one, several, or replies to
# messages it was never sent), in the order the grid hands them to the server.
Behaviour = Callable[[Message], Iterable[Message]]


@contextmanager
def flower_task_identity() -> Iterator[type[TaskIdentity]]:
    """Let code build instruction Messages outside a Flower runtime (also for module-scoped fixtures)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield TaskIdentity
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def task_identity():
    """Let tests build instruction Messages outside a Flower runtime."""
    with flower_task_identity() as identity:
        yield identity


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
        self.mailbox: dict[str, list[Message]] = {}  # message id -> the replies a pull returns
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _answer(self, msg: Message, node: int) -> list[Message]:
        """The replies ``node`` sends for ``msg``: subclasses make nodes misbehave here."""
        try:
            reply = self.client_app(msg, self.contexts[node])
        except Exception:  # noqa: BLE001 - a crashed client just sends nothing here
            return []
        if reply is not None and self.tamper is not None:
            reply = self.tamper(node, reply)
        return [reply] if reply is not None else []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(msg)
            self.mailbox[msg.metadata.message_id] = [r for r in self._answer(msg, msg.metadata.dst_node_id)
                                                     if r is not None]
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [r for i in list(message_ids) for r in self.mailbox.pop(i, [])]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        return self.pull_messages(self.push_messages(messages))


def unsolicited_reply(msg: Message, content: RecordDict) -> Message:
    """A reply from ``msg``'s node to a message nobody sent (a made-up id), built with Flower's
    public ``Metadata``: what a node would push to answer a stale or foreign instruction."""
    meta = msg.metadata
    forged = Metadata(run_id=meta.run_id, message_id="", src_node_id=meta.dst_node_id, dst_node_id=meta.src_node_id,
                      reply_to_message_id=uuid.uuid4().hex, group_id=meta.group_id, created_at=time.time(),
                      ttl=DEFAULT_TTL, message_type=meta.message_type)
    return Message(content=content, metadata=forged)


class HostileGrid(InProcessGrid):
    """An :class:`InProcessGrid` whose federation also holds attacker nodes with their own behaviour.

    Honest nodes are exactly InProcessGrid's (ids 101..., partition ids 0..n-1, ``num-partitions``
    n), so a run with attackers is comparable bit for bit with one without. ``attackers[node](msg)``
    returns the replies that node sends for ``msg``: none (silence), several (a second reply to the
    same message) or replies to other messages (unsolicited); the grid hands all of them to the
    server with the replies to ``msg``, as a SuperLink that let them through would.
    ``order_by_node`` returns each pull's replies sorted by sender: Flower's FedAvg sums replies in
    the order they arrive, so only then is its average reproducible with or without attackers.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, attackers: dict[int, Behaviour] | None = None, *,
                 order_by_node: bool = False, **kwargs) -> None:
        super().__init__(client_app, num_nodes, **kwargs)
        self.attackers = dict(attackers or {})
        if clash := sorted(set(self.attackers) & set(self.contexts)):
            raise ValueError(f"attacker node ids {clash} are honest nodes' ids")
        self.order_by_node = order_by_node

    def get_node_ids(self) -> Iterable[int]:
        return sorted([*self.contexts, *self.attackers])

    def _answer(self, msg: Message, node: int) -> list[Message]:
        return list(self.attackers[node](msg)) if node in self.attackers else super()._answer(msg, node)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        return sorted(replies, key=lambda r: r.metadata.src_node_id) if self.order_by_node else replies
