"""A malicious ClientApp for backdoor simulations: the honest client, given poisoned behaviour.

:func:`make_malicious_app` builds the honest ClientApp (:func:`client.app.make_client_app`) with
its behaviour injected, never patched: with ``attack="naive"`` its partition loader is
:func:`attacks.malicious.poisoning_loader` around the honest one, so a malicious node's real data
is poisoned before distillation and everything else (class budgets, distillation, privacy, the
reply) is the honest code. With ``attack="doorping"`` a malicious node distils with
:func:`attacks.malicious.doorping_partition` instead (trigger optimised during distillation, saved
as ``.npy`` for the simulation script to measure ASR with). Honest nodes run the untouched honest
functions: their replies are bit-identical. Used only by simulations; the production ``client/``
carries no attack code.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Iterable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import client.app as honest
from attacks.malicious import ATTACKS, BackdoorSpec, doorping_partition, poisoning_loader, save_trigger
from client.task import load_partition


def _partition_of(node_config: Any) -> int | None:
    try:
        return int(node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        return None


def trigger_path(trigger_dir: str, partition_id: int) -> Path:
    """Where a DOORPING client leaves its latest learned trigger (``.npy``)."""
    return Path(trigger_dir) / f"trigger-partition{partition_id}.npy"


def _doorping(spec: BackdoorSpec, pid: int, trigger_dir: str | None) -> Callable[..., Any]:
    def on_trigger(trigger: Any) -> None:
        if trigger_dir is not None:
            Path(trigger_dir).mkdir(parents=True, exist_ok=True)
            save_trigger(trigger, str(trigger_path(trigger_dir, pid)))

    return functools.partial(doorping_partition, spec=spec, partition_id=pid, on_trigger=on_trigger)


def doorping_train(msg: Message, context: Context, malicious: frozenset[int], spec: BackdoorSpec,
                   trigger_dir: str | None = None) -> Message:
    """The honest ``train``; a malicious node distils with DOORPING (its partition id picks the trigger file)."""
    pid = _partition_of(context.node_config)
    if pid not in malicious:
        return honest.train(msg, context)
    return honest.train(msg, context, distill=_doorping(spec, pid, trigger_dir))


def make_malicious_app(malicious: Iterable[int], spec: BackdoorSpec, attack: str = "naive",
                       trigger_dir: str | None = None) -> ClientApp:
    """A ClientApp whose nodes with a ``partition-id`` in ``malicious`` poison their data (``spec``).

    ``attack``: ``naive`` (stamped, relabelled data, then the honest distillation) or ``doorping``
    (the trigger is learned during distillation and saved under ``trigger_dir``).
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
    bad = frozenset(int(i) for i in malicious)
    if attack == "naive":
        return honest.make_client_app(load=poisoning_loader(load_partition, spec, bad, _partition_of))
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return doorping_train(msg, context, bad, spec, trigger_dir)

    app.evaluate()(honest.evaluate)
    return app
