"""Real crashes inside run-store writes: a seeded run SIGKILLs itself mid-write, another process resumes it.

Why: the resume tests in ``test_server_resume.py`` simulate a kill (a patched ``write`` raises
before writing), so they never see a temp file cut half-way, a file written but not fsynced, or
one renamed before its folder is fsynced. Here the process doing the write really dies
(``os.kill(os.getpid(), SIGKILL)``: no ``finally``, no ``except BaseException`` cleanup, no
buffered data flushed), at one of four points of :func:`distill.atomic.atomic_write`:

- ``mid-write``: half of the file's bytes are in the temp file (flushed, not fsynced);
- ``before-fsync``: all bytes written and flushed, the temp file not fsynced;
- ``before-replace``: the temp file fsynced, not yet renamed over its target;
- ``before-dir-fsync``: renamed, the folder not fsynced.

The point is chosen by (the run's n-th store write, phase); the hooks (``RunStore.write``,
``os.fdopen``, ``os.fsync``, ``os.replace``) are installed in the killed process only, never in
pytest's or the resuming process. A second process resumes the run (``resume = run dir``, the
same node ids: ``InProcessGrid`` numbers its nodes 101, 102, ... every time) and
:func:`exercise` compares the result with an uninterrupted run of the same seed.

Processes: ``python -m tests.kill_harness child SPEC`` runs one run in a fresh interpreter
(:func:`exec_launch`). Starting torch and Flower costs ~5 s per interpreter on the 2-core CI
machine, so the tests use :class:`Zygote` instead: one ``python -m tests.kill_harness serve``
process (not a fork of pytest) imports them once and forks a new process per run; the forked
process holds no run state (nothing ran in the zygote), is killed or exits on its own, and the
next run is another fork. ``simulations/bench_kills.py`` runs every point either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
# The tiniest iterative run whose round 2 depends on round 1 (its model, its sampling): 3 nodes,
# 2 sampled per round, 2 rounds, 12 store writes.
CONFIG: dict[str, Any] = {
    "mode": "iterative", "num-server-rounds": 2, "iterations": 1, "ipc": 2, "dm.batch-real": 8, "net-width": 8,
    "net-depth": 1, "server-epochs": 1, "server-dsa": False, "fraction-train": 0.5, "min-train-nodes": 2,
    "min-available-nodes": 3, "fraction-evaluate": 0.5, "seed": 0,
    "round-timeout": 60.0}  # a client that raises sends nothing: fail in a minute, not in 30
NODES = 3
PHASES = ("mid-write", "before-fsync", "before-replace", "before-dir-fsync")
TIMING = {"elapsed-seconds", "train-seconds", "client-seconds-max", "resumed-after-round"}
TEMP_GLOBS = (".*.tmp", "*.tmp.npz")  # as server.store.TEMP_GLOBS (not imported: the parent stays light)
SET_NAME = re.compile(r"sets/round(\d+)-node(-?\d+)\.npz")
MODEL_NAME = re.compile(r"models/round(\d+)\.pt")
CHILD_TIMEOUT_S = 300

Spec = dict[str, Any]
Launch = Callable[[Spec], int]  # runs one child run, returns its exit code (-9: SIGKILLed)


# -- the child: one run, maybe killed mid-write ----------------------------------------------

class _Trace:
    """Append-only event log of the store's writes; ``os.write`` so a SIGKILL loses nothing."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def event(self, **fields: Any) -> None:
        os.write(self.fd, (json.dumps(fields, sort_keys=True) + "\n").encode())


class _Hooks:
    """Counts the store's writes and bytes, and kills the process at ``kill`` (n, phase, at bytes)."""

    def __init__(self, trace: _Trace, kill: dict[str, Any] | None) -> None:
        self.trace, self.kill = trace, kill
        self.n = 0
        self.active: tuple[int, str] | None = None  # (write number, relpath) while a store write runs
        self.streamed = 0

    def targeted(self, phase: str) -> bool:
        return (self.kill is not None and self.active is not None and self.active[0] == self.kill["write"]
                and self.kill["phase"] == phase)

    def die(self, phase: str) -> None:
        n, relpath = self.active or (0, "?")
        self.trace.event(event="kill", n=n, path=relpath, phase=phase, streamed=self.streamed)
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # never reached: SIGKILL cannot be caught


