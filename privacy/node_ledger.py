"""A node's lifetime privacy ledger: one JSON file on the data holder's disk.

Flower keeps node state in memory for one run, so a cap kept there resets with every new run
and every SuperNode restart. This file is the node's memory instead: every run and every round
is charged to it, under one Opacus accountant at the node's delta, *before* any private data is
read. A lock makes concurrent runs on one node safe; writes are atomic (temp file, fsync,
rename, fsync of the folder). It also keeps noisy releases the node may reuse at no further
cost (its released class counts).

It fails closed: a ledger that exists but cannot be read, is not a ledger, or guards other data
(its ``data_id`` differs) raises :class:`LedgerError`, and the node releases nothing.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "ledger.json")
>>> ledger = NodeLedger(path, data_id="sha256:abc", accountant="rdp", delta=1e-5, cap=4.0)
>>> round(ledger.charge([Spend(1.52, 0.04, 200)], run="r1", round=1, method="dp-dm").lifetime, 2)
2.0
>>> round(NodeLedger(path, "sha256:abc", "rdp", 1e-5, cap=4.0).spent(), 2)
2.0
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from distill.atomic import atomic_write

from .accounting import BudgetExceeded, PrivacyLedger, Spend, epsilon_of

FORMAT = "fedistill-privacy-ledger"
VERSION = 1


class LedgerError(RuntimeError):
    """The ledger cannot be trusted (unreadable, corrupt, other data): release nothing."""


@dataclass(frozen=True)
class Charge:
    """What a successful charge left: the node's lifetime total and this run's total."""

    lifetime: float
    run: float


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _spend(row: Any) -> Spend:
    if not (isinstance(row, list) and len(row) == 3):
        raise ValueError(f"a spend is [sigma, sample_rate, steps], got {row!r}")
    sigma, q, steps = row
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row) or steps != int(steps):
        raise ValueError(f"a spend holds numbers, got {row!r}")
    return Spend(float(sigma), float(q), int(steps))


def parse(text: str, path: str = "ledger") -> dict[str, Any]:
    """Validate a ledger file's text; ``LedgerError`` saying what is wrong."""
    try:
        state = json.loads(text)
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} file")
        if not isinstance(state.get("data_id"), str) or not isinstance(state.get("entries"), list):
            raise ValueError("data_id or entries missing")
        for e in state["entries"]:
            if not isinstance(e, dict) or not isinstance(e.get("run"), str):
                raise ValueError(f"bad entry {e!r}")
            e["spends"] = [_spend(s).to_list() for s in e.get("spends", [])]
        if not isinstance(state.get("releases", {}), dict):
            raise ValueError("releases must be an object")
    except (ValueError, TypeError) as err:
        raise LedgerError(f"{path}: corrupt privacy ledger ({err}); the node releases nothing until a data "
                          "holder repairs or replaces it") from err
    return state


