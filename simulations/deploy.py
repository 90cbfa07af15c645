"""Run fedistill as a real Flower deployment that a data holder can trust.

Flower 1.42 serves the Fleet API (nodes), the unauthenticated Control API (``flwr run``: submit
runs, enroll node keys) and the Runtime API (the ServerApp) on one HTTP port. So here the
SuperLink listens on 127.0.0.1 only and nodes reach it through ``simulations/fleet_proxy.py``,
which forwards the Fleet routes and refuses everything else; the operator uses Control on
127.0.0.1 (or an SSH tunnel). By default: TLS, node authentication (enrolled public keys only),
nodes that run only apps their holder approved (``python -m client.supernode --approved-apps``),
and a memory cap on the ServerApp process. ``--insecure`` (clear text, any node) must be asked for.

Operator (the SuperLink's machine):
    python simulations/deploy.py certs  /srv/fl --host link.example.org   # CA in /srv/fl/ca (kept apart),
                                                                          # server cert in /srv/fl/superlink
    python simulations/deploy.py serve  /srv/fl --host link.example.org   # SuperLink on 127.0.0.1,
                                                                          # Fleet proxy on 0.0.0.0:9092
    python simulations/deploy.py register /srv/fl site-a.pub --name site-a # enroll a public key a holder sent
    python simulations/deploy.py stage /srv/fl/app                        # the app to send for review and to run
Data holder (its own machine):
    python simulations/deploy.py node-key ~/fl-key                        # its own key pair; send ~/fl-key/node.pub
Loopback demo (one machine plays operator and every holder; it makes the holders' keys itself, DEMO ONLY):
    python simulations/deploy.py run --nodes 2 [-c "ipc=5"] [--insecure]
    python simulations/deploy.py bench --nodes 2 4 --modes secure insecure
    python simulations/deploy.py split .deploy/data 3                     # only the per-node .npz files

State goes to ``--workdir`` (default ``.deploy``, git-ignored): ``ca/`` (CA key and certificate),
``superlink/`` (what the SuperLink reads: server key and certificate, a copy of ca.crt),
``holders/node<i>/`` (each demo holder's key, ca.crt, approved apps), per-process FLWR_HOME,
logs, and ``commands.sh`` (every command exactly as launched). Every process started here is
stopped on exit (normal, error, Ctrl-C or SIGTERM): by its PID, then its descendants by theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
LOOPBACK_NAMES = ("localhost", HOST)  # always in the server certificate: the ServerApp and CLI connect there
CONNECTION = "deploy"  # the connection's name in the CLI's $FLWR_HOME/config.toml
MODES = ("secure", "insecure")
GIB = 2**30
DEFAULT_MAX_RSS_GIB = 6.0  # importing torch + the bundled dataset is ~0.5 GiB; a run's pool and model add little
CA_DAYS, SERVER_DAYS = 365, 90
RENEW_WITHIN = dt.timedelta(days=1)  # a certificate this close to its end is replaced
WARN_WITHIN = dt.timedelta(days=14)


def log(msg: str) -> None:
    print(f"[deploy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- keys and certificates
# `cryptography` is a dependency of flwr itself: no openssl / ssh-keygen binaries, no network.

def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only, from its first byte (no window at umask mode)."""
    path.unlink(missing_ok=True)  # O_CREAT's mode applies only to a new file
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _private_dir(path: Path) -> Path:
    """A directory only its owner can enter (it holds a private key)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _p384():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


def _pkcs8(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def wanted_sans(hosts: Sequence[str] = ()) -> tuple[str, ...]:
    """The server certificate's names: loopback (always) and each public host, normalised and sorted."""
    out = set()
    for h in (*LOOPBACK_NAMES, *hosts):
        with contextlib.suppress(ValueError):
            h = str(ipaddress.ip_address(h))
        out.add(h.lower())
    return tuple(sorted(out))


