"""A real Flower deployment on 127.0.0.1 (simulations/deploy.py): SuperLink, SuperNodes, `flwr run`.

The helpers (certificates, node keys, per-node data, the staged app, stopping process trees)
are checked quickly; in the default run the script brings up a SuperLink and two SuperNodes,
submits, and is stopped by SIGTERM (~35 s). Whole runs (insecure; TLS + node authentication)
are slow: 100-110 s each on this 2-core machine under load (a fresh ServerApp process per run,
a fresh ClientApp process per message).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from simulations.deploy import (Deployment, _alive, descendants, make_certs, make_node_keys, split_data,
                                stage_app, stop_processes)

TINY = "iterations=2 ipc=2 batch-real=16 net-width=8 net-depth=2 server-epochs=2 fraction-evaluate=0.0"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tree read from /proc")


@pytest.fixture
def one_thread(monkeypatch):
    """The deployment's processes inherit this: one torch thread each when the machine is shared."""
    if "FEDISTILL_TEST_THREADS" in os.environ:
        monkeypatch.setenv("OMP_NUM_THREADS", os.environ["FEDISTILL_TEST_THREADS"])


def test_certificates_make_a_tls_chain_that_127_0_0_1_and_localhost_verify(tmp_path):
    files = make_certs(tmp_path / "certs")
    assert {p.stat().st_mode & 0o777 for p in (files["ca.key"], files["server.key"])} == {0o600}
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files["server.pem"], files["server.key"])
    client_ctx = ssl.create_default_context(cafile=str(files["ca.crt"]))  # checks the hostname too
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(2)

        def serve() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                with contextlib.suppress(ssl.SSLError, OSError), server_ctx.wrap_socket(conn, server_side=True) as s:
                    s.sendall(b"ok")

        threading.Thread(target=serve, daemon=True).start()
        for name in ("127.0.0.1", "localhost"):
            with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=name) as s:
                assert s.recv(2) == b"ok"
    assert make_certs(tmp_path / "certs")["ca.crt"].read_bytes() == files["ca.crt"].read_bytes()  # kept


