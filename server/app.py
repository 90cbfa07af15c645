"""The ServerApp: reads the run-config once, opens the run store, runs fedistill or FedAvg.

``flwr run .`` gives ``main`` the run-config from pyproject.toml (overridable with ``-c``);
``flwr.simulation.run_simulation`` gives an empty one, so :func:`make_server_app` lets a
script fix settings in code instead.
"""

from __future__ import annotations

import logging
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
    store.write_json("config.json", settings.to_dict())
    log.info("fedistill: run store %s", store.root)
    if settings.task.algorithm == "fedavg":
        summary = run_fedavg(grid, settings, store, test, on_round)
    else:
        summary = run_fedistill(grid, settings, store, test, on_round, on_reply)
    return _finish(store, summary)


def _finish(store: RunStore, summary: dict[str, Any]) -> dict[str, Any]:
    log.info("fedistill: done, accuracy %s, run store %s", summary["accuracy"], store.root)
    return summary


def make_server_app(on_round: OnRound | None = None, on_done: OnDone | None = None,
                    on_reply: OnReply | None = None, **overrides: Any) -> ServerApp:
    """A ServerApp whose settings are the run-config overlaid by ``overrides`` (kebab or snake keys)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        summary = run(grid, context.run_config, on_round, on_reply, **overrides)
        if on_done is not None:
            on_done(summary)

    return server_app


app = make_server_app()