def _load_cert(path: Path):
    from cryptography import x509

    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def cert_sans(path: Path) -> tuple[str, ...]:
    """The DNS names and IPs a certificate is valid for, as :func:`wanted_sans` spells them."""
    from cryptography import x509

    try:
        ext = _load_cert(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    names = [n.lower() for n in ext.get_values_for_type(x509.DNSName)]
    return tuple(sorted({*names, *(str(ip) for ip in ext.get_values_for_type(x509.IPAddress))}))


def cert_expiry(path: Path) -> dt.datetime:
    return _load_cert(path).not_valid_after_utc


def expiry_lines(paths: Sequence[Path], now: dt.datetime | None = None) -> list[str]:
    """One line per certificate: when it expires and how many days are left (logged on every start)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    lines = []
    for p in paths:
        end = cert_expiry(p)
        left = end - now
        state = "EXPIRED" if left <= dt.timedelta(0) else "expires soon" if left < WARN_WITHIN else "valid"
        lines.append(f"{p}: {state}, not after {end:%Y-%m-%d %H:%M} UTC ({left.days} days left)")
    return lines


def make_ca(ca_dir: Path, days: int = CA_DAYS) -> tuple[Path, Path]:
    """A new CA (``ca.crt``, ``ca.key``) in its own owner-only directory, apart from the SuperLink's files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    d = _private_dir(Path(ca_dir))
    key = _p384()
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedistill deploy CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    _write_private(d / "ca.key", _pkcs8(key))
    (d / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d / "ca.crt", d / "ca.key"


def issue_server_cert(ca_cert: Path, ca_key: Path, out_dir: Path, sans: Sequence[str],
                      days: int = SERVER_DAYS) -> tuple[Path, Path]:
    """``server.pem`` / ``server.key`` for ``sans``, signed by the CA, in the SuperLink's directory."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = _load_cert(ca_cert)
    signer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), None)
    key = _p384()
    now = dt.datetime.now(dt.timezone.utc)
    names: list[x509.GeneralName] = []
    for h in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=days), ca.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
            .sign(signer, hashes.SHA384()))
    d = _private_dir(Path(out_dir))
    _write_private(d / "server.key", _pkcs8(key))
    (d / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d / "server.pem", d / "server.key"


@dataclass(frozen=True)
class TlsFiles:
    """Where each TLS file lives. The SuperLink and the proxy are given ``superlink/`` only."""

    workdir: Path

    @property
    def ca_dir(self) -> Path:
        return self.workdir / "ca"

    @property
    def superlink_dir(self) -> Path:
        return self.workdir / "superlink"

    @property
    def ca_cert(self) -> Path:  # what nodes and the operator's CLI trust
        return self.ca_dir / "ca.crt"

    @property
    def ca_key(self) -> Path:  # signs server certificates; no running process reads it
        return self.ca_dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.superlink_dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.superlink_dir / "server.key"

    @property
    def superlink_ca(self) -> Path:  # a copy of ca.crt for --ssl-ca-certfile
        return self.superlink_dir / "ca.crt"


def _ca_usable(files: TlsFiles, now: dt.datetime) -> bool:
    return (files.ca_cert.is_file() and files.ca_key.is_file()
            and cert_expiry(files.ca_cert) - now > RENEW_WITHIN)


def _server_cert_problem(files: TlsFiles, sans: tuple[str, ...], now: dt.datetime) -> str | None:
    """Why the server certificate must be made again (None: keep it)."""
    if not (files.server_cert.is_file() and files.server_key.is_file()):
        return "no server certificate yet"
    if (have := cert_sans(files.server_cert)) != sans:
        return f"hosts changed: certificate names {list(have)}, wanted {list(sans)}"
    if cert_expiry(files.server_cert) - now <= RENEW_WITHIN:
        return "server certificate expired or about to"
    try:
        _load_cert(files.server_cert).verify_directly_issued_by(_load_cert(files.ca_cert))
    except Exception:  # noqa: BLE001 - any failure means "not ours"
        return "server certificate not signed by the current CA"
    return None


def ensure_certs(workdir: Path, hosts: Sequence[str] = (), ca_days: int = CA_DAYS,
                 server_days: int = SERVER_DAYS) -> TlsFiles:
    """Make or refresh the CA (``workdir/ca``) and the SuperLink's certificate (``workdir/superlink``).

    The CA is kept while it is valid, so the ca.crt handed to nodes stays good. The server
    certificate is made again when the wanted names (loopback + ``hosts``) differ from the ones
    it carries, when it nears its end, or when another CA signed it. Expiry is logged.
    """
    files = TlsFiles(Path(workdir).resolve())
    now = dt.datetime.now(dt.timezone.utc)
    if not _ca_usable(files, now):
        if files.ca_cert.is_file():
            log(f"WARNING: CA {files.ca_cert} expired or about to: a new CA; every node needs the new ca.crt")
        make_ca(files.ca_dir, ca_days)
    sans = wanted_sans(hosts)
    if (why := _server_cert_problem(files, sans, now)) is not None:
        log(f"server certificate for {', '.join(sans)}: made now ({why})")
        issue_server_cert(files.ca_cert, files.ca_key, files.superlink_dir, sans, server_days)
    shutil.copyfile(files.ca_cert, files.superlink_ca)
    legacy = files.workdir / "certs" / "ca.key"
    if legacy.exists():
        log(f"WARNING: {legacy} is the old layout (CA key beside the server key): delete {legacy.parent}")
    return files


def superlink_tls(workdir: Path, hosts: Sequence[str] = ()) -> TlsFiles:
    """The SuperLink's TLS files, checked without touching the CA: they exist and name ``hosts``."""
    files = TlsFiles(Path(workdir).resolve())
    missing = [p for p in (files.server_cert, files.server_key, files.superlink_ca) if not p.is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(map(str, missing))}: run `deploy.py certs {workdir} --host ...` first")
    if hosts and (have := cert_sans(files.server_cert)) != wanted_sans(hosts):
        raise SystemExit(f"{files.server_cert} names {list(have)}, not {list(wanted_sans(hosts))}: "
                         f"run `deploy.py certs {workdir}` with the same --host flags")
    return files


def make_node_key(directory: Path, name: str = "node") -> tuple[Path, Path]:
    """A data holder's own key pair: ``<dir>/<name>`` (private, 0600, in a 0700 directory) and
    ``<dir>/<name>.pub`` (the only file that leaves the holder; the operator enrolls it).

    ECDSA P-384 in OpenSSH format, as ``flower-supernode --auth-supernode-private-key`` and
    ``flwr supernode register`` want (= ``ssh-keygen -t ecdsa -b 384 -N ""``). An existing pair is
    kept: a node's identity is its key.
    """
    from cryptography.hazmat.primitives import serialization

    d = _private_dir(Path(directory))
    priv, pub = d / name, d / f"{name}.pub"
    if not (priv.is_file() and pub.is_file()):
        key = _p384()
        _write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()))
        pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return priv, pub


