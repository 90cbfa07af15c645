"""The ServerApp: reads the run-config once, opens the run store, runs fedistill or FedAvg.

``flwr run .`` gives ``main`` the run-config from pyproject.toml (overridable with ``-c``);
``flwr.simulation.run_simulation`` gives an empty one, so :func:`make_server_app` lets a
script fix settings in code instead.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from client.task import cached_dataset

from .fedavg import run_fedavg
from .resume import open_run, resume_settings
from .rounds import OnReply, OnRound, run_fedistill
from .settings import RunSettings
from .store import RunStore

log = logging.getLogger("fedistill.server")
OnDone = Callable[[dict[str, Any]], None]


def run(grid: Grid, run_config: Mapping[str, Any], on_round: OnRound | None = None,
        on_reply: OnReply | None = None, **overrides: Any) -> dict[str, Any]:
    """Run one federation to the end and return its summary (also in ``summary.json``)."""
    settings = RunSettings.from_run_config(run_config, **overrides)
    if settings.resume:  # the run's own config.json decides, not this command's run-config
        settings = resume_settings(settings.resume)
    test = cached_dataset(settings.task.dataset).test
    if settings.resume:
        store, state = open_run(settings, test.info)
        return _finish(store, run_fedistill(grid, settings, store, test, on_round, on_reply, state))
    store = RunStore.create(settings.runs_dir, settings.name)
    store.write_config(settings.to_dict())
    log.info("fedistill: run store %s", store.root)
    if settings.task.algorithm == "fedavg":
        summary = run_fedavg(grid, settings, store, test, on_round)
    else:
        summary = run_fedistill(grid, settings, store, test, on_round, on_reply)
    return _finish(store, summary)


def _finish(store: RunStore, summary: dict[str, Any]) -> dict[str, Any]:
    log.info("fedistill: done, accuracy %s, run store %s", summary["accuracy"], store.root)
    return summary


def stream_progress() -> bool:
    """Send fedistill's INFO lines (each round, the run store, the final accuracy) to stderr, which
    Flower mirrors into ``flwr run --stream`` and ``flwr log``; without a handler Python drops INFO.

    Only where nothing else prints them (the root logger has no handler: a bare ServerApp
    process), so a script's or pytest's own logging never shows a line twice. True if installed.
    """
    logger = logging.getLogger("fedistill")
    if logging.getLogger().handlers or any(getattr(h, "fedistill_stream", False) for h in logger.handlers):
        return False
    handler = logging.StreamHandler(sys.stderr)
    handler.fedistill_stream = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(message)s"))  # the lines say "fedistill: ..." themselves
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return True


def make_server_app(on_round: OnRound | None = None, on_done: OnDone | None = None,
                    on_reply: OnReply | None = None, **overrides: Any) -> ServerApp:
    """A ServerApp whose settings are the run-config overlaid by ``overrides`` (kebab or snake keys)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        stream_progress()
        summary = run(grid, context.run_config, on_round, on_reply, **overrides)
        if on_done is not None:
            on_done(summary)

    return server_app


app = make_server_app()
