"""Run fedistill as a real Flower deployment on this machine: a SuperLink, N SuperNodes, `flwr run .`.

Flower's own engine end to end (no simulation, no Ray): ``flower-superlink`` serves the Fleet,
Control and Runtime APIs on one 127.0.0.1 port, every ``flower-supernode`` is a separate data
holder with its own node-config and its own local Runtime API port, and the app is submitted
with ``flwr run <staged copy of .> deploy --stream`` (see :func:`stage_app`). Everything listens
on 127.0.0.1 only.

    python simulations/deploy.py run --nodes 2                     # insecure, bundled sample split per node
    python simulations/deploy.py run --nodes 4 --tls -c "ipc=5"    # TLS: CA + server certificate made here
    python simulations/deploy.py run --nodes 2 --auth              # TLS + enrolled node keys
    python simulations/deploy.py run --node-config 'data-path="/data/a.npz" data-name="mnist"' \\
                                     --node-config 'data-path="/data/b.npz" data-name="mnist"'
    python simulations/deploy.py certs .deploy/certs --host link.example.org   # only the TLS files
    python simulations/deploy.py node-keys .deploy/keys 3          # only the node keys
    python simulations/deploy.py split .deploy/data 3              # only the per-node .npz files
    python simulations/deploy.py bench --nodes 2 4 --modes insecure tls   # wall time per setting

State (certificates, keys, per-process FLWR_HOME, logs, the SuperLink database, the exact
commands launched in ``commands.sh``) goes to ``--workdir`` (default ``.deploy``, git-ignored).
Every process started here is stopped on exit (normal, error, Ctrl-C or SIGTERM): by its PID,
then any of its descendants still alive, by theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
CONNECTION = "deploy"  # the connection's name in the CLI's $FLWR_HOME/config.toml
MODES = ("insecure", "tls", "auth")


def log(msg: str) -> None:
    print(f"[deploy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- certificates and keys
# `cryptography` is a dependency of flwr itself, so these work wherever Flower is installed
# (no openssl / ssh-keygen binaries needed, and no network).

def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only, from its first byte (no window at umask mode)."""
    path.unlink(missing_ok=True)  # O_CREAT's mode applies only to a new file
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_certs(directory: str | Path, hosts: Sequence[str] = ("localhost", HOST), days: int = 30) -> dict[str, Path]:
    """A throw-away CA and a server certificate it signs, for the SuperLink's TLS.

    Writes ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key``. The server certificate's
    SANs cover ``hosts`` (Flower's clients check them: the Runtime API is reached at
    127.0.0.1, so an IP SAN is needed). Existing files are kept, so a CA handed to nodes stays valid.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = {k: d / k for k in ("ca.crt", "ca.key", "server.pem", "server.key")}
    if all(p.is_file() for p in paths.values()):
        return paths
    now = dt.datetime.now(dt.timezone.utc)
    pem = serialization.Encoding.PEM
    pkcs8 = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                 encryption_algorithm=serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedistill deploy CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))

    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))

    _write_private(paths["ca.key"], ca_key.private_bytes(**pkcs8))
    _write_private(paths["server.key"], key.private_bytes(**pkcs8))
    paths["ca.crt"].write_bytes(ca.public_bytes(pem))
    paths["server.pem"].write_bytes(cert.public_bytes(pem))
    return paths


def make_node_keys(directory: str | Path, n: int) -> list[tuple[Path, Path]]:
    """``node<i>`` / ``node<i>.pub``: ECDSA P-384 key pairs in OpenSSH format, as Flower wants.

    The SuperLink operator enrolls the ``.pub`` files (``flwr supernode register``); each node
    keeps its private key (``flower-supernode --auth-supernode-private-key``). Same as
    ``ssh-keygen -t ecdsa -b 384 -N "" -f node<i>``. Existing keys are kept.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(n):
        priv, pub = d / f"node{i}", d / f"node{i}.pub"
        if not (priv.is_file() and pub.is_file()):
            key = ec.generate_private_key(ec.SECP384R1())
            _write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
            pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH) + b" node%d\n" % i)
        pairs.append((priv, pub))
    return pairs


# ---------------------------------------------------------------- per-node data