def check_public_key(path: Path) -> None:
    """Refuse anything but one OpenSSH ECDSA public key: above all a private key sent by mistake."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = Path(path).read_bytes()
    if b"PRIVATE KEY" in data:
        raise ValueError(f"{path} is a PRIVATE key: it must never leave the data holder; ask for the .pub "
                         f"file, and have the holder make a new pair (this one is no longer secret)")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an OpenSSH public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path}: Flower node keys are ECDSA (e.g. P-384), not {type(key).__name__}")


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
STAGED_MARK = ".fedistill-staged"  # no FAB suffix: never in the FAB, so never in its hash
SKIP_DIRS = {"runs", "bench_results", "build", "dist", "__pycache__", "node_modules"}


def stage_app(dest: Path, src: Path = ROOT, force: bool = False) -> Path:
    """Copy the app's text sources to ``dest`` and return it, for ``flwr run <dest>``.

    ``flwr run .`` walks every file under the app directory before it filters them, the
    6 GB ``.venv`` included: ~15 s of a deployment run on this machine. The FAB built from
    this copy has the same sources (dot-directories, run stores and data never go into a FAB),
    and so the same hash every time the sources are the same: what a holder approves. A
    non-empty ``dest`` is replaced only if it was staged here (its marker file) or ``force``.
    """
    dest = Path(dest)
    if dest.exists():
        if not force and any(dest.iterdir()) and not (dest / STAGED_MARK).is_file():
            raise ValueError(f"{dest} is not empty and not an app staged here: not replacing it")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (dest / STAGED_MARK).write_text("staged by simulations/deploy.py; replaced on the next stage\n")
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


def run_config_dataset(overrides: Sequence[str], pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The run's ``dataset``: the last ``-c`` override naming it, else the app's default.

    Parsed with Flower's own parser (what ``flwr run -c`` uses), so quoting means the same here.
    Why: a partition node loads only a dataset it names (client.task.dataset_refusal), so the
    launcher has to name the run's dataset to its nodes.
    """
    import tomllib

    from flwr.common.config import parse_config_args

    given = parse_config_args(list(overrides)) if overrides else {}
    if "dataset" in given:
        return str(given["dataset"])
    with open(pyproject, "rb") as f:
        return str(tomllib.load(f)["tool"]["flwr"]["app"]["config"]["dataset"])


def node_configs_for(n: int, data: str, data_dir: Path, dataset: str | None = None) -> list[str]:
    """Default node-configs: ``partition`` (partition-id/num-partitions of the run's dataset,
    split by the run-config partitioner) or ``split`` (one .npz per node, cut from the bundled sample).

    A partition node loads only a dataset it names, so ``dataset`` (the run's) goes into each
    partition node's node-config; a ``split`` node reads its own file and ignores it.
    """
    if data == "partition":
        named = ""
        if dataset:
            if '"' in dataset or "\\" in dataset or "\n" in dataset:
                raise ValueError(f"dataset {dataset!r}: a quote, backslash or newline cannot go into a node-config")
            named = f' dataset="{dataset}"'
        return [f"partition-id={i} num-partitions={n}{named}" for i in range(n)]
    if data == "split":
        return [f'data-path="{p}" data-name="mnist10k"' for p in split_data(data_dir, n)]
    raise ValueError(f"data must be 'partition' or 'split', got {data!r}")


# ---------------------------------------------------------------- the ServerApp's memory cap

def rss_bytes(pid: int) -> int:
    """Resident memory of one process (0 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def serverapp_pids(root: int) -> list[int]:
    """The ``flwr-serverapp`` processes among ``root``'s descendants (one per running run)."""
    return [p for p in descendants(root) if _is_serverapp(_cmdline(p))]


def _is_serverapp(cmdline: str) -> bool:
    """``.../flwr-serverapp ...`` or ``python .../flwr-serverapp ...`` (a console script)."""
    return any(Path(arg).name == "flwr-serverapp" for arg in cmdline.split(" ")[:2])


