"""The run store ``runs/<time>-<name>/``: config, per-round metrics, accepted sets, models, summary.

Every write goes through :meth:`RunStore.write` (:func:`distill.atomic.atomic_write`: temp file, fsync,
``os.replace``, fsync of the folder), so a crash leaves either the previous version of a file or the new one,
never half of one. A round's metrics line is written after its sets and model: a round
is complete exactly when its line is in ``metrics.jsonl`` (server/resume.py relies on it).
Models are plain ``state_dict`` files read back with ``torch.load(weights_only=True)``.
File names and the format of ``config.json`` live in :mod:`distill.store_format` (Flower-free, so
the offline audits read stores with the same code): :meth:`RunStore.write_config` stamps the format,
:func:`read_config` migrates older stores on the way in.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from distill.atomic import atomic_write
from distill.store_format import CONFIG_NAME, model_path, read_config, set_path, stamp_config
from distill.synthetic import SyntheticSet

from .validate import Rejected, RunPrivacy, check_recorded
from .wire import canonical_meta

log = logging.getLogger("fedistill.server")
TEMP_GLOBS = (".*.tmp", "*.tmp.npz")  # what an interrupted atomic write leaves behind
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def safe_run_name(name: str) -> bool:
    """A run name that can only name one folder: letters, digits, ``.``, ``_``, ``-``, no ``..``."""
    return bool(RUN_NAME.fullmatch(name)) and ".." not in name


class RunStore:
    """One run's directory. ``metrics.jsonl`` gets one JSON line per round."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._metrics: list[dict[str, Any]] = []

    @classmethod
    def create(cls, runs_dir: str | Path, name: str, now: float | None = None) -> "RunStore":
        """A fresh ``<runs_dir>/<YYYYmmdd-HHMMSS>-<name>``; a suffix avoids collisions.

        ``name`` must pass :func:`safe_run_name`, and the folder must resolve inside ``runs_dir``
        (a symlink could still point elsewhere): a run-config never writes outside it.
        """
        if not safe_run_name(name):
            raise ValueError(f"unsafe run name {name[:80]!r}: letters, digits, '.', '_' or '-' only, no '..'")
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        base = Path(runs_dir) / f"{stamp}-{name}"
        root, i = base, 1
        while root.exists():
            root, i = Path(f"{base}-{i}"), i + 1
        parent = Path(runs_dir).resolve()
        if root.resolve().parent != parent:
            raise ValueError(f"run folder {root} resolves outside runs-dir {parent}")
        return cls(root)

    @classmethod
    def open(cls, root: str | Path) -> "RunStore":
        """An existing run store, its complete rounds' metrics loaded (to resume it)."""
        store = cls(root)
        if (store.root / "metrics.jsonl").exists():
            store._metrics = read_metrics(store.root)
        return store

    def write(self, relpath: str, write: Callable[[Any], None], mode: str = "w") -> Path:
        """The one way this store writes a file (atomic); tests count and interrupt writes here."""
        return atomic_write(self.root / relpath, write, mode)

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        return self.write(name, lambda f: json.dump(data, f, indent=2, sort_keys=True))

    def write_config(self, run_config: dict[str, Any]) -> Path:
        """``config.json``: the flat run-config, stamped with the store format this code writes."""
        return self.write_json(CONFIG_NAME, stamp_config(run_config))

    def read_config(self) -> dict[str, Any]:
        """The run-config in the current format (:func:`distill.store_format.read_config`)."""
        return read_config(self.root)

    def append_metrics(self, record: dict[str, Any]) -> Path:
        """Add one round's line (the whole file is rewritten atomically: it stays small)."""
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in [*self._metrics, record])
        path = self.write("metrics.jsonl", lambda f: f.write(text))
        self._metrics.append(record)
        return path

    def save_set(self, syn: SyntheticSet, round_: int, node_id: int) -> Path:
        """``sets/roundRRR-nodeN.npz`` (:func:`set_path`) in :meth:`SyntheticSet.load`'s format (no pickles)."""
        payload = dict(syn.to_arrays(), meta_json=np.asarray(canonical_meta(syn.meta)))
        return self.write(set_path(round_, node_id), lambda f: np.savez(f, **payload), mode="wb")

    def save_model(self, state: dict[str, torch.Tensor], round_: int | None = None) -> Path:
        """The global model: ``models/roundRRR.pt`` (kept for resume) when ``round_`` is given, then
        ``global_model.pt`` (the latest)."""
        tensors = {k: v.detach().cpu() for k, v in state.items()}
        if round_ is not None:
            self.write(model_path(round_), lambda f: torch.save(tensors, f), mode="wb")
        return self.write("global_model.pt", lambda f: torch.save(tensors, f), mode="wb")

    def remove_temp_files(self) -> list[Path]:
        """Delete what interrupted writes left (never read: their names are not the store's)."""
        found = sorted({p for pattern in TEMP_GLOBS for p in self.root.rglob(pattern)})
        for path in found:
            path.unlink(missing_ok=True)
        return found

    def load_model(self, name: str = "global_model.pt") -> dict[str, torch.Tensor]:
        """Read a checkpoint without unpickling arbitrary objects."""
        return torch.load(self.root / name, weights_only=True, map_location="cpu")

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return list(self._metrics)