class _CountingFile:
    """The temp file of a store write: counts the bytes streamed into it; at a ``mid-write`` kill
    point writes the first part, flushes it to the file and dies."""

    def __init__(self, inner: Any, hooks: _Hooks) -> None:
        self._inner, self._hooks = inner, hooks

    def write(self, data: Any) -> Any:
        hooks = self._hooks
        size = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if hooks.targeted("mid-write") and hooks.streamed + size >= hooks.kill["at"]:
            cut = hooks.kill["at"] - hooks.streamed
            self._inner.write(data[:cut] if isinstance(data, str) else memoryview(data).cast("B")[:cut])
            self._inner.flush()
            hooks.streamed += cut
            hooks.die("mid-write")
        hooks.streamed += size
        return self._inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> "_CountingFile":
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._inner.__exit__(*exc)


def _install(hooks: _Hooks) -> None:
    """Patch the store and ``os`` in this (child) process only."""
    from server.store import RunStore

    original_write, real_fdopen, real_fsync, real_replace = RunStore.write, os.fdopen, os.fsync, os.replace

    def write(self: RunStore, relpath: str, fn: Callable[[Any], None], mode: str = "w") -> Path:
        hooks.n += 1
        hooks.active, hooks.streamed = (hooks.n, relpath), 0
        hooks.trace.event(event="begin", n=hooks.n, path=relpath)
        try:
            path = original_write(self, relpath, fn, mode)
        finally:
            hooks.active = None
        hooks.trace.event(event="end", n=hooks.n, path=relpath, streamed=hooks.streamed)
        return path

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        f = real_fdopen(fd, *args, **kwargs)
        return _CountingFile(f, hooks) if hooks.active is not None else f

    def fsync(fd: int) -> None:
        if hooks.active is not None:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            if hooks.targeted("before-dir-fsync" if is_dir else "before-fsync"):
                hooks.die("before-dir-fsync" if is_dir else "before-fsync")
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if hooks.targeted("before-replace"):
            hooks.die("before-replace")
        real_replace(src, dst, **kwargs)

    RunStore.write = write  # type: ignore[method-assign]
    os.fdopen, os.fsync, os.replace = fdopen, fsync, replace  # type: ignore[assignment]


def _preload() -> None:
    """What every run imports (torch, its lazily imported compiler stack, Flower, the app)."""
    import torch

    torch.set_num_threads(1)
    import torch._dynamo  # noqa: F401 - imported lazily by the first optimizer: ~2 s per process
    import client.app  # noqa: F401
    import server.app  # noqa: F401
    import tests.flower_fixtures  # noqa: F401


def child(spec: Spec) -> None:
    """One run: ``fresh`` (traced; killed at ``spec["kill"]`` if given) or ``resume`` (untouched)."""
    import torch
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import app as client_app
    from server.app import run
    from tests.flower_fixtures import InProcessGrid

    def logged(msg: Any, context: Any) -> Any:
        """The ClientApp, its exceptions logged (InProcessGrid turns them into silence)."""
        try:
            return client_app(msg, context)
        except Exception:
            traceback.print_exc()
            raise

    torch.set_num_threads(1)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = InProcessGrid(logged, NODES)  # type: ignore[arg-type]
    if spec["mode"] == "fresh":
        _install(_Hooks(_Trace(spec["trace"]), spec.get("kill")))
        run(grid, {}, runs_dir=spec["runs_dir"], **CONFIG)
    else:
        run(grid, {}, resume=spec["run_dir"])


def _child_main(spec: Spec) -> int:
    """Run :func:`child`; the exit code says whether it finished (0) or raised (1, traceback logged)."""
    try:
        child(spec)
        return 0
    except BaseException:  # noqa: BLE001 - reported through the exit code and the log
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _serve() -> None:
    """The zygote: read one JSON spec per line, fork a process for it, answer its exit code."""
    import threading

    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the imports print goes to stderr, never into the protocol
    _preload()
    if threading.active_count() != 1:
        print(f"kill_harness: {threading.active_count()} threads before fork", file=sys.stderr)
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:
            log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os._exit(_child_main(spec))
        _, status = os.waitpid(pid, 0)
        protocol.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")