def atomic_write_json(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` so that a crash leaves either the old file or the new one, never half."""
    atomic_write(path, lambda f: json.dump(state, f, indent=1))


class NodeLedger:
    """The ledger file at ``path``, guarding the data identified by ``data_id``.

    ``cap`` is the lifetime epsilon at ``delta`` under ``accountant`` (None: no lifetime cap).
    ``create``: make the file on first use (a node with a policy); otherwise a missing file is
    an error, so a mistyped path never silently starts a fresh budget.
    """

    def __init__(self, path: str | Path, data_id: str, accountant: str, delta: float,
                 cap: float | None = None, create: bool = True) -> None:
        self.path = Path(path).resolve()  # one lock and one file, whatever link or relative path led here
        self.data_id = data_id
        self.base = PrivacyLedger(accountant, delta, cap)  # validates accountant, delta, cap
        self.create = create

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _fresh(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "data_id": self.data_id, "created": _now(),
                "accountant": self.base.accountant, "delta": self.base.delta, "entries": [], "releases": {}}

    def _read(self) -> dict[str, Any]:
        """The current state (caller holds the lock); fail closed on anything doubtful."""
        if not self.path.exists():
            if not self.create:
                raise LedgerError(f"{self.path}: no privacy ledger (create it with `python -m privacy.ledger_cli "
                                  "init`)")
            return self._fresh()
        try:
            text = self.path.read_text()
        except OSError as err:
            raise LedgerError(f"{self.path}: unreadable privacy ledger ({err}); the node releases nothing") from err
        state = parse(text, str(self.path))
        if state["data_id"] != self.data_id:
            raise LedgerError(f"{self.path}: this ledger guards data {state['data_id']!r}, not {self.data_id!r}; a "
                              "ledger never moves to other data (give each data file its own ledger)")
        return state

    def init(self) -> None:
        """Create the file now (``ledger init``); an existing ledger is checked, never reset."""
        with self._locked():
            state = self._read()
            if not self.path.exists():
                atomic_write_json(self.path, state)

    def read(self) -> dict[str, Any]:
        with self._locked():
            return self._read()

    def spent(self, run: str | None = None) -> float:
        """Lifetime epsilon (or one run's) at the ledger's delta, from the file."""
        return epsilon_of(spends_of(self.read(), run), self.base.delta, self.base.accountant)

    def charge(self, spends: Sequence[Spend], *, run: str, round: int, method: str,
               run_budget: PrivacyLedger | None = None, flower_run: str = "") -> Charge:
        """Record ``spends`` if the lifetime cap (and ``run_budget``, this run's cap) allow them.

        ``run_budget`` is a :class:`PrivacyLedger` holding the run's accountant, delta and budget;
        this run's earlier spends are taken from the file: every entry named ``run`` or made in the
        same Flower run ``flower_run``, so renaming the run between rounds does not reset its
        budget. Raises :class:`BudgetExceeded` (nothing written) or :class:`LedgerError`.
        """
        with self._locked():
            state = self._read()
            lifetime = PrivacyLedger(self.base.accountant, self.base.delta, self.base.budget,
                                     spends_of(state))
            total = lifetime.check(spends)
            run_total = 0.0
            if run_budget is not None:
                this_run = PrivacyLedger(run_budget.accountant, run_budget.delta, run_budget.budget,
                                         spends_of(state, run, flower_run))
                run_total = this_run.check(spends)
            state["entries"].append({"run": run, "flower_run": flower_run, "round": int(round), "method": method,
                                     "time": _now(), "spends": [s.to_list() for s in spends]})
            state["accountant"], state["delta"] = self.base.accountant, self.base.delta  # what the cap is held at
            atomic_write_json(self.path, state)
        return Charge(lifetime=total, run=run_total)

    def release(self, name: str) -> Any:
        """A noisy release kept for reuse (e.g. ``class-counts``), or None."""
        return self.read().get("releases", {}).get(name)

    def keep_release(self, name: str, value: Any) -> None:
        """Store a noisy release (already charged) so later runs reuse it at no cost; first one wins."""
        with self._locked():
            state = self._read()
            state.setdefault("releases", {}).setdefault(name, value)
            atomic_write_json(self.path, state)


def file_identity(path: str | Path) -> str:
    """``sha256:<hex>`` of a data file's bytes: what a ledger guards."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def spends_of(state: dict[str, Any], run: str | None = None, flower_run: str = "") -> list[Spend]:
    """Every spend in a ledger state, or only those of ``run`` (or of Flower run ``flower_run``)."""
    def mine(e: dict[str, Any]) -> bool:
        return run is None or e["run"] == run or bool(flower_run and e.get("flower_run") == flower_run)

    return [Spend(*s) for e in state["entries"] if mine(e) for s in e["spends"]]  # parse() checked them


def summary(state: dict[str, Any], accountant: str, delta: float) -> dict[str, Any]:
    """Per run and in total, epsilon at ``delta`` (what `ledger show` prints)."""
    runs: dict[str, list[Spend]] = {}
    rounds: dict[str, int] = {}
    for e in state["entries"]:
        runs.setdefault(e["run"], []).extend(Spend(*s) for s in e["spends"])
        rounds[e["run"]] = rounds.get(e["run"], 0) + 1
    per_run = {r: {"rounds": rounds[r], "epsilon": epsilon_of(s, delta, accountant)} for r, s in runs.items()}
    total = epsilon_of(spends_of(state), delta, accountant)
    return {"data_id": state["data_id"], "accountant": accountant, "delta": delta, "runs": per_run,
            "epsilon_total": total if math.isfinite(total) else None,
            "releases": sorted(state.get("releases", {}))}


__all__ = ["BudgetExceeded", "Charge", "LedgerError", "NodeLedger", "atomic_write_json", "file_identity", "parse", "spends_of",
           "summary"]
