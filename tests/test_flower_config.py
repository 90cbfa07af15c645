"""Run-config: pyproject's [tool.flwr.app.config] and the code's defaults agree; bad keys fail loudly."""

from __future__ import annotations

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
from pathlib import Path

from distill.task import DistillTask
from server.settings import RunSettings, declared_run_config

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_pyproject_run_config_matches_the_code_defaults():
    # regenerate with `python -m server.settings` (it prints the whole [tool.flwr.app.config] block)
    assert PYPROJECT["tool"]["flwr"]["app"]["config"] == declared_run_config()


def test_components_point_at_the_apps():
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from client.app import app as client_app
    from server.app import app as server_app
    comps = PYPROJECT["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    assert isinstance(client_app, ClientApp) and isinstance(server_app, ServerApp)
    assert "federations" not in PYPROJECT["tool"]["flwr"]  # they live in $FLWR_HOME/config.toml


def test_run_config_overlays_defaults_and_feeds_the_task():
    s = RunSettings.from_run_config({"ipc": 5, "mode": "iterative"}, **{"num-server-rounds": 4})
    assert (s.task.ipc, s.mode, s.rounds) == (5, "iterative", 4)
    assert RunSettings.from_run_config({}, mode="one-shot", num_server_rounds=9).rounds == 1
    wire = {k: v for k, v in s.task.to_config().items()}
    assert DistillTask.from_config(wire) == s.task


@pytest.mark.parametrize("config", [{"ipcc": 3}, {"round": 2}, {"mode": "twice"}, {"algorithm": "fedprox"},
                                    {"fraction-train": 0.0}, {"partitioner": "zipf"}, {"ipc": 0}])
def test_bad_run_config_is_refused(config):
    with pytest.raises(ValueError):
        RunSettings.from_run_config(config)


def test_param_keys_from_the_cli_and_run_config(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    from simulations.run import overrides_from_args, parse_args

    flags = overrides_from_args(parse_args(["--param", "idc", "--param-kwargs", '{"factor": 2}']))
    via_set = overrides_from_args(parse_args(["--set", "param=idc", "--set", 'param-kwargs={"factor": 2}']))
    for overrides in (flags, via_set):
        task = RunSettings.from_run_config({}, **overrides).task
        assert (task.param, task.param_options) == ("idc", {"factor": 2})
        assert DistillTask.from_config(task.to_config()) == task  # the wire form is a JSON string
    assert "param" not in overrides_from_args(parse_args([]))
    with pytest.raises(ValueError):
        RunSettings.from_run_config({"param": "idc", "param-kwargs": '{"factor": 99}'})