def split_data(directory: str | Path, n: int, source: str | Path | None = None, partitioner: str = "iid",
               alpha: float = 0.5, holdout: float = 0.1, seed: int = 0) -> list[Path]:
    """Split an ``.npz`` (default: the bundled MNIST sample) into ``node<i>.npz``, one per data holder.

    Each file has the keys a node's ``data-path`` needs (``x_train, y_train, x_test, y_test``,
    uint8): a partition of the source's train split, ``holdout`` of it kept as the node's own
    test split. The source's test split stays with the server (run-config ``dataset``).
    """
    import numpy as np

    from distill.data import bundled_path
    from distill.partition import partition

    src = Path(source) if source else bundled_path()
    with np.load(src, allow_pickle=False) as f:
        x, y = f["x_train"], f["y_train"]
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, idx in enumerate(partition(y, n, partitioner, alpha=alpha, seed=seed)):
        idx = rng.permutation(idx)
        k = max(1, int(round(holdout * len(idx))))
        path = d / f"node{i}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, x_train=x[idx[k:]], y_train=y[idx[k:]], x_test=x[idx[:k]], y_test=y[idx[:k]])
        tmp.replace(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- the app to submit

FAB_SUFFIXES = {".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl"}  # what a FAB may hold (Flower 1.42)
SKIP_DIRS = {"runs", "bench_results", "build", "dist", "__pycache__", "node_modules"}


def stage_app(dest: Path, src: Path = ROOT) -> Path:
    """Copy the app's text sources to ``dest`` and return it, for ``flwr run <dest>``.

    ``flwr run .`` walks every file under the app directory before it filters them, the
    6 GB ``.venv`` included: ~15 s of a deployment run on this machine. The FAB built from
    this copy has the same sources (dot-directories, run stores and data never go into a FAB).
    """
    import shutil

    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not (d.startswith(".") or d in SKIP_DIRS or d.endswith(".egg-info")
                                                   or (here / d).resolve() == dest.resolve())]
        for name in filenames:
            if Path(name).suffix in FAB_SUFFIXES or name in ("LICENSE", ".gitignore"):
                target = dest / (here / name).relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(here / name, target)
    return dest


# ---------------------------------------------------------------- processes

def free_port() -> int:
    """An ephemeral port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    """ppid -> child PIDs, from /proc (Linux); empty elsewhere."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return True