def _kill_tree(pid: int) -> None:
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@dataclass
class ServerAppWatchdog:
    """Kill a ServerApp process tree whose resident memory passes ``max_bytes``.

    Why not a kernel limit: ``ulimit -v`` (address space) breaks ``import torch`` long before
    real use, and a cgroup needs a writable cgroup v2 tree (this container has cgroup v1 only).
    Polling RSS is portable; it reacts within ``interval`` plus the time memory takes to grow, so
    a one-shot allocation faster than that can overshoot the cap before the kill.
    """

    root_pid: int
    max_bytes: int
    interval: float = 0.25
    report: Callable[[str], None] = log
    kills: list[dict] = field(default_factory=list)
    peak: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="serverapp-watchdog", daemon=True)

    def start(self) -> "ServerAppWatchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def check(self) -> None:
        """One poll: measure each ServerApp tree, kill any over the cap."""
        for pid in serverapp_pids(self.root_pid):
            rss = sum(rss_bytes(p) for p in (pid, *descendants(pid)))
            self.peak = max(self.peak, rss)
            if rss > self.max_bytes:
                _kill_tree(pid)
                event = {"pid": pid, "rss-bytes": rss, "max-bytes": self.max_bytes, "time": time.time()}
                self.kills.append(event)
                self.report(f"MEMORY CAP: ServerApp (pid {pid}) resident {rss / GIB:.2f} GiB > "
                            f"--serverapp-max-rss {self.max_bytes / GIB:.2f} GiB: killed (SIGKILL)")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a process vanishing mid-read is not an error
                self.check()


# ---------------------------------------------------------------- the deployment

