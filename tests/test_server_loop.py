"""End to end without Ray: the server loop over an in-process Grid writes a complete run store."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from client.app import app as client_app
from distill.data import load_dataset
from distill.store_format import model_path
from distill.synthetic import SyntheticSet
from server.app import run
from server.rounds import select_nodes
from server.store import RunStore, read_metrics
from tests.flower_fixtures import InProcessGrid, stored_model_accuracy, task_identity  # noqa: F401 - fixture

TINY = {"iterations": 2, "ipc": 2, "dm.batch-real": 16, "net-width": 8, "net-depth": 2, "server-epochs": 2,
        "server-dsa": False}


def test_three_client_iterative_run_writes_a_complete_run_store(tmp_path, task_identity):  # noqa: F811
    rounds = []
    summary = run(InProcessGrid(client_app, 3), {}, rounds.append, runs_dir=str(tmp_path), mode="iterative",
                  **{"num-server-rounds": 2}, **TINY)
    root = tmp_path / next(p.name for p in tmp_path.iterdir())
    assert {p.name for p in root.iterdir()} == {"config.json", "metrics.jsonl", "sets", "models",
                                                "global_model.pt", "summary.json"}
    config = json.loads((root / "config.json").read_text())
    assert config["mode"] == "iterative" and config["ipc"] == 2
    metrics = read_metrics(root)
    assert [m["round"] for m in metrics] == [1, 2] == [r["round"] for r in rounds]
    assert all(m["accepted"] == 3 and m["rejected"] == 0 for m in metrics)
    # each round's accuracy is that of the model it saved (2 server epochs: near chance, so no bar)
    assert [m["accuracy"] for m in metrics] == [stored_model_accuracy(str(root), model_path(r)) for r in (1, 2)]
    assert "federated-accuracy" in metrics[-1]
    sets = sorted((root / "sets").iterdir())
    assert len(sets) == 6 and all(len(SyntheticSet.load(p)) > 0 for p in sets)
    state = RunStore(root).load_model()  # weights_only=True
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert json.loads((root / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["status"] == "ok" and summary["clients"] == 3 and summary["mb-uploaded-per-client"] > 0


def test_iterative_rounds_send_the_global_model(tmp_path, task_identity):  # noqa: F811
    grid = InProcessGrid(client_app, 2)
    run(grid, {}, runs_dir=str(tmp_path), mode="iterative", **{"num-server-rounds": 2, "fraction-evaluate": 0.0},
        **TINY)
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert ["arrays" in m.content for m in train_msgs] == [False, False, True, True]


def test_fedavg_runs_one_round_and_counts_bytes(tmp_path, task_identity):  # noqa: F811
    summary = run(InProcessGrid(client_app, 3), {}, runs_dir=str(tmp_path), algorithm="fedavg",
                  **{"num-server-rounds": 1, "net-width": 8, "fraction-evaluate": 0.0})
    metrics = read_metrics(summary["run"])
    assert len(metrics) == 1 and metrics[0]["accuracy"] > 0.3  # chance is 0.1; seeds 0-3 reach 0.48-0.71
    assert summary["clients"] == 3 and summary["mb-uploaded-per-client"] > 0


def test_a_round_without_enough_good_replies_trains_nothing(tmp_path, task_identity):  # noqa: F811
    grid = InProcessGrid(client_app, 2, tamper=lambda node, reply: None)
    summary = run(grid, {}, runs_dir=str(tmp_path), **{"round-timeout": 0.5}, **TINY)
    assert summary["status"] == "no-model" and summary["rejected"] == 2
    assert read_metrics(summary["run"])[0]["rejected-timeout"] == 2


def test_node_selection_respects_fraction_minimum_and_seed():
    ids = list(range(10, 30))
    assert len(select_nodes(ids, 0.1, 5, random.Random(0))) == 5
    assert len(select_nodes(ids, 0.5, 2, random.Random(0))) == 10
    assert len(select_nodes(ids[:3], 1.0, 5, random.Random(0))) == 3
    assert select_nodes(ids, 0.3, 1, random.Random(4)) == select_nodes(ids, 0.3, 1, random.Random(4))


def test_server_evaluates_on_the_run_datasets_test_split():
    assert len(load_dataset().test) == 2000


def test_a_three_client_idc_run_accepts_factorised_sets_and_resumes_them(tmp_path, task_identity):  # noqa: F811
    """param=idc end to end: clients upload stored grids, the server decodes, trains, stores and reloads them."""
    from server.resume import open_run, resume_settings
    from server.rounds import expectation
    from server.validate import check_stored_set

    summary = run(InProcessGrid(client_app, 3), {}, runs_dir=str(tmp_path), param="idc",
                  **{"param-kwargs": '{"factor": 2}', "fraction-evaluate": 0.0}, **TINY)
    root = Path(summary["run"])
    (metrics,) = read_metrics(root)
    assert metrics["accepted"] == 3 and metrics["rejected"] == 0 and summary["status"] == "ok"
    sets = [SyntheticSet.load(p) for p in sorted((root / "sets").iterdir())]
    assert len(sets) == 3 and metrics["pool-images"] == sum(len(s) for s in sets)
    for syn in sets:
        assert syn.factors is not None and syn.factors.kind == "idc"
        assert len(syn) == 4 * syn.factors.num_bases and syn.factors.num_bases <= 2 * 10
    # what each node uploaded: the factors (plus labels and spec), well under its decoded images
    assert all(b < s.images.numpy().nbytes for b, s in zip(metrics["uploaded-bytes"].values(), sets))
    settings = resume_settings(root)
    assert settings.task.param == "idc"
    exp = expectation(settings, load_dataset().info, 1)
    assert check_stored_set(root / "sets" / sorted(p.name for p in (root / "sets").iterdir())[0], exp).factors
    _, state = open_run(settings, load_dataset().info)
    assert len(state.pool) == 3 and all(s.factors is not None for _, s in state.pool.items())
    assert state.pool.num_images() == metrics["pool-images"]


def test_a_bare_serverapp_process_streams_fedistills_progress_to_stderr(capsys, monkeypatch):
    """Flower mirrors the ServerApp's stderr into `flwr run --stream`; INFO lines reach it only with a handler."""
    import logging

    from server.app import stream_progress
    root, logger = logging.getLogger(), logging.getLogger("fedistill")
    monkeypatch.setattr(root, "handlers", [])  # a bare process: nothing configured logging
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logger.level)
    assert stream_progress() and not stream_progress()  # installed once
    logging.getLogger("fedistill.server").info("fedistill: round 1/1: 3 of 3 replies accepted")
    assert "fedistill: round 1/1: 3 of 3 replies accepted\n" in capsys.readouterr().err
    monkeypatch.setattr(root, "handlers", [logging.NullHandler()])
    monkeypatch.setattr(logger, "handlers", [])
    assert not stream_progress()  # a script or pytest that configured logging prints its own lines