def stop_processes(procs: Sequence[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each process (Flower shuts down gracefully on it), SIGKILL those left after
    ``grace``; then the same for any of their descendants still alive (the SuperExec and app
    processes they started), by PID. All at once: graceful shutdowns take seconds each."""
    families = [pid for proc in procs for pid in descendants(proc.pid)]
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    deadline = time.monotonic() + 3  # they watch their parent's PID and exit within ~0.2 s
    while (left := [p for p in families if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in left) and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_for_text(text: str, proc: subprocess.Popen, logfile: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in logfile.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{logfile.stem} exited with {proc.returncode}:\n" + tail(logfile))
        time.sleep(0.2)
    raise TimeoutError(f"{logfile.stem}: no {text!r} after {timeout:.0f} s:\n" + tail(logfile))


def tail(path: Path, chars: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-chars:]
    return ""


def node_configs_for(n: int, data: str, data_dir: Path) -> list[str]:
    """Default node-configs: ``partition`` (partition-id/num-partitions of the run's dataset,
    split by the run-config partitioner) or ``split`` (one .npz per node, cut from the bundled sample)."""
    if data == "partition":
        return [f"partition-id={i} num-partitions={n}" for i in range(n)]
    if data == "split":
        return [f'data-path="{p}" data-name="mnist10k"' for p in split_data(data_dir, n)]
    raise ValueError(f"data must be 'partition' or 'split', got {data!r}")


@dataclass
class Deployment:
    """One SuperLink and N SuperNodes on 127.0.0.1, started by ``start`` and stopped by ``stop``.

    ``mode``: ``insecure``, ``tls`` (CA + server certificate from :func:`make_certs`) or
    ``auth`` (TLS, and the SuperLink admits only nodes whose public keys were registered).
    """

    node_configs: list[str]
    mode: str = "insecure"
    workdir: Path = ROOT / ".deploy"
    timeout: float = 120.0
    quiet: bool = False  # True: the run's log only goes to logs/flwr-run.log
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        self.workdir = Path(self.workdir).resolve()
        self.logs = self.workdir / "logs"
        self.env = dict(os.environ)
        # The SuperLink/SuperNodes launch flower-superexec, flwr-serverapp, flwr-clientapp from PATH.
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        # Else the SuperLink would `uv sync` the app's dependencies (GBs of other torch wheels).
        self.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        # The FAB carries no data files: the apps find the bundled sample through this.
        if "FEDISTILL_MNIST10K" not in self.env:
            self.env["FEDISTILL_MNIST10K"] = str(ROOT / "distill" / "assets" / "mnist10k.npz")

    # -- helpers
    @property
    def tls(self) -> bool:
        return self.mode in ("tls", "auth")

    def home(self, name: str) -> Path:
        """Each process gets its own FLWR_HOME: nodes install the FAB there, concurrently."""
        path = self.workdir / "flwr-home" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _record(self, name: str, cmd: list[str]) -> None:
        with open(self.workdir / "commands.sh", "a") as f:
            f.write(f"# {name}\nFLWR_HOME={shlex.quote(str(self.home(name)))} {shlex.join(cmd)}\n")

    def _spawn(self, name: str, cmd: list[str]) -> tuple[subprocess.Popen, Path]:
        self._record(name, cmd)
        logfile = self.logs / f"{name}.log"
        with open(logfile, "w") as out:
            proc = subprocess.Popen(cmd, cwd=self.workdir, env={**self.env, "FLWR_HOME": str(self.home(name))},
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # Ctrl-C in the terminal reaches us, not them
        self.procs.append((name, proc))
        return proc, logfile

    def flwr(self, *args: str, timeout: float | None = None, stream: bool = False) -> subprocess.CompletedProcess:
        """A ``flwr`` CLI command against this deployment (the CLI's own FLWR_HOME holds the connection)."""
        cmd = [str(Path(sys.executable).parent / "flwr"), *args]
        self._record("cli", cmd)
        env = {**self.env, "FLWR_HOME": str(self.home("cli"))}
        if stream:  # the run's log lines go to our stderr as they come, and to logs/flwr-run.log
            return self._tee(cmd, env, self.logs / "flwr-run.log", timeout)
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    def _tee(self, cmd: list[str], env: dict[str, str], logfile: Path,
             timeout: float | None) -> subprocess.CompletedProcess:
        with open(logfile, "w") as out, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                         stderr=subprocess.STDOUT, text=True) as proc:
            self.procs.append(("flwr-run", proc))
            watchdog = threading.Timer(timeout, proc.terminate) if timeout else None
            if watchdog:
                watchdog.start()
            try:
                for line in proc.stdout:  # type: ignore[union-attr]
                    out.write(line)
                    out.flush()
                    if not self.quiet:
                        sys.stderr.write(line)
                proc.wait()
            finally:
                if watchdog:
                    watchdog.cancel()
                stop_processes([proc], grace=5)
                self.procs.remove(("flwr-run", proc))
        if watchdog and not watchdog.is_alive() and proc.returncode < 0:
            raise TimeoutError(f"{shlex.join(cmd)} stopped after {timeout:.0f} s:\n{tail(logfile)}")
        return subprocess.CompletedProcess(cmd, proc.returncode, tail(logfile), "")

    # -- lifecycle
    def start(self) -> "Deployment":
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.workdir / "commands.sh").write_text(
            "# launched by simulations/deploy.py (exact commands), with:\n"
            + "".join(f"export {k}={shlex.quote(self.env[k])}\n"
                      for k in ("PATH", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "FEDISTILL_MNIST10K")))
        self.port = free_port()
        tls_files = make_certs(self.workdir / "certs") if self.tls else {}
        self._write_connection(tls_files)
        db = self.workdir / "superlink-state.db"
        db.unlink(missing_ok=True)  # a fresh federation each time
        cmd = ["flower-superlink", "--host", HOST, "--port", str(self.port), "--database", str(db),
               "--disable-runtime-dependency-installation"]
        if self.tls:
            cmd += ["--ssl-ca-certfile", str(tls_files["ca.crt"]), "--ssl-certfile", str(tls_files["server.pem"]),
                    "--ssl-keyfile", str(tls_files["server.key"])]
        else:
            cmd += ["--insecure"]
        if self.mode == "auth":
            cmd += ["--enable-supernode-auth"]
        log(f"SuperLink ({self.mode}) on {HOST}:{self.port}")
        proc, logfile = self._spawn("superlink", cmd)
        keys = []
        if self.mode == "auth":  # enroll the node keys before any node connects
            wait_for_text("Application startup complete", proc, logfile, self.timeout)
            keys = make_node_keys(self.workdir / "keys", len(self.node_configs))
            for i, (priv, pub) in enumerate(keys):
                self.register(pub, name=f"node{i}")
        # Otherwise the nodes start while the SuperLink does (its imports take seconds): they
        # retry the connection with sub-second back-off.
        for i, node_config in enumerate(self.node_configs):
            self.start_node(f"node{i}", node_config, keys[i][0] if keys else None)
        wait_for_text("Application startup complete", proc, logfile, self.timeout)
        for name, node in self.procs[1:]:
            wait_for_text("SuperNode ID:", node, self.logs / f"{name}.log", self.timeout)
        log(f"{len(self.node_configs)} SuperNodes connected")
        return self

    def register(self, public_key: Path, name: str) -> None:
        """Enroll a node's public key with the SuperLink (Control API, `flwr supernode register`)."""
        res = self.flwr("supernode", "register", str(public_key), CONNECTION, "--name", name, timeout=self.timeout)
        if res.returncode != 0:
            raise RuntimeError(f"flwr supernode register {public_key} failed:\n{res.stdout}{res.stderr}")

    def start_node(self, name: str, node_config: str, private_key: Path | None = None) -> subprocess.Popen:
        cmd = ["flower-supernode", "--superlink", f"{HOST}:{self.port}", "--host", HOST,
               "--port", str(free_port()), "--node-config", node_config]
        cmd += ["--root-certificates", str(self.workdir / "certs" / "ca.crt")] if self.tls else ["--insecure"]
        if private_key is not None:
            cmd += ["--auth-supernode-private-key", str(private_key)]
        log(f"{name}: {node_config}")
        return self._spawn(name, cmd)[0]

    def _write_connection(self, tls_files: dict[str, Path]) -> None:
        security = (f'root-certificates = "{tls_files["ca.crt"]}"' if self.tls else "insecure = true")
        (self.home("cli") / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{HOST}:{self.port}"\n{security}\n')

    def submit(self, run_config: Sequence[str] = (), runs_dir: Path = ROOT / "runs",
               timeout: float = 1800.0) -> Path:
        """``flwr run . deploy --stream`` and wait for the run to end; returns its run store."""
        runs_dir = Path(runs_dir).resolve()
        runs_dir.mkdir(parents=True, exist_ok=True)
        before = set(runs_dir.iterdir())
        ours = f'runs-dir="{runs_dir}" min-available-nodes={len(self.node_configs)}'
        app = stage_app(self.workdir / "app")
        args = ["run", str(app), CONNECTION, "--stream", "-c", ours]
        for c in run_config:
            args += ["-c", c]
        res = self.flwr(*args, timeout=timeout, stream=True)
        new = sorted(set(runs_dir.iterdir()) - before, key=lambda p: p.stat().st_mtime)
        if res.returncode != 0 or not new or not (new[-1] / "summary.json").is_file():
            raise RuntimeError(f"flwr run ended with {res.returncode}, run store {new[-1] if new else None} "
                               f"has no summary.json; end of the run's log ({self.logs / 'flwr-run.log'}):\n"
                               f"{res.stdout}")
        return new[-1]

    def stop(self) -> None:
        """Stop every process started here by PID (and their descendants): the nodes first, so
        they can unregister while the SuperLink is still up, then the SuperLink."""
        t0 = time.perf_counter()
        stop_processes([proc for name, proc in self.procs if name != "superlink"])
        stop_processes([proc for name, proc in self.procs if name == "superlink"])
        if self.procs:
            log(f"stopped {len(self.procs)} processes in {time.perf_counter() - t0:.1f} s")
        self.procs.clear()

    def __enter__(self) -> "Deployment":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind the stack like Ctrl-C, so every `finally` stops its processes."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_once(node_configs: list[str], mode: str, run_config: Sequence[str], workdir: Path, runs_dir: Path,
             timeout: float) -> dict:
    """Start a deployment, submit one run, stop everything; timings and the run's summary."""
    t0 = time.perf_counter()
    with Deployment(node_configs, mode=mode, workdir=workdir) as dep:
        t1 = time.perf_counter()
        run = dep.submit(run_config, runs_dir=runs_dir, timeout=timeout)
        t2 = time.perf_counter()
    summary = json.loads((run / "summary.json").read_text())
    return {"mode": mode, "nodes": len(node_configs), "startup-s": round(t1 - t0, 1),
            "flwr-run-s": round(t2 - t1, 1), "total-s": round(time.perf_counter() - t0, 1),
            "server-wall-s": round(float(summary.get("wall-seconds", float("nan"))), 1),
            "status": summary.get("status"), "accepted": summary.get("accepted"),
            "accuracy": summary.get("accuracy"), "run": str(run)}


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "bench"):
        s = sub.add_parser(name)
        s.add_argument("--workdir", type=Path, default=ROOT / ".deploy")
        s.add_argument("--runs-dir", type=Path, default=ROOT / "runs", help="where the ServerApp writes run stores")
        s.add_argument("--data", choices=("split", "partition"), default="split",
                       help="split: one .npz per node cut from the bundled sample (node-config data-path); "
                            "partition: node-config partition-id/num-partitions of the run's dataset")
        s.add_argument("-c", "--run-config", action="append", default=[], help="run-config overrides, as flwr run -c")
        s.add_argument("--timeout", type=float, default=1800.0, help="seconds a run may take")
    run = sub.choices["run"]
    run.add_argument("--nodes", type=int, default=2)
    run.add_argument("--node-config", action="append", default=[],
                     help="one per node (sets the node count), e.g. 'data-path=\"/data/a.npz\" data-name=\"mnist\"'")
    sec = run.add_mutually_exclusive_group()
    sec.add_argument("--tls", action="store_true", help="TLS with a CA and server certificate made in workdir/certs")
    sec.add_argument("--auth", action="store_true", help="TLS + SuperNode authentication (enrolled node keys)")
    bench = sub.choices["bench"]
    bench.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    bench.add_argument("--modes", nargs="+", choices=MODES, default=["insecure", "tls"])
    bench.add_argument("--out", type=Path, default=ROOT / "bench_results" / "deploy_timing.jsonl")
    for name, helptext in (("certs", "CA + server certificate"), ("node-keys", "P-384 node key pairs"),
                           ("split", "per-node .npz files from the bundled sample")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("directory", type=Path)
        if name != "certs":
            s.add_argument("n", type=int)
        else:
            s.add_argument("--host", action="append", default=[],
                           help="a further DNS name or IP the SuperLink is reached at (repeat); localhost and "
                                "127.0.0.1 are always in: the SuperLink's own ServerApp process connects there")
    args = p.parse_args(argv)

    if args.cmd == "certs":
        print("\n".join(str(v) for v in make_certs(args.directory, ("localhost", HOST, *args.host)).values()))
        return 0
    if args.cmd == "node-keys":
        print("\n".join(f"{a} {b}" for a, b in make_node_keys(args.directory, args.n)))
        return 0
    if args.cmd == "split":
        print("\n".join(str(x) for x in split_data(args.directory, args.n)))
        return 0

    with _sigterm_as_exit():
        if args.cmd == "run":
            mode = "auth" if args.auth else "tls" if args.tls else "insecure"
            configs = args.node_config or node_configs_for(args.nodes, args.data, args.workdir.resolve() / "data")
            result = run_once(configs, mode, args.run_config, args.workdir, args.runs_dir, args.timeout)
            print(json.dumps(result, indent=1))
            return 0 if result["status"] == "ok" else 1
        rows = []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for n in args.nodes:
            configs = node_configs_for(n, args.data, args.workdir.resolve() / "data")
            for mode in args.modes:
                row = run_once(configs, mode, args.run_config, args.workdir, args.runs_dir, args.timeout)
                row["run-config"] = " ".join(args.run_config)
                rows.append(row)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        print(f"{'nodes':>5} {'mode':>8} {'startup s':>9} {'flwr run s':>10} {'server s':>8} {'total s':>7} status")
        for r in rows:
            print(f"{r['nodes']:>5} {r['mode']:>8} {r['startup-s']:>9} {r['flwr-run-s']:>10} "
                  f"{r['server-wall-s']:>8} {r['total-s']:>7} {r['status']} ({r['accepted']} sets)")
        return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(_main())