@dataclass
class Deployment:
    """A SuperLink on 127.0.0.1, the Fleet proxy in front of it, and N SuperNodes (demo holders).

    ``secure`` (default): TLS everywhere, node authentication, each holder's key enrolled before
    its node connects. ``approval`` (default): nodes run ``python -m client.supernode
    --approved-apps <holder>/approved-apps.txt``; ``approved[i]`` lists the app directories holder
    ``i`` approved (default: the staged app, as a holder would after reviewing it).
    """

    node_configs: list[str]
    secure: bool = True
    approval: bool = True
    approved: Sequence[Sequence[Path]] | None = None
    workdir: Path = ROOT / ".deploy"
    timeout: float = 120.0
    quiet: bool = False  # True: the run's log only goes to logs/flwr-run.log
    serverapp_max_rss: float | None = DEFAULT_MAX_RSS_GIB * GIB
    hosts: Sequence[str] = ()           # extra names in the server certificate (the public host)
    public_host: str = HOST             # where the proxy listens for nodes
    public_port: int = 0                # 0: any free port
    port: int = 0                       # the SuperLink's loopback port; 0: any free port
    fresh_state: bool = True            # demo: a new SuperLink database each time
    manage_certs: bool = True           # demo: make/refresh certificates here; serve: the CA stays offline
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.logs = self.workdir / "logs"
        self.app = self.workdir / "app"
        self.watchdog: ServerAppWatchdog | None = None
        self.tls: TlsFiles | None = None
        self._lock = threading.Lock()  # holders are prepared in threads; commands.sh is shared
        self.env = dict(os.environ)
        # The SuperLink/SuperNodes launch flower-superexec, flwr-serverapp, flwr-clientapp from PATH.
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        # Else the SuperLink would `uv sync` the app's dependencies (GBs of other torch wheels).
        self.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        # The FAB carries no data files: the apps find the bundled sample through this.
        self.env.setdefault("FEDISTILL_MNIST10K", str(ROOT / "distill" / "assets" / "mnist10k.npz"))

    # -- helpers
    def home(self, name: str) -> Path:
        """Each process gets its own FLWR_HOME: nodes install the FAB there, concurrently."""
        path = self.workdir / "flwr-home" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def holder(self, i: int) -> Path:
        """Demo holder ``i``'s own directory: its key pair, ca.crt, approved apps."""
        return self.workdir / "holders" / f"node{i}"

    def _record(self, name: str, cmd: list[str]) -> None:
        with self._lock, open(self.workdir / "commands.sh", "a") as f:
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

    def _proc(self, name: str) -> subprocess.Popen:
        return next(p for n, p in self.procs if n == name)

    def flwr(self, *args: str, timeout: float | None = None, stream: bool = False) -> subprocess.CompletedProcess:
        """A ``flwr`` CLI command against the loopback SuperLink (the operator's side: Control API)."""
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
        """SuperLink and proxy; (demo) each holder's files while the SuperLink boots; the memory cap;
        then each holder's key enrolled and its node started."""
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.workdir / "commands.sh").write_text(
            "# launched by simulations/deploy.py (exact commands), with:\n"
            + "".join(f"export {k}={shlex.quote(self.env[k])}\n"
                      for k in ("PATH", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "FEDISTILL_MNIST10K")))
        if not self.secure:
            log("WARNING: --insecure: no TLS (everything, synthetic sets included, in clear text) and no node "
                "authentication (any process that reaches the proxy joins as a node). Loopback tries only.")
        superlink = self.start_superlink()
        self.start_proxy()
        if self.node_configs and self.approved is None:
            stage_app(self.app, force=True)  # fresh: what the holders approve is what `submit` sends
        holders = [self.demo_holder(i) for i in range(len(self.node_configs))]
        wait_for_text("Application startup complete", superlink, self.logs / "superlink.log", self.timeout)
        if self.serverapp_max_rss:
            self.watchdog = ServerAppWatchdog(superlink.pid, int(self.serverapp_max_rss)).start()
            log(f"ServerApp memory cap: {self.serverapp_max_rss / GIB:.2f} GiB resident (--serverapp-max-rss)")
        if self.secure and holders:
            with ThreadPoolExecutor(len(holders)) as pool:  # one `flwr` CLI process each, at once
                list(pool.map(lambda i: self.register(holders[i] / "node.pub", f"node{i}"), range(len(holders))))
        for i, (node_config, holder) in enumerate(zip(self.node_configs, holders)):
            self.start_node(f"node{i}", node_config, holder)
        for name, node in self.procs:
            if name.startswith("node"):
                wait_for_text("SuperNode ID:", node, self.logs / f"{name}.log", self.timeout)
        if self.node_configs:
            log(f"{len(self.node_configs)} SuperNodes connected through the Fleet proxy")
        return self

    def start_superlink(self) -> subprocess.Popen:
        """``flower-superlink`` on 127.0.0.1 only: its Control and Runtime APIs never face the network."""
        self.port = self.port or free_port()
        if self.fresh_state:
            self.database.unlink(missing_ok=True)  # a fresh federation each time
        if self.secure:
            self.tls = ensure_certs(self.workdir, self.hosts) if self.manage_certs else superlink_tls(self.workdir,
                                                                                                     self.hosts)
            for line in expiry_lines([self.tls.superlink_ca, self.tls.server_cert]):
                log(line)
        self._write_connection()
        log(f"SuperLink ({'TLS + node authentication' if self.secure else 'INSECURE'}) on {HOST}:{self.port} "
            f"(Fleet, Control, Runtime APIs; loopback only)")
        return self._spawn("superlink", self.superlink_command())[0]

    @property
    def database(self) -> Path:
        return self.workdir / "superlink-state.db"

    def superlink_command(self) -> list[str]:
        """Bound to 127.0.0.1; given only ``superlink/`` (server key, certificate, ca.crt), never ``ca/``."""
        cmd = ["flower-superlink", "--host", HOST, "--port", str(self.port), "--database", str(self.database),
               "--disable-runtime-dependency-installation"]
        if not self.secure:
            return cmd + ["--insecure"]
        assert self.tls is not None
        return cmd + ["--ssl-ca-certfile", str(self.tls.superlink_ca), "--ssl-certfile", str(self.tls.server_cert),
                      "--ssl-keyfile", str(self.tls.server_key), "--enable-supernode-auth"]

    def proxy_command(self) -> list[str]:
        """The node-facing listener: Fleet routes only, TLS with the SuperLink's own certificate."""
        cmd = [sys.executable, "-m", "simulations.fleet_proxy", "--listen", f"{self.public_host}:{self.public_port}",
               "--upstream", f"{HOST}:{self.port}"]
        if self.node_configs:  # the demo's nodes all connect from 127.0.0.1: one address, every node's connections
            cmd += ["--max-connections-per-ip", str(max(16, 8 * len(self.node_configs)))]
        if not self.secure:
            return cmd + ["--insecure", "--upstream-insecure"]
        assert self.tls is not None
        return cmd + ["--certfile", str(self.tls.server_cert), "--keyfile", str(self.tls.server_key),
                      "--upstream-ca", str(self.tls.superlink_ca)]

    def start_proxy(self) -> subprocess.Popen:
        """Start the proxy (simulations/fleet_proxy.py) and wait until it listens."""
        self.public_port = self.public_port or free_port()
        proc, logfile = self._spawn("fleet-proxy", self.proxy_command())
        wait_for_text("listening on", proc, logfile, self.timeout)
        log(f"Fleet proxy on {self.public_host}:{self.public_port} -> {HOST}:{self.port} (Fleet API only)")
        return proc

    def demo_holder(self, i: int) -> Path:
        """DEMO ONLY: play data holder ``i`` on this machine: its key pair, the CA certificate it was
        handed, the apps it approved. A real holder makes its own key pair (`deploy.py node-key`),
        sends only the .pub, and approves an app after reviewing it (`python -m client.approval add`)."""
        d = self.holder(i)
        if not self.secure and not self.approval:
            return d
        _private_dir(d)
        if self.secure:
            assert self.tls is not None
            _, pub = make_node_key(d)
            shutil.copyfile(self.tls.ca_cert, d / "ca.crt")
            log(f"DEMO ONLY: node{i}'s key pair made here, playing its holder (`deploy.py node-key`); "
                f"only {pub} is enrolled")
        if self.approval:
            allowlist = d / "approved-apps.txt"
            allowlist.unlink(missing_ok=True)
            for app in [self.app] if self.approved is None else self.approved[i]:
                self.approve(allowlist, Path(app), label=f"demo: reviewed by node{i}")
        return d

    def approve(self, allowlist: Path, app: Path, label: str) -> str:
        """What a holder does after reviewing an app: add its FAB hash to the node's allowlist
        (in this process: the same as ``python -m client.approval add``, recorded as that)."""
        from client.approval import add

        self._record("approve", [sys.executable, "-m", "client.approval", "add", str(allowlist), str(app),
                                 "--label", label])
        digest, _ = add(allowlist, app, label)
        log(f"{allowlist.parent.name} approves app {digest[:16]}... ({app})")
        return digest

    def register(self, public_key: Path, name: str) -> None:
        """Enroll a node's public key (Control API on 127.0.0.1: `flwr supernode register`)."""
        check_public_key(public_key)
        res = self.flwr("supernode", "register", str(public_key), CONNECTION, "--name", name, timeout=self.timeout)
        if res.returncode != 0:
            raise RuntimeError(f"flwr supernode register {public_key} failed:\n{res.stdout}{res.stderr}")

    def node_command(self, node_config: str, holder: Path, private_key: Path | None = None) -> list[str]:
        """A SuperNode that connects to the proxy, never to the SuperLink's own port."""
        base = ([sys.executable, "-m", "client.supernode", "--approved-apps", str(holder / "approved-apps.txt")]
                if self.approval else ["flower-supernode"])
        cmd = base + ["--superlink", f"{HOST}:{self.public_port}", "--host", HOST, "--port", str(free_port()),
                      "--node-config", node_config]
        if not self.secure:
            return cmd + ["--insecure"]
        key = private_key if private_key is not None else holder / "node"
        return cmd + ["--root-certificates", str(holder / "ca.crt"), "--auth-supernode-private-key", str(key)]

    def start_node(self, name: str, node_config: str, holder: Path,
                   private_key: Path | None = None) -> subprocess.Popen:
        log(f"{name}: {node_config}")
        return self._spawn(name, self.node_command(node_config, holder, private_key))[0]

    def _write_connection(self) -> None:
        """The operator's CLI connection: the SuperLink itself on 127.0.0.1 (Control API)."""
        security = f'root-certificates = "{self.tls.superlink_ca}"' if self.secure and self.tls else "insecure = true"
        (self.home("cli") / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{HOST}:{self.port}"\n{security}\n')

    def submit(self, run_config: Sequence[str] = (), runs_dir: Path = ROOT / "runs", timeout: float = 1800.0,
               app: Path | None = None) -> Path:
        """``flwr run <staged app> deploy --stream`` and wait for the run to end; returns its run store."""
        runs_dir = Path(runs_dir).resolve()
        runs_dir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        res = self.run_app(app or self._staged(), [f'runs-dir="{runs_dir}" '
                                                   f"min-available-nodes={len(self.node_configs)}", *run_config],
                           timeout)
        done = sorted((p.parent for p in runs_dir.glob("*/summary.json") if p.stat().st_mtime >= started - 1),
                      key=lambda p: (p / "summary.json").stat().st_mtime)  # a new store, or a resumed one
        if res.returncode != 0 or not done:
            killed = (" (the memory cap killed the ServerApp: see above)"
                      if self.watchdog and self.watchdog.kills else "")
            raise RuntimeError(f"flwr run ended with {res.returncode} and no run store under {runs_dir} has a new "
                               f"summary.json{killed}; end of the run's log ({self.logs / 'flwr-run.log'}):\n"
                               f"{res.stdout}")
        return done[-1]

    def run_app(self, app: Path, run_config: Sequence[str] = (),
                timeout: float = 1800.0) -> subprocess.CompletedProcess:
        """Submit ``app`` as the operator (Control API on 127.0.0.1) and stream its log to the end."""
        args = ["run", str(app), CONNECTION, "--stream"]
        for c in run_config:
            args += ["-c", c]
        return self.flwr(*args, timeout=timeout, stream=True)

    def _staged(self) -> Path:
        if not (self.app / "pyproject.toml").is_file():
            stage_app(self.app, force=True)
        return self.app

    def stop(self) -> None:
        """Stop every process started here by PID (and their descendants): the nodes first, so
        they can unregister while the SuperLink is still up, then the proxy and the SuperLink."""
        t0 = time.perf_counter()
        if self.watchdog:
            self.watchdog.stop()
        stop_processes([proc for name, proc in self.procs if name not in ("superlink", "fleet-proxy")])
        stop_processes([proc for name, proc in self.procs if name in ("superlink", "fleet-proxy")])
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
             timeout: float, approval: bool = True, max_rss: float | None = DEFAULT_MAX_RSS_GIB * GIB) -> dict:
    """Start a deployment, submit one run, stop everything; timings and the run's summary."""
    t0 = time.perf_counter()
    with Deployment(node_configs, secure=mode == "secure", approval=approval, workdir=workdir,
                    serverapp_max_rss=max_rss) as dep:
        t1 = time.perf_counter()
        run = dep.submit(run_config, runs_dir=runs_dir, timeout=timeout)
        t2 = time.perf_counter()
    summary = json.loads((run / "summary.json").read_text())
    return {"mode": mode, "nodes": len(node_configs), "approval": approval, "startup-s": round(t1 - t0, 1),
            "flwr-run-s": round(t2 - t1, 1), "total-s": round(time.perf_counter() - t0, 1),
            "server-wall-s": round(float(summary.get("wall-seconds", float("nan"))), 1),
            "status": summary.get("status"), "accepted": summary.get("accepted"),
            "accuracy": summary.get("accuracy"), "run": str(run)}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) reaches this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