def read_metrics(root: str | Path) -> list[dict[str, Any]]:
    """The per-round records of a finished (or interrupted) run."""
    path = Path(root) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def client_privacy(metrics: list[dict[str, Any]], run: RunPrivacy) -> dict[str, dict[str, Any]]:
    """Per client (node id): total epsilon, delta, accountant, rho, rounds participated and declined.

    Built from the ``privacy`` entries of the round records that pass validation again against
    the run's privacy settings (the records may have been read back from disk, see
    :func:`valid_entries`).
    """
    return _per_client(valid_entries(metrics, run)[0])


def _per_client(entries: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Fold validated entries per client. A client's total is the largest it reported:
    composition never lowers it, so a smaller later figure would be wrong."""
    clients: dict[str, dict[str, Any]] = {}
    for node, figures in entries:
        c = clients.setdefault(node, {"rounds-participated": 0, "rounds-declined": 0})
        c["rounds-declined" if figures["status"] == "declined" else "rounds-participated"] += 1
        for key in ("delta", "accountant", "rho", "privacy-budget"):
            if key in figures:
                c[key] = figures[key]
        if "epsilon-total" in figures:
            c["epsilon-total"] = max(c.get("epsilon-total", 0.0), float(figures["epsilon-total"]))
    return clients


def valid_entries(metrics: list[dict[str, Any]], run: RunPrivacy) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """(node, entry) for every recorded privacy entry that passes :func:`check_recorded`, and how
    many did not (each logged): a forged or tampered entry never reaches summary.json."""
    valid, refused = [], 0
    for record in metrics:
        privacy = record.get("privacy", {})
        for node, entry in (privacy.items() if isinstance(privacy, dict) else [("?", privacy)]):
            try:
                valid.append((str(node), check_recorded(entry, run)))
            except Rejected as err:
                refused += 1
                log.warning("round %s: node %s: privacy entry left out of the summary: %s",
                            record.get("round"), node, err.detail)
    return valid, refused


def privacy_summary(metrics: list[dict[str, Any]], run: RunPrivacy) -> dict[str, Any]:
    """``summary.json``'s privacy part, from validated figures only: per-client figures, the
    largest total epsilon, and how many privacy reports were refused (declines' forged figures
    at their round, and recorded entries that fail validation now)."""
    entries, refused = valid_entries(metrics, run)
    clients = _per_client(entries)
    totals = [c["epsilon-total"] for c in clients.values() if "epsilon-total" in c]
    at_rounds = sum(len(r["privacy-figures-refused"]) for r in metrics
                    if isinstance(r.get("privacy-figures-refused"), list))
    return {"privacy": clients, "epsilon-max": max(totals) if totals else None,
            "privacy-figures-refused": at_rounds + refused}