# -- the parent: launching children ------------------------------------------------------------

def child_env(ledger_dir: Path) -> dict[str, str]:
    """One torch thread (the result depends on the thread count), the repo importable."""
    return dict(os.environ, FEDISTILL_TEST_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
                FEDISTILL_LEDGER_DIR=str(ledger_dir))


def exec_launch(ledger_dir: Path) -> Launch:
    """Each run in a fresh interpreter (slow to start, nothing shared)."""
    def launch(spec: Spec) -> int:
        with open(spec["log"], "ab") as log:
            return subprocess.run([sys.executable, "-m", "tests.kill_harness", "child", json.dumps(spec)],
                                  cwd=ROOT, env=child_env(ledger_dir), stdout=log, stderr=log,
                                  timeout=CHILD_TIMEOUT_S).returncode
    return launch


class Zygote:
    """A ``serve`` process that imports torch and Flower once and forks one process per run."""

    def __init__(self, ledger_dir: Path, log: Path) -> None:
        self._log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.kill_harness", "serve"], cwd=ROOT,
                                     env=child_env(ledger_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1)
        self._answer()

    def _answer(self) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError(f"kill_harness zygote exited ({self.proc.poll()}); see {self._log.name}")
        return json.loads(line)

    def __call__(self, spec: Spec) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        return int(self._answer()["rc"])

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# -- kill points ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Write:
    """One store write of the uninterrupted run: its number, file, name and the bytes streamed."""
    n: int
    path: str
    label: str
    streamed: int


def label_writes(events: list[dict[str, Any]]) -> list[Write]:
    """Name each write by what it is (``set-r2-a``, ``model-r1``, ``metrics-r2``, ...), not by its
    number, so a kill point still means the same file if the server reorders its writes."""
    writes, seen = [], {"set": {}, "global": 0, "metrics": 0}
    for e in (e for e in events if e["event"] == "end"):
        path = e["path"]
        if m := SET_NAME.fullmatch(path):
            rnd = int(m.group(1))
            i = seen["set"].setdefault(rnd, 0)
            seen["set"][rnd] = i + 1
            label = f"set-r{rnd}-{'abcdefghij'[i]}"
        elif m := MODEL_NAME.fullmatch(path):
            label = f"model-r{int(m.group(1))}"
        elif path in ("global_model.pt", "metrics.jsonl"):
            key = "global" if path == "global_model.pt" else "metrics"
            seen[key] += 1
            label = f"{key}-r{seen[key]}"
        else:
            label = Path(path).stem  # config, summary
        writes.append(Write(e["n"], path, label, e["streamed"]))
    return writes


# The run's 12 writes, in the order the server does them (checked against the reference's trace).
WRITE_LABELS = ("config", "set-r1-a", "set-r1-b", "model-r1", "global-r1", "metrics-r1",
                "set-r2-a", "set-r2-b", "model-r2", "global-r2", "metrics-r2", "summary")
# The default part: one per phase, over a set, a round checkpoint and both metrics lines.
DEFAULT_POINTS = ("set-r2-a:mid-write", "model-r1:before-fsync", "metrics-r1:before-replace",
                  "metrics-r2:before-dir-fsync")
ALL_POINTS = tuple(f"{label}:{phase}" for label in WRITE_LABELS for phase in PHASES)