def serve(workdir: Path, hosts: Sequence[str], bind: str, public_port: int, port: int, secure: bool,
          max_rss: float | None) -> int:
    """The operator's long-running SuperLink: loopback SuperLink, public Fleet proxy, memory cap.

    The CA is not touched (it stays in ``workdir/ca``, ideally offline): certificates come from
    ``deploy.py certs``. The SuperLink database persists across restarts (enrolled nodes stay).
    """
    dep = Deployment([], secure=secure, workdir=workdir, serverapp_max_rss=max_rss, hosts=hosts,
                     public_host=bind, public_port=public_port, port=port, fresh_state=False, manage_certs=False)
    with _sigterm_as_exit(), dep:
        log(f"serving. Operator: FLWR_HOME={dep.home('cli')} flwr run <app> {CONNECTION} --stream | "
            f"flwr ls {CONNECTION} | flwr supernode ls {CONNECTION}; Ctrl-C stops.")
        superlink = dep._proc("superlink")
        while superlink.poll() is None:
            time.sleep(1)
        log(f"SuperLink exited with {superlink.returncode}:\n{tail(dep.logs / 'superlink.log')}")
        return 1


def register_cli(workdir: Path, keys: Sequence[Path], names: Sequence[str]) -> int:
    """Enroll public keys the holders sent, against the SuperLink `serve` runs on this machine."""
    for key in keys:  # every file checked before anything is sent
        check_public_key(key)
    home = Path(workdir).resolve() / "flwr-home" / "cli"
    if not (home / "config.toml").is_file():
        raise SystemExit(f"no CLI connection in {home}: start `deploy.py serve {workdir}` first")
    for i, key in enumerate(keys):
        name = names[i] if i < len(names) else Path(key).stem
        cmd = [str(Path(sys.executable).parent / "flwr"), "supernode", "register", str(key), CONNECTION, "--name", name]
        res = subprocess.run(cmd, env={**os.environ, "FLWR_HOME": str(home)}, capture_output=True, text=True)
        print(res.stdout + res.stderr, end="")
        if res.returncode != 0:
            return res.returncode
    return 0