def test_node_keys_are_p384_openssh_keys_that_flower_loads(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    pairs = make_node_keys(tmp_path, 2)
    for priv, pub in pairs:
        key = serialization.load_ssh_private_key(priv.read_bytes(), None)  # as flower-supernode does
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert priv.stat().st_mode & 0o777 == 0o600
        assert try_load_public_key(pub) == public_key_to_bytes(key.public_key())  # as `flwr supernode register`
    assert pairs[0][1].read_bytes() != pairs[1][1].read_bytes()


def test_split_gives_each_node_its_own_file_with_the_servers_normalisation(tmp_path, mnist):
    from client.task import DistillTask, load_partition

    paths = split_data(tmp_path, 3, partitioner="dirichlet", alpha=0.5)
    sizes = 0
    for path in paths:
        train, held = load_partition(DistillTask(), {"data-path": str(path), "data-name": "mnist10k"})
        assert train.info.mean == mnist.train.info.mean and train.info.std == mnist.train.info.std
        assert len(held) >= 1
        sizes += len(train) + len(held)
    assert sizes == len(mnist.train)
    own = load_partition(DistillTask(), {"data-path": str(paths[0])})[0]  # no data-name: the file's own stats
    assert own.info.mean != mnist.train.info.mean


def test_staged_app_holds_the_sources_and_builds_a_small_fab(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    app = stage_app(tmp_path / "app")
    assert (app / "pyproject.toml").is_file() and (app / "client" / "app.py").is_file()
    assert (app / "server" / "app.py").is_file() and (app / "distill" / "data.py").is_file()
    assert not list(app.rglob("*.npz")) and not (app / ".venv").exists()
    t = time.perf_counter()
    fab = build_fab_from_disk(app)
    assert len(fab) < 10 * 2**20 and time.perf_counter() - t < 30


def test_stop_processes_ends_a_process_and_the_detached_child_it_started(tmp_path):
    # Like flower-superlink: a child in its own session, which a process-group kill would miss.
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
            " start_new_session=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 30
    while not descendants(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    family = descendants(proc.pid)
    assert family
    stop_processes([proc], grace=5)
    assert proc.poll() is not None and not any(_alive(p) for p in family)


def _processes_using(path: Path) -> list[int]:
    """PIDs whose environment mentions ``path`` (every process deploy.py starts has its FLWR_HOME there)."""
    needle, found = str(path).encode(), []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if needle in environ.read_bytes() and _alive(int(environ.parent.name)):
                found.append(int(environ.parent.name))
    return found


def test_two_supernodes_connect_on_loopback_and_sigterm_stops_everything(tmp_path, one_thread):
    """The script brings up a SuperLink and two SuperNodes and submits the run; SIGTERM then
    (like Ctrl-C, or a failure) stops every process it started, the app processes included."""
    work = tmp_path / "deploy"
    script = Path(__file__).resolve().parents[1] / "simulations" / "deploy.py"
    proc = subprocess.Popen([sys.executable, str(script), "run", "--nodes", "2", "--data", "partition",
                             "--workdir", str(work), "--runs-dir", str(tmp_path / "runs"), "-c", TINY],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120  # until the run is submitted: the nodes have connected
        while not (work / "logs" / "flwr-run.log").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, (work / "logs" / "superlink.log").read_text()[-2000:]
            time.sleep(0.2)
        env = dict(os.environ, FLWR_HOME=str(work / "flwr-home" / "cli"))
        res = subprocess.run([str(Path(sys.executable).parent / "flwr"), "supernode", "ls", "deploy", "--format",
                              "json"], env=env, capture_output=True, text=True, timeout=60)
        nodes = json.loads(res.stdout[res.stdout.index("{"):])["nodes"]
        assert [n["status"] for n in nodes] == ["online", "online"]
        assert len(_processes_using(work)) >= 4  # SuperLink, both SuperNodes, `flwr run`, their children
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
        assert _processes_using(work) == []
    finally:
        if proc.poll() is None:
            proc.kill()
    commands = (work / "commands.sh").read_text()
    assert "--host 127.0.0.1" in commands and "--insecure" in commands and "0.0.0.0" not in commands


def _family(dep: Deployment) -> list[int]:
    return [pid for _, proc in dep.procs for pid in (proc.pid, *descendants(proc.pid))]


def _check_run(run: Path, nodes: int) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["accepted"] == nodes and summary["clients"] == nodes
    assert len(list((run / "sets").glob("round001-node*.npz"))) == nodes


@pytest.mark.slow
def test_two_node_insecure_deployment_runs_the_app_end_to_end(tmp_path, one_thread):
    configs = [f"partition-id={i} num-partitions=2" for i in range(2)]
    with Deployment(configs, mode="insecure", workdir=tmp_path / "deploy", timeout=120, quiet=True) as dep:
        run = dep.submit([TINY], runs_dir=tmp_path / "runs", timeout=400)
        family = _family(dep)
    _check_run(run, 2)
    assert not any(_alive(p) for p in family)


@pytest.mark.slow
def test_tls_deployment_admits_only_enrolled_nodes_and_runs_end_to_end(tmp_path, one_thread):
    """TLS (CA + server certificate made here) and SuperNode authentication; each node its own .npz."""
    work = tmp_path / "deploy"
    configs = [f'data-path="{p}" data-name="mnist10k"' for p in split_data(work / "data", 2)]
    with Deployment(configs, mode="auth", workdir=work, timeout=120, quiet=True) as dep:
        (stranger_key, _), = make_node_keys(tmp_path / "stranger", 1)  # never registered
        stranger = dep.start_node("stranger", "partition-id=0 num-partitions=2", stranger_key)
        assert stranger.wait(120) != 0
        assert "2004" in (work / "logs" / "stranger.log").read_text()  # "Failed to activate SuperNode"
        run = dep.submit([TINY], runs_dir=tmp_path / "runs", timeout=400)
        family = _family(dep)
    _check_run(run, 2)
    assert not any(_alive(p) for p in family)
    assert "--enable-supernode-auth" in (work / "commands.sh").read_text()


def test_bench_writes_one_row_per_setting(tmp_path, monkeypatch, capsys):
    import simulations.deploy as deploy

    calls = []

    def fake_run_once(configs, mode, run_config, workdir, runs_dir, timeout):
        calls.append((len(configs), mode))
        return {"mode": mode, "nodes": len(configs), "startup-s": 1.0, "flwr-run-s": 2.0, "total-s": 3.5,
                "server-wall-s": 1.5, "status": "ok", "accepted": len(configs), "accuracy": 0.1, "run": "r"}

    monkeypatch.setattr(deploy, "run_once", fake_run_once)
    out = tmp_path / "timing.jsonl"
    assert deploy._main(["bench", "--nodes", "2", "4", "--modes", "insecure", "tls", "--data", "partition",
                         "--workdir", str(tmp_path), "--out", str(out), "-c", "ipc=2"]) == 0
    assert calls == [(2, "insecure"), (2, "tls"), (4, "insecure"), (4, "tls")]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["run-config"] for r in rows] == ["ipc=2"] * 4
    assert "4      tls" in capsys.readouterr().out
