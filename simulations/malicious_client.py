"""A malicious ClientApp for backdoor simulations: the honest client's handlers, with poisoned partitions.

:func:`make_malicious_app` registers the honest ``client.app.train`` / ``client.app.evaluate``
functions on a new ClientApp. While a *malicious* node (its ``partition-id`` is in the set) runs
``train``, the partition loader those handlers call is swapped for
:func:`attacks.malicious.poisoning_loader` around the honest one, so its real data is poisoned
before distillation and everything else (class budgets, distillation, privacy, the reply) is the
honest code. With ``attack="doorping"`` the honest ``distill_partition`` is swapped instead for
:func:`attacks.malicious.doorping_partition` (trigger optimised during distillation, saved as
``.npy`` for the simulation script to measure ASR with). Honest nodes run the untouched honest
function: their replies are bit-identical.
Used only by simulations; the production ``client/`` carries no attack code.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import client.app as honest
from attacks.malicious import ATTACKS, BackdoorSpec, doorping_partition, poisoning_loader, save_trigger

# The loader swap is process-wide: one malicious train call at a time. Module-level (never in a
# closure), so Ray pickles the app's train function without it.
_SWAP = threading.Lock()


def _partition_of(node_config: Any) -> int | None:
    try:
        return int(node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        return None


def malicious_train(msg: Message, context: Context, malicious: frozenset[int], spec: BackdoorSpec,
                    attack: str = "naive", trigger_dir: str | None = None) -> Message:
    """The honest ``train``, run with a poisoning partition loader (naive) or DOORPING in place of
    ``distill_partition`` when this node is malicious."""
    pid = _partition_of(context.node_config)
    if pid not in malicious:
        return honest.train(msg, context)
    with _SWAP:
        name = "load_partition" if attack == "naive" else "distill_partition"
        original = getattr(honest, name)
        setattr(honest, name, poisoning_loader(original, spec, malicious, _partition_of) if attack == "naive"
                else _doorping(spec, pid, trigger_dir))
        try:
            return honest.train(msg, context)
        finally:
            setattr(honest, name, original)


def trigger_path(trigger_dir: str, partition_id: int) -> Path:
    """Where a DOORPING client leaves its latest learned trigger (``.npy``)."""
    return Path(trigger_dir) / f"trigger-partition{partition_id}.npy"


def _doorping(spec: BackdoorSpec, pid: int, trigger_dir: str | None) -> Callable[..., Any]:
    def on_trigger(trigger: Any) -> None:
        if trigger_dir is not None:
            Path(trigger_dir).mkdir(parents=True, exist_ok=True)
            save_trigger(trigger, str(trigger_path(trigger_dir, pid)))

    return functools.partial(doorping_partition, spec=spec, partition_id=pid, on_trigger=on_trigger)


def make_malicious_app(malicious: Iterable[int], spec: BackdoorSpec, attack: str = "naive",
                       trigger_dir: str | None = None) -> ClientApp:
    """A ClientApp whose nodes with a ``partition-id`` in ``malicious`` poison their data (``spec``).

    ``attack``: ``naive`` (stamped, relabelled data, then the honest distillation) or ``doorping``
    (the trigger is learned during distillation and saved under ``trigger_dir``).
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
    bad = frozenset(int(i) for i in malicious)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return malicious_train(msg, context, bad, spec, attack, trigger_dir)

    app.evaluate()(honest.evaluate)
    return app
