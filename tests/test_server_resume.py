"""Resume (issue 6): a run interrupted between any two writes, resumed from its run store,
loses no accepted set and ends with the same metrics and model as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from client.app import app as client_app
from distill.synthetic import SyntheticSet
from server.app import run
from server.resume import ResumeError
from server.store import RunStore, read_metrics
from tests.flower_fixtures import InProcessGrid, task_identity  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
# Iterative, so round 2's clients embed with round 1's model: resuming must restore it exactly.
CONFIG = {"mode": "iterative", "num-server-rounds": 2, "iterations": 1, "ipc": 2, "batch-real": 8,
          "net-width": 8, "net-depth": 1, "server-epochs": 1, "server-dsa": False, "fraction-train": 0.5,
          "min-train-nodes": 2, "min-available-nodes": 3, "fraction-evaluate": 0.5}
TIMING = {"elapsed-seconds", "train-seconds", "client-seconds-max", "resumed-after-round"}
WRITES = 12  # config, 2 x (2 sets, round model, global model, metrics line), summary


class Crash(BaseException):
    """Stands for a kill: nothing in the server may catch it."""


def _run(root: Path, **extra) -> dict:
    return run(InProcessGrid(client_app, 3), {}, runs_dir=str(root), **CONFIG, **extra)


_REFERENCE: dict[str, Path] = {}


def reference(tmp_path_factory) -> Path:
    """One uninterrupted run, shared by the tests of this module."""
    if "root" not in _REFERENCE:
        _REFERENCE["root"] = Path(_run(tmp_path_factory.mktemp("reference"))["run"])
    return _REFERENCE["root"]


def crash_at(monkeypatch, n: int) -> list[str]:
    """Make the store's n-th write die after leaving a half-written temp file; returns paths written."""
    written: list[str] = []
    original = RunStore.write

    def write(self, relpath, fn, mode="w"):
        if len(written) + 1 == n:
            target = self.root / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            (target.parent / f".{target.name}.half.tmp").write_bytes(b"half a file")
            raise Crash(f"killed while writing {relpath}")
        path = original(self, relpath, fn, mode)
        written.append(relpath)
        return path

    monkeypatch.setattr(RunStore, "write", write)
    return written


def comparable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


def set_files(root: Path) -> dict[str, SyntheticSet]:
    return {p.name: SyntheticSet.load(p) for p in sorted((root / "sets").glob("*.npz"))}


@pytest.mark.parametrize("n", range(2, WRITES + 1))
def test_a_run_killed_at_any_write_resumes_to_the_uninterrupted_result(n, tmp_path, tmp_path_factory,
                                                                       monkeypatch, task_identity):  # noqa: F811
    ref = reference(tmp_path_factory)
    written = crash_at(monkeypatch, n)
    with pytest.raises(Crash):
        _run(tmp_path)
    monkeypatch.undo()
    (root,) = tmp_path.iterdir()
    before = {p.name: p.read_bytes() for p in (root / "sets").glob("*.npz")} if (root / "sets").exists() else {}
    complete = len(read_metrics(root)) if (root / "metrics.jsonl").exists() else 0

    summary = run(InProcessGrid(client_app, 3), {}, resume=str(root))  # a fresh federation, as after a restart

    assert comparable(read_metrics(root)) == comparable(read_metrics(ref))
    assert summary["accuracy"] == json.loads((ref / "summary.json").read_text())["accuracy"]
    assert summary["resumed-after-rounds"] == [complete] and len(written) == n - 1
    mine, theirs = set_files(root), set_files(ref)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k].images, theirs[k].images) for k in mine)
    kept = {p.name: p.read_bytes() for p in (root / "sets").rglob("*.npz")}
    assert all(kept.get(name) == data or (root / "sets" / "interrupted" / name).read_bytes() == data
               for name, data in before.items())  # nothing accepted before the kill is lost
    model, ref_model = RunStore(root).load_model(), RunStore(ref).load_model()
    assert all(torch.equal(model[k], ref_model[k]) for k in ref_model)
    assert not list(root.rglob("*.tmp")), "temp files of interrupted writes are removed"


def test_a_run_killed_before_its_config_is_written_cannot_be_resumed(tmp_path, monkeypatch,
                                                                     task_identity):  # noqa: F811
    crash_at(monkeypatch, 1)
    with pytest.raises(Crash):
        _run(tmp_path)
    monkeypatch.undo()
    (root,) = tmp_path.iterdir()
    with pytest.raises(ResumeError, match="config.json"):
        run(InProcessGrid(client_app, 3), {}, resume=str(root))


