"""The real thing: Flower's simulation engine (Ray), and `flwr run .` on a local SuperLink (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = {"iterations": 2, "ipc": 2, "dm.batch-real": 16, "net-width": 8, "net-depth": 2, "server-epochs": 2}


def test_ray_simulation_with_two_clients_writes_a_run_store(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    from simulations.run import simulate

    overrides = {**TINY, "runs-dir": str(tmp_path / "runs"), "min-available-nodes": 2}
    summary = simulate(overrides, clients=2, quiet=True)
    assert summary["status"] == "ok" and summary["accepted"] == 2
    assert {p.name for p in Path(summary["run"]).iterdir()} >= {"config.json", "metrics.jsonl", "summary.json",
                                                                  "global_model.pt", "sets"}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_flwr_run_on_a_local_simulation_superlink(tmp_path):
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), NUM_SUPERNODES="2",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    config = " ".join(f"{k}={v}" for k, v in TINY.items()) + f' run-name="pytest-{os.getpid()}"'
    proc = subprocess.run(["bash", "simulations/flwr_local.sh", "-c", config], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = sorted((ROOT / "runs").glob(f"*-pytest-{os.getpid()}"))
    assert runs, proc.stdout[-2000:]
    summary = json.loads((runs[-1] / "summary.json").read_text())
    shutil.rmtree(runs[-1])
    assert summary["status"] == "ok" and summary["clients"] == 2