def read_trace(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# -- comparing a resumed run with the uninterrupted one ----------------------------------------

def set_digest(path: Path) -> str | None:
    """The arrays of a stored set (keys, dtypes, shapes, bytes); ``None`` if it does not load.
    Not the file's bytes: ``np.savez`` stamps the zip entries with the time."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            h = hashlib.sha256()
            for key in sorted(f.files):
                a = f[key]
                h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
                h.update(a.tobytes())
            return h.hexdigest()
    except Exception:  # noqa: BLE001 - any damage means the set is lost
        return None


def model_digest(path: Path) -> str | None:
    """A checkpoint's tensors (``weights_only``); ``None`` if it does not load."""
    import torch

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
        h = hashlib.sha256()
        for key in sorted(state):
            t = state[key].detach().cpu().contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()
    except Exception:  # noqa: BLE001
        return None


def read_metrics(root: Path) -> list[dict[str, Any]]:
    path = root / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def comparable(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


def listed_sets(metrics: list[dict[str, Any]]) -> list[str]:
    """Every set a complete round lists as accepted."""
    return [f"sets/round{m['round']:03d}-node{int(n)}.npz" for m in metrics for n in m.get("accepted-nodes", [])]


def sets_of(root: Path) -> dict[str, str | None]:
    return {f"sets/{p.name}": set_digest(p) for p in sorted((root / "sets").glob("*.npz"))}


def models_of(root: Path) -> dict[str, str | None]:
    paths = sorted((root / "models").glob("*.pt")) + [root / "global_model.pt"]
    return {str(p.relative_to(root)): model_digest(p) for p in paths if p.exists()}


@dataclass
class Reference:
    """The uninterrupted run: its folder, its writes, and what a resumed run must equal."""
    root: Path
    writes: list[Write]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    sets: dict[str, str | None] = field(default_factory=dict)
    models: dict[str, str | None] = field(default_factory=dict)
    accuracy: float | None = None

    def write(self, label: str) -> Write:
        (w,) = [w for w in self.writes if w.label == label]
        return w


def reference(launch: Launch, workdir: Path) -> Reference:
    """Run once without a kill, in a child process, and record its writes and results."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {"mode": "fresh", "runs_dir": str(workdir / "runs"), "trace": str(workdir / "trace.jsonl"),
            "log": str(workdir / "log.txt")}
    rc = launch(spec)
    if rc != 0:
        raise RuntimeError(f"reference run failed ({rc}): {_tail(workdir / 'log.txt')}")
    (root,) = (workdir / "runs").iterdir()
    return Reference(root, label_writes(read_trace(workdir / "trace.jsonl")), read_metrics(root), sets_of(root),
                     models_of(root), json.loads((root / "summary.json").read_text())["accuracy"])


@dataclass
class Outcome:
    """What one kill point did, and what the resumed run kept and produced."""
    point: str
    file: str
    write: int
    phase: str
    killed: bool = False  # the child died of SIGKILL at the chosen point
    rounds_complete_at_kill: int = 0
    sets_accepted_at_kill: int = 0
    temp_left_by_kill: bool = False  # the kill left a temp file (cut off, unsynced or unrenamed)
    temp_bytes_at_kill: int = 0  # its size: about half the file's at a mid-write kill
    resume: str = ""  # "ok", or why the resume refused
    resumed_after: list[int] = field(default_factory=list)
    sets_listed: int = 0  # sets the final metrics.jsonl lists as accepted
    sets_lost: list[str] = field(default_factory=list)
    interrupted_not_kept: list[str] = field(default_factory=list)
    metrics_identical: bool = False
    accuracy_identical: bool = False
    sets_identical: bool = False
    models_identical: bool = False
    temp_files_left: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def matches_reference(self) -> bool:
        return (self.resume == "ok" and not self.sets_lost and self.metrics_identical and self.accuracy_identical
                and self.sets_identical and self.models_identical and not self.temp_files_left
                and not self.quarantined and not self.interrupted_not_kept)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "matches_reference": self.matches_reference}


def _temp_files(root: Path) -> list[str]:
    return sorted({str(p.relative_to(root)) for g in TEMP_GLOBS for p in root.rglob(g)})


def _tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def exercise(launch: Launch, workdir: Path, ref: Reference, point: str) -> Outcome:
    """Kill a fresh run at ``point`` (``<write label>:<phase>``), resume it in another process and
    compare it with ``ref``."""
    start = time.monotonic()
    label, phase = point.split(":")
    target = ref.write(label)
    out = Outcome(point, target.path, target.n, phase)
    workdir.mkdir(parents=True, exist_ok=True)
    kill = {"write": target.n, "phase": phase, "at": max(1, target.streamed // 2)}
    spec = {"mode": "fresh", "runs_dir": str(workdir / "runs"), "trace": str(workdir / "trace.jsonl"),
            "log": str(workdir / "killed.log"), "kill": kill}
    rc = launch(spec)
    events = read_trace(workdir / "trace.jsonl")
    kills = [e for e in events if e["event"] == "kill"]
    out.killed = rc == -signal.SIGKILL and len(kills) == 1 and (kills[0]["n"], kills[0]["path"], kills[0]["phase"]) \
        == (target.n, target.path, phase)
    if not out.killed:
        out.resume = f"not killed as planned (exit {rc}, kills {kills}): {_tail(workdir / 'killed.log', 600)}"
        return out
    (root,) = (workdir / "runs").iterdir()
    complete = read_metrics(root)
    accepted = listed_sets(complete)
    before = sets_of(root)
    out.rounds_complete_at_kill, out.sets_accepted_at_kill = len(complete), len(accepted)
    temp = _temp_files(root)
    out.temp_left_by_kill, out.temp_bytes_at_kill = bool(temp), sum((root / t).stat().st_size for t in temp)

    rc = launch({"mode": "resume", "run_dir": str(root), "log": str(workdir / "resume.log")})
    if rc != 0:
        lines = [x for x in _tail(workdir / "resume.log").splitlines() if x.strip()]
        out.resume = f"refused (exit {rc}): {lines[-1] if lines else '?'}"
    else:
        out.resume = "ok"
        out.resumed_after = json.loads((root / "summary.json").read_text()).get("resumed-after-rounds", [])
    final = read_metrics(root)
    listed = listed_sets(final)
    out.sets_listed = len(listed)
    out.sets_lost = sorted({name for name in listed if set_digest(root / name) is None}
                           | {name for name in accepted if set_digest(root / name) != before.get(name)})
    out.interrupted_not_kept = sorted(
        name for name, digest in before.items() if name not in accepted
        and digest not in (set_digest(root / name), set_digest(root / "sets" / "interrupted" / Path(name).name)))
    if out.resume == "ok":
        out.metrics_identical = comparable(final) == comparable(ref.metrics)
        out.accuracy_identical = json.loads((root / "summary.json").read_text())["accuracy"] == ref.accuracy
        out.sets_identical = sets_of(root) == ref.sets
        out.models_identical = models_of(root) == ref.models
    out.temp_files_left = _temp_files(root)
    out.quarantined = sorted(p.name for p in (root / "sets" / "quarantined").glob("*")) \
        if (root / "sets" / "quarantined").exists() else []
    out.seconds = round(time.monotonic() - start, 2)
    return out


def no_config_yet(out: Outcome) -> bool:
    """A kill before ``config.json`` exists: nothing was accepted, so the run starts again from scratch
    and the resume must say why it cannot continue."""
    return out.file == "config.json" and out.phase != "before-dir-fsync"


def summarise(ref: Reference, outcomes: list[Outcome]) -> dict[str, Any]:
    """The figures BENCHMARKS.md quotes: writes per run, kill points, sets lost, identical results."""
    resumed = [o for o in outcomes if not no_config_yet(o)]
    return {
        "writes-per-run": len(ref.writes),
        "files": sorted({w.path for w in ref.writes}),
        "phases": list(PHASES),
        "kill-points": len(outcomes),
        "killed-by-sigkill": sum(o.killed for o in outcomes),
        "kills-leaving-a-temp-file": sum(o.temp_left_by_kill for o in outcomes),
        "resumed": sum(o.resume == "ok" for o in outcomes),
        "refused-no-config-yet": sum(no_config_yet(o) and o.resume.startswith("refused") and "config.json" in o.resume
                                     for o in outcomes),
        "sets-accepted-at-kill": sum(o.sets_accepted_at_kill for o in outcomes),
        "sets-lost": sum(len(o.sets_lost) for o in outcomes),
        "identical-to-uninterrupted": sum(o.matches_reference for o in resumed),
        "of-resumable": len(resumed),
        "outcomes": [o.to_dict() for o in outcomes],
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        _serve()
    elif sys.argv[1:2] == ["child"]:
        raise SystemExit(_child_main(json.loads(sys.argv[2])))
    else:
        raise SystemExit("usage: python -m tests.kill_harness serve | child SPEC")