def _add_demo_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--workdir", type=Path, default=ROOT / ".deploy")
    s.add_argument("--runs-dir", type=Path, default=ROOT / "runs", help="where the ServerApp writes run stores")
    s.add_argument("--data", choices=("split", "partition"), default="split",
                   help="split: one .npz per node cut from the bundled sample (node-config data-path); "
                        "partition: node-config partition-id/num-partitions of the run's dataset")
    s.add_argument("-c", "--run-config", action="append", default=[], help="run-config overrides, as flwr run -c")
    s.add_argument("--timeout", type=float, default=1800.0, help="seconds a run may take")
    s.add_argument("--no-approval", action="store_true",
                   help="plain flower-supernode: nodes run any app the SuperLink sends (not for real data)")
    _add_rss_arg(s)


def _add_rss_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument("--serverapp-max-rss", type=float, default=DEFAULT_MAX_RSS_GIB, metavar="GIB",
                   help="kill the ServerApp process tree when its resident memory passes this (0: no cap)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="loopback demo: SuperLink, proxy, N nodes, one run (makes the holders' "
                                     "keys itself: DEMO ONLY)")
    _add_demo_args(run)
    run.add_argument("--nodes", type=int, default=2)
    run.add_argument("--node-config", action="append", default=[],
                     help="one per node (sets the node count), e.g. 'data-path=\"/data/a.npz\" data-name=\"mnist\"'")
    run.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (prints a warning)")
    for legacy in ("--tls", "--auth"):  # the old opt-ins: now the default
        run.add_argument(legacy, action="store_true", help=argparse.SUPPRESS)
    bench = sub.add_parser("bench", help="loopback demo runs, wall time per setting (DEMO ONLY keys)")
    _add_demo_args(bench)
    bench.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    bench.add_argument("--modes", nargs="+", choices=MODES, default=["secure"])
    bench.add_argument("--out", type=Path, default=ROOT / "bench_results" / "deploy_timing.jsonl")

    certs = sub.add_parser("certs", help="operator: make or refresh the CA (WORKDIR/ca) and the SuperLink's "
                                         "certificate (WORKDIR/superlink); print their expiry")
    certs.add_argument("workdir", type=Path)
    certs.add_argument("--host", action="append", default=[],
                       help="a DNS name or IP nodes reach the proxy at (repeat); localhost and 127.0.0.1 are "
                            "always in. A different set than last time makes a new server certificate")
    certs.add_argument("--ca-days", type=int, default=CA_DAYS)
    certs.add_argument("--server-days", type=int, default=SERVER_DAYS)
    srv = sub.add_parser("serve", help="operator: SuperLink on 127.0.0.1, Fleet proxy for the nodes, memory cap")
    srv.add_argument("workdir", type=Path)
    srv.add_argument("--host", action="append", default=[],
                     help="as given to `certs` (checked against the certificate)")
    srv.add_argument("--bind", default="0.0.0.0", help="address the Fleet proxy listens on")
    srv.add_argument("--public-port", type=int, default=9092, help="the nodes' port (Fleet API only)")
    srv.add_argument("--port", type=int, default=9093, help="the SuperLink's own port, on 127.0.0.1 only")
    srv.add_argument("--insecure", action="store_true",
                     help="no TLS, no node authentication (prints a warning); only with a loopback --bind")
    srv.add_argument("--insecure-public", action="store_true",
                     help="allow --insecure on a non-loopback --bind: any host that reaches it joins as a node "
                          "and reads every message in clear text")
    _add_rss_arg(srv)
    reg = sub.add_parser("register", help="operator: enroll public keys holders sent (refuses private keys)")
    reg.add_argument("workdir", type=Path)
    reg.add_argument("keys", type=Path, nargs="+")
    reg.add_argument("--name", action="append", default=[], help="one per key, in order (default: file stem)")
    key = sub.add_parser("node-key", help="data holder: make this node's key pair; send only the .pub")
    key.add_argument("directory", type=Path)
    key.add_argument("--name", default="node")
    stage = sub.add_parser("stage", help="operator: copy the app's sources to DIR (what `flwr run DIR` sends and "
                                         "holders review) and print its FAB hash")
    stage.add_argument("directory", type=Path)
    split = sub.add_parser("split", help="per-node .npz files from the bundled sample")
    split.add_argument("directory", type=Path)
    split.add_argument("n", type=int)
    return p


def _max_rss(args: argparse.Namespace) -> float | None:
    return args.serverapp_max_rss * GIB if args.serverapp_max_rss > 0 else None


def _main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "certs":
        files = ensure_certs(args.workdir, args.host, args.ca_days, args.server_days)
        print(f"CA (keep apart; never give ca.key to the SuperLink): {files.ca_dir}\n"
              f"SuperLink + proxy files: {files.superlink_dir}\nhand to every node: {files.ca_cert}\n"
              f"server certificate names: {', '.join(cert_sans(files.server_cert))}")
        print("\n".join(expiry_lines([files.ca_cert, files.server_cert])))
        return 0
    if args.cmd == "node-key":
        priv, pub = make_node_key(args.directory, args.name)
        print(f"private key (stays here, 0600): {priv}\nsend this to the operator: {pub}")
        return 0
    if args.cmd == "register":
        return register_cli(args.workdir, args.keys, args.name)
    if args.cmd == "stage":
        from client.approval import hash_source

        app = stage_app(args.directory)
        print(f"staged app: {app}\nFAB hash (holders approve this after review): {hash_source(app)}")
        return 0
    if args.cmd == "split":
        print("\n".join(str(x) for x in split_data(args.directory, args.n)))
        return 0
    if args.cmd == "serve":
        if args.insecure and not is_loopback(args.bind) and not args.insecure_public:
            _parser().error(f"--insecure with --bind {args.bind}: clear text and no node authentication on a "
                            "non-loopback address; bind 127.0.0.1, drop --insecure, or add --insecure-public")
        return serve(args.workdir, args.host, args.bind, args.public_port, args.port, not args.insecure,
                     _max_rss(args))

    with _sigterm_as_exit():
        if args.cmd == "run":
            mode = "insecure" if args.insecure else "secure"
            configs = args.node_config or node_configs_for(args.nodes, args.data, args.workdir.resolve() / "data",
                                                           run_config_dataset(args.run_config))
            result = run_once(configs, mode, args.run_config, args.workdir, args.runs_dir, args.timeout,
                              not args.no_approval, _max_rss(args))
            print(json.dumps(result, indent=1))
            return 0 if result["status"] == "ok" else 1
        rows = []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for n in args.nodes:
            configs = node_configs_for(n, args.data, args.workdir.resolve() / "data", run_config_dataset(args.run_config))
            for mode in args.modes:
                row = run_once(configs, mode, args.run_config, args.workdir, args.runs_dir, args.timeout,
                               not args.no_approval, _max_rss(args))
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