def test_a_tampered_accepted_set_or_checkpoint_stops_the_resume(tmp_path, tmp_path_factory,
                                                                 task_identity):  # noqa: F811
    import shutil
    ref = reference(tmp_path_factory)
    for victim, damage in [("sets", lambda p: p.write_bytes(p.read_bytes()[:100])),
                           ("sets", lambda p: np.savez(p, images=np.array([{"x": 1}], dtype=object))),
                           ("models", lambda p: torch.save({"w": object()}, p))]:
        root = tmp_path / f"{victim}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(ref, root)
        (root / "summary.json").unlink()
        metrics = read_metrics(root)[:1]  # as if killed after round 1
        (root / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        damage(sorted((root / victim).glob("round001*"))[0])
        with pytest.raises(ResumeError):
            run(InProcessGrid(client_app, 3), {}, resume=str(root))


def test_metrics_lines_with_wrongly_typed_fields_stop_the_resume_with_a_reason(tmp_path, tmp_path_factory,
                                                                              task_identity):  # noqa: F811
    import shutil
    ref = reference(tmp_path_factory)
    for field, value, reason in [("accepted-nodes", ["101"], "accepted-nodes"),
                                 ("accepted-nodes", 101, "accepted-nodes"),
                                 ("uploaded-bytes", {"101": "9"}, "uploaded-bytes"),
                                 ("uploaded-bytes", {"x": 9}, "uploaded-bytes")]:
        root = tmp_path / f"{field}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(ref, root)
        (root / "summary.json").unlink()
        first = {**read_metrics(root)[0], field: value}
        (root / "metrics.jsonl").write_text(json.dumps(first) + "\n")
        with pytest.raises(ResumeError, match=reason):
            run(InProcessGrid(client_app, 3), {}, resume=str(root))


def test_resume_uses_the_runs_own_config_and_refuses_fedavg_and_dp(tmp_path, tmp_path_factory,
                                                                 task_identity):  # noqa: F811
    from server.resume import resume_settings
    ref = reference_config = json.loads((reference(tmp_path_factory) / "config.json").read_text())
    assert resume_settings(reference(tmp_path_factory)).task.ipc == ref["ipc"] == CONFIG["ipc"]
    for change in ({"algorithm": "fedavg"}, {"dp": "dp-dm"}):
        (tmp_path / "config.json").write_text(json.dumps({**reference_config, **change}))
        with pytest.raises(ResumeError):
            resume_settings(tmp_path)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, tmp_path_factory,
                                                                  task_identity):  # noqa: F811
    """A real SIGKILL of a server process during round 2, then ``run(..., resume=...)`` in another process."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from flwr.supercore.task_identity import TaskIdentity
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        from client.app import app as client_app
        from server.app import run
        from tests.flower_fixtures import InProcessGrid
        config = {CONFIG!r}
        def slow(record):
            print("round", record["round"], flush=True)
            time.sleep(600)  # killed here, after round 1's line: round 2 never completes
        if sys.argv[1] == "fresh":
            run(InProcessGrid(client_app, 3), {{}}, slow, runs_dir=sys.argv[2], **config)
        else:
            run(InProcessGrid(client_app, 3), {{}}, resume=sys.argv[2])
    """)
    env = dict(os.environ, FEDISTILL_TEST_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script, "fresh", str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    assert proc.stdout.readline().strip() == "round 1"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    (root,) = tmp_path.iterdir()
    assert len(read_metrics(root)) == 1 and not (root / "summary.json").exists()
    subprocess.run([sys.executable, "-c", script, "resume", str(root)], check=True, env=env, cwd=ROOT,
                   timeout=300)
    ref = reference(tmp_path_factory)
    assert comparable(read_metrics(root)) == comparable(read_metrics(ref))
    assert set_files(root).keys() == set_files(ref).keys()


def test_the_simulation_cli_maps_resume_to_the_run_config_key(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    from simulations.run import overrides_from_args, parse_args

    assert overrides_from_args(parse_args(["--resume", "runs/x"]))["resume"] == "runs/x"
    assert "resume" not in overrides_from_args(parse_args([]))


def test_a_resume_whose_pooled_nodes_are_gone_is_refused():
    from types import SimpleNamespace

    from server.rounds import RunState, check_same_nodes

    state = RunState(last_round=1, resumed_after=1)
    state.pool.update(101, object())
    settings = SimpleNamespace(rounds=3)
    check_same_nodes(state, settings, [101, 102])  # same nodes: fine
    with pytest.raises(RuntimeError, match="new node ids"):
        check_same_nodes(state, settings, [7, 8])  # a simulation restarted with fresh ids
    check_same_nodes(RunState(), settings, [7, 8])  # not a resume: nothing to check
