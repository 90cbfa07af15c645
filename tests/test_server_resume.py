"""Resume (issue 6): a run interrupted between any two writes, resumed from its run store,
loses no accepted set and ends with the same metrics and model as an uninterrupted run; a DP
run resumes with the data holders' ledgers intact and its stored sets' figures validated again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from client.app import app as client_app
from client.private import dp_config
from client.task import DistillTask
from distill.store_format import FORMAT_KEY, set_path
from distill.synthetic import SyntheticSet
from privacy import privacy_plan
from server.app import run
from server.resume import ResumeError
from server.store import RunStore, read_metrics
from tests.flower_fixtures import InProcessGrid, task_identity  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
# Iterative, so round 2's clients embed with round 1's model: resuming must restore it exactly.
CONFIG = {"mode": "iterative", "num-server-rounds": 2, "iterations": 1, "ipc": 2, "dm.batch-real": 8,
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


def _copy_killed_after_round_1(ref, root):
    import shutil
    shutil.copytree(ref, root)
    (root / "summary.json").unlink()
    metrics = read_metrics(root)[:1]  # as if killed after round 1
    (root / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return root


@pytest.mark.parametrize("damage", [lambda p: p.write_bytes(p.read_bytes()[:100]),
                                    lambda p: np.savez(p, images=np.array([{"x": 1}], dtype=object))],
                         ids=["truncated", "pickled"])
def test_a_tampered_accepted_set_is_quarantined_with_its_reason_and_the_run_goes_on(
        damage, tmp_path, tmp_path_factory, task_identity):  # noqa: F811
    root = _copy_killed_after_round_1(reference(tmp_path_factory), tmp_path / "run")
    victim = sorted((root / "sets").glob("round001*"))[0]
    damage(victim)
    summary = run(InProcessGrid(client_app, 3), {}, resume=str(root))
    assert summary["status"] == "ok" and summary["rounds"] == 2
    assert (root / "sets" / "quarantined" / victim.name).exists() and not victim.exists()
    reason = (root / "sets" / "quarantined" / f"{victim.name}.reason.txt").read_text()
    assert reason.strip() and [q.split(":")[0] for q in summary["resume-quarantined"]] == [f"sets/{victim.name}"]
    assert read_metrics(root)[1]["resume-quarantined"] == summary["resume-quarantined"]


def test_a_format_1_store_resumes_to_the_uninterrupted_result(tmp_path, tmp_path_factory,
                                                              task_identity):  # noqa: F811
    """A store written before config.json carried its format (format 1: DM's ``lr-img`` and
    ``batch-real`` flat) resumes: its config is migrated on the way in (``batch-real`` 8 becomes
    ``dm.batch-real``; lost, round 2 would distill with the default 256 and differ), and left as it is."""
    ref = reference(tmp_path_factory)
    root = _copy_killed_after_round_1(ref, tmp_path / "run")
    current = json.loads((root / "config.json").read_text())
    assert current[FORMAT_KEY] == 2 and current["dm.batch-real"] == 8
    old = {k: v for k, v in current.items() if k != FORMAT_KEY and "." not in k}  # no namespaced keys in format 1
    (root / "config.json").write_text(json.dumps({**old, "lr-img": 1.0, "batch-real": 8}))
    written = (root / "config.json").read_bytes()

    summary = run(InProcessGrid(client_app, 3), {}, resume=str(root))

    assert summary["resumed-after-rounds"] == [1]
    assert comparable(read_metrics(root)) == comparable(read_metrics(ref))
    mine, theirs = set_files(root), set_files(ref)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k].images, theirs[k].images) for k in mine)
    assert (root / "config.json").read_bytes() == written, "the store's own config.json is not rewritten"


def test_retrain_pool_trains_only_on_the_validated_accepted_sets(tmp_path, tmp_path_factory, capsys,
                                                                 task_identity):  # noqa: F811
    """simulations/retrain_pool.py loads the pool as a resume does: a tampered set that still loads
    (pixels x 1e6) is quarantined, not trained on, and a set no complete round accepted is ignored."""
    import shutil

    from simulations.retrain_pool import main

    ref = reference(tmp_path_factory)
    root = tmp_path / "run"
    shutil.copytree(ref, root)
    latest = {}  # node -> set file, over the rounds' accepted nodes: what the pool should hold
    for m in read_metrics(root):
        latest.update({int(n): root / set_path(m["round"], int(n)) for n in m["accepted-nodes"]})
    node, victim = max(latest.items(), key=lambda item: item[1].name)  # a round-2 set
    with np.load(victim, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    np.savez(victim, **{**arrays, "images": arrays["images"] * 1e6})
    assert len(SyntheticSet.load(victim)) == len(arrays["images"]), "the tampered set still loads"
    shutil.copy(min(latest.values()), root / set_path(2, 999))  # a set no round lists as accepted
    earlier = [root / set_path(1, node)] if node in read_metrics(root)[0]["accepted-nodes"] else []
    expected = [p for p in latest.values() if p != victim] + earlier

    assert main([str(root), "--set", "server-epochs=1"]) == 0
    out = json.loads(capsys.readouterr().out)

    assert [q.split(": ")[0] for q in out["quarantined"]] == [f"sets/{victim.name}"]
    assert (root / "sets" / "quarantined" / victim.name).exists() and not victim.exists()
    assert out["pool-sets"] == len(expected) and out["pool-images"] == sum(len(SyntheticSet.load(p)) for p in expected)
    assert 0.0 <= out["accuracy"] <= 1.0 and out["settings"] == ["server-epochs=1"]
    assert (root / set_path(2, 999)).exists(), "retraining moves no set it does not quarantine"


def test_a_tampered_checkpoint_stops_the_resume(tmp_path, tmp_path_factory, task_identity):  # noqa: F811
    """Without the last model the resumed run cannot equal an uninterrupted one: it refuses."""
    root = _copy_killed_after_round_1(reference(tmp_path_factory), tmp_path / "run")
    torch.save({"w": object()}, sorted((root / "models").glob("round001*"))[0])
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


def test_resume_uses_the_runs_own_config_refuses_fedavg_and_allows_dp(tmp_path, tmp_path_factory,
                                                                       task_identity):  # noqa: F811
    """DP resumes: a node's ledger is a file on its disk, not the Flower run's state."""
    from server.resume import resume_settings
    ref = reference_config = json.loads((reference(tmp_path_factory) / "config.json").read_text())
    assert resume_settings(reference(tmp_path_factory)).task.ipc == ref["ipc"] == CONFIG["ipc"]
    (tmp_path / "config.json").write_text(json.dumps({**reference_config, "algorithm": "fedavg"}))
    with pytest.raises(ResumeError, match="FedAvg"):
        resume_settings(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**reference_config, "dp": "dp-dm", "sigma": 1.0}))
    assert resume_settings(tmp_path).task.dp == "dp-dm"


DP_TASK = {"iterations": 2, "ipc": 2, "net-width": 8, "net-depth": 2, "dp": "dp-dm", "sigma": 1.0}
DP_CONFIG = {**DP_TASK, "mode": "iterative", "num-server-rounds": 2, "server-epochs": 1, "server-dsa": False}


def _killed_after_round_1(record: dict) -> None:
    raise Crash(f"killed after round {record['round']}'s metrics line")


def _dp_run_killed_after_round_1(tmp_path: Path, cap: str = "policy") -> tuple[Path, Callable[[int], dict], float]:
    """A 2-round DP run of 3 nodes whose cap pays for one round, killed after round 1: each data
    holder's lifetime ``policy`` cap, or (``cap="run"``) the run's ``privacy-budget`` on nodes
    without a policy."""
    one_round = privacy_plan(dp_config(DistillTask.from_config(DP_TASK), seed=0)).epsilon
    holders = tmp_path / "holders"

    def policy(i: int) -> dict:  # each data holder's own policy and ledger file
        if cap == "run":
            return {}
        return {"policy-ledger": str(holders / f"ledger-{i}.json"), "policy-epsilon-cap": one_round * 1.01}

    budget = {"privacy-budget": one_round * 1.01} if cap == "run" else {}
    with pytest.raises(Crash):
        run(InProcessGrid(client_app, 3, node_config=policy), {}, _killed_after_round_1,
            runs_dir=str(tmp_path / "runs"), **DP_CONFIG, **budget)
    (root,) = (tmp_path / "runs").iterdir()
    assert len(read_metrics(root)) == 1 and len(list((root / "sets").glob("*.npz"))) == 3
    return root, policy, one_round


@pytest.mark.parametrize("cap", ["policy", "run"])
def test_a_dp_run_resumes_and_the_data_holders_ledgers_still_hold(cap, tmp_path, task_identity):  # noqa: F811
    """The resumed server is a new Flower run (another run id, empty node state): the nodes'
    ledgers on their disks still hold round 1's spending (the lifetime cap's ledger, or the
    run's own ledger found again through the run key), so round 2 is declined, and the stored
    DP sets pass validation again."""
    root, policy, one_round = _dp_run_killed_after_round_1(tmp_path, cap)
    summary = run(InProcessGrid(client_app, 3, node_config=policy, run_id=2), {}, resume=str(root))
    first, second = read_metrics(root)
    assert first["accepted"] == 3 and summary["resumed-after-rounds"] == [1] and summary["dp"] == "dp-dm"
    assert second["accepted"] == 0 and second["rejected-declined-budget"] == 3
    assert {f["status"] for f in second["privacy"].values()} == {"declined"}
    assert summary["privacy-figures-refused"] == 0 and len(summary["privacy"]) == 3
    for c in summary["privacy"].values():
        assert (c["rounds-participated"], c["rounds-declined"]) == (1, 1)
        assert c["epsilon-total"] == pytest.approx(one_round)


@pytest.mark.parametrize("forge", [{"delta": 0.9}, {"epsilon": float("nan")}, {"epsilon": -1.0},
                                   {"accountant": "none"}, {"sigma": None}])
def test_a_stored_dp_set_with_forged_privacy_figures_is_quarantined(forge, tmp_path, task_identity):  # noqa: F811
    root, policy, _ = _dp_run_killed_after_round_1(tmp_path)
    path = sorted((root / "sets").glob("round001-*.npz"))[0]
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta_json"]))
    meta["privacy"] = {k: v for k, v in {**meta["privacy"], **forge}.items() if v is not None}
    np.savez(path, **{**arrays, "meta_json": np.asarray(json.dumps(meta))})
    summary = run(InProcessGrid(client_app, 3, node_config=policy, run_id=2), {}, resume=str(root))
    (entry,) = summary["resume-quarantined"]
    assert entry.startswith(f"sets/{path.name}: InvalidSet: privacy: ")
    assert (root / "sets" / "quarantined" / path.name).exists() and not path.exists()


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
