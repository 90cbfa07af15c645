"""A malicious ClientApp for backdoor simulations: the honest client's handlers, with poisoned partitions.

:func:`make_malicious_app` registers the honest ``client.app.train`` / ``client.app.evaluate``
functions on a new ClientApp. While a *malicious* node (its ``partition-id`` is in the set) runs
``train``, the partition loader those handlers call is swapped for
:func:`attacks.malicious.poisoning_loader` around the honest one, so its real data is poisoned
before distillation and everything else (class budgets, distillation, privacy, the reply) is the
honest code. Honest nodes run the untouched honest function: their replies are bit-identical.
Used only by simulations; the production ``client/`` carries no attack code.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import client.app as honest
from attacks.malicious import BackdoorSpec, poisoning_loader

# The loader swap is process-wide: one malicious train call at a time. Module-level (never in a
# closure), so Ray pickles the app's train function without it.
_SWAP = threading.Lock()


def _partition_of(node_config: Any) -> int | None:
    try:
        return int(node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        return None


def malicious_train(msg: Message, context: Context, malicious: frozenset[int], spec: BackdoorSpec) -> Message:
    """The honest ``train``, run with a poisoning partition loader when this node is malicious."""
    if _partition_of(context.node_config) not in malicious:
        return honest.train(msg, context)
    with _SWAP:
        original = honest.load_partition
        honest.load_partition = poisoning_loader(original, spec, malicious, _partition_of)
        try:
            return honest.train(msg, context)
        finally:
            honest.load_partition = original


def make_malicious_app(malicious: Iterable[int], spec: BackdoorSpec) -> ClientApp:
    """A ClientApp whose nodes with a ``partition-id`` in ``malicious`` poison their data (``spec``)."""
    bad = frozenset(int(i) for i in malicious)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return malicious_train(msg, context, bad, spec)

    app.evaluate()(honest.evaluate)
    return app
