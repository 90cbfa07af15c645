"""Test helpers for the Flower app: a task identity and an in-process Grid (no Ray, no SuperLink).

Kept out of conftest.py so other suites are unaffected; test modules import what they use.
Two Flower internals are touched, here and nowhere else: ``TaskIdentity`` (to build instructions
outside a runtime) and, in :func:`with_metadata`, ``Message``'s ``metadata=`` keyword (to give a
message the id a SuperLink would). Everything else uses Flower's public ``flwr.app`` API.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import pytest
from flwr.app import Context, Message, Metadata, RecordDict
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


def with_metadata(msg: Message, **changes) -> Message:
    """A copy of ``msg`` (same content or error) whose metadata has ``changes`` (``message_id``,
    ``src_node_id``, ``reply_to_message_id``, ...).

    Flower 1.42 has no public way to give a message an id: the documented ``Message`` signatures
    build an instruction or a reply with ``message_id=""`` ("set by the SuperLink"), and
    ``Metadata.message_id`` has no setter (Flower's own ``InMemoryGrid.push_messages`` writes
    ``metadata.__dict__["_message_id"]``). The public ``flwr.app.Metadata`` constructor does take
    ``message_id``; the one non-public step is handing that metadata to ``Message(metadata=...)``,
    the keyword Flower keeps for its own deserialisation (``flwr.app.message.message.make_message``).
    Re-check on a Flower upgrade.
    """
    meta = msg.metadata
    fields = dict(run_id=meta.run_id, message_id=meta.message_id, src_node_id=meta.src_node_id,
                  dst_node_id=meta.dst_node_id, reply_to_message_id=meta.reply_to_message_id,
                  group_id=meta.group_id, created_at=meta.created_at, ttl=meta.ttl,
                  message_type=meta.message_type, src_task_id=meta.src_task_id, dst_task_id=meta.dst_task_id)
    if unknown := sorted(set(changes) - set(fields)):
        raise TypeError(f"no metadata fields {unknown}; Metadata has {sorted(fields)}")
    body = {"error": msg.error} if msg.has_error() else {"content": msg.content}
    return Message(metadata=Metadata(**{**fields, **changes}), **body)


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
        """Each node gets a copy of its message carrying a fresh id, as a SuperLink delivers it;
        ``sent`` keeps the delivered copies."""
        ids = []
        for msg in messages:
            delivered = with_metadata(msg, message_id=uuid.uuid4().hex)
            self.sent.append(delivered)
            msg_id = delivered.metadata.message_id
            self.mailbox[msg_id] = [r for r in self._answer(delivered, delivered.metadata.dst_node_id) if r is not None]
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [r for i in list(message_ids) for r in self.mailbox.pop(i, [])]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        return self.pull_messages(self.push_messages(messages))


def unsolicited_reply(msg: Message, content: RecordDict) -> Message:
    """A reply from ``msg``'s node to a message nobody sent (a made-up id): what a node would push
    to answer a stale or foreign instruction."""
    return with_metadata(Message(content, reply_to=msg), reply_to_message_id=uuid.uuid4().hex)


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


def stored_model_accuracy(run_dir: str, name: str = "global_model.pt") -> float:
    """Test accuracy of a model in a run store, rebuilt from the store's config and scored on the
    split the server scores it on: what a run's recorded ``accuracy`` must equal."""
    from client.task import cached_dataset
    from distill.networks import network_for
    from distill.train import accuracy_and_loss
    from server.defenses import split_holdout
    from server.settings import RunSettings
    from server.store import RunStore

    store = RunStore(run_dir)
    settings = RunSettings.from_run_config(store.read_config())
    _, test = split_holdout(cached_dataset(settings.task.dataset).test, settings.defense_config())
    net = network_for(test.info, width=settings.task.net_width, depth=settings.task.net_depth)
    net.load_state_dict(store.load_model(name))
    return accuracy_and_loss(net, test)[0]
