"""Resume a fedistill run from its run store after a crash (``resume = "<run dir>"``).

The contract (docs/reliability.md):

- A round is complete when its line is in ``metrics.jsonl``: that line is the round's last
  write (after its sets and model), and every write is atomic, so a half-written file is
  never read. Rounds after the last complete one are played again.
- The pool is rebuilt from the sets the complete rounds list as accepted
  (``accepted-nodes``), each validated again on load (``allow_pickle=False``). A listed set that
  fails validation is quarantined (moved to ``sets/quarantined/`` beside a ``.reason.txt``) and the
  run goes on without it: the node's latest valid set, if an earlier round left one, stays in the
  pool. The next round's line and summary.json list it (``resume-quarantined``). One bad file
  cannot make a crashed run restart from scratch; a missing or unreadable one stops the resume.
- Sets written by an interrupted round are moved to ``sets/interrupted/`` (kept, never
  loaded); temp files of interrupted writes are deleted.
- The global model is the checkpoint of the last complete round that trained
  (``models/roundRRR.pt``, ``torch.load(weights_only=True)``).
- Settings come from the run's ``config.json``, not from the restarting command, read through
  :func:`distill.store_format.read_config`: an older store format is migrated, a newer one refused.
- DP runs resume too: a node's privacy ledger is a file on its own disk, not Flower run state,
  so a resumed run (a new Flower run) does not reset what the node has spent. Its stored sets'
  privacy figures are validated again like every other check (``check_stored_set``), and the
  summary's privacy part is rebuilt from recorded figures that pass validation again.

Server-side randomness derives from (run seed, round) only and client seeds from (run seed,
partition, round), so a seeded run resumed after round k ends as an uninterrupted one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from distill.data import DatasetInfo
from distill.networks import network_for
from distill.store_format import SetName, StoreFormatError, model_path, read_config, set_path, stored_sets

from .pool import SyntheticPool
from .rounds import RunState, expectation
from .settings import RunSettings
from .store import RunStore
from .validate import check_stored_set
from .wire import is_int

log = logging.getLogger("fedistill.server")


class ResumeError(RuntimeError):
    """A run store that cannot be resumed safely; the message says why."""


def resume_settings(run_dir: str | Path) -> RunSettings:
    """The run's own settings (``config.json``), with ``resume`` pointing at it."""
    root = Path(run_dir)
    try:
        settings = RunSettings.from_run_config({**read_config(root), "resume": str(root)})
    except StoreFormatError as err:  # its message names the store, its format and the supported ones
        raise ResumeError(str(err)) from err
    except (OSError, ValueError, TypeError) as err:
        raise ResumeError(f"{root}: no readable config.json to resume from ({err})") from err
    if settings.task.algorithm != "fedistill":
        raise ResumeError(f"{root}: a FedAvg run store holds no synthetic sets; resume continues fedistill runs "
                          "(a FedAvg run restarts from scratch)")
    return settings


def open_store(run_dir: str | Path) -> tuple[RunStore, list[dict]]:
    """The run store and its complete rounds' lines, checked: rounds 1..k, the fields resume reads well typed."""
    try:
        store = RunStore.open(run_dir)
    except (OSError, ValueError) as err:
        raise ResumeError(f"{run_dir}: unreadable metrics.jsonl ({err})") from err
    metrics = store.metrics
    if [m.get("round") for m in metrics] != list(range(1, len(metrics) + 1)):
        raise ResumeError(f"{store.root}: metrics.jsonl rounds are not 1..{len(metrics)}")
    check_round_fields(store, metrics)
    return store, metrics


def open_run(settings: RunSettings, info: DatasetInfo) -> tuple[RunStore, RunState]:
    """The run store and the state after its last complete round, ready for the next round."""
    store, metrics = open_store(settings.resume)
    removed = store.remove_temp_files()
    moved = quarantine_interrupted_sets(store, metrics)
    quarantined: list[str] = []
    state = RunState(pool=load_pool(store, settings, info, metrics, quarantined), last_round=len(metrics),
                     resumed_after=len(metrics), quarantined=quarantined)
    for m in metrics:
        state.uploaded.update({int(n): int(b) for n, b in m.get("uploaded-bytes", {}).items()})
    state.net = load_net(store, settings, info, metrics)
    log.warning("fedistill: resuming %s after round %d: %d sets in the pool, %d interrupted sets set aside, "
                "%d temp files removed", store.root, len(metrics), len(state.pool), len(moved), len(removed))
    return store, state


def check_round_fields(store: RunStore, metrics: list[dict]) -> None:
    """Refuse (as :class:`ResumeError`) metrics lines whose fields the resume reads have the wrong type."""
    for m in metrics:
        nodes, uploaded = m.get("accepted-nodes", []), m.get("uploaded-bytes", {})
        if not (isinstance(nodes, list) and all(is_int(n) for n in nodes)):
            raise ResumeError(f"{store.root}: round {m['round']}: accepted-nodes is not a list of node ids: {nodes!r}")
        if not (isinstance(uploaded, dict) and all(k.lstrip("-").isdigit() and is_int(b) and b >= 0
                                                   for k, b in uploaded.items())):
            raise ResumeError(f"{store.root}: round {m['round']}: uploaded-bytes is not {{node id: bytes}}: "
                              f"{uploaded!r}")


def accepted_pool(settings: RunSettings, info: DatasetInfo) -> tuple[SyntheticPool, list[str]]:
    """The pool a resume of ``settings.resume`` starts from, and the sets quarantined on the way
    (:func:`load_pool`: each set validated again against the run's own settings); nothing else in the
    store changes (no temp files removed, no interrupted sets moved, no model restored). For scripts
    that train on a stored pool (``simulations/retrain_pool.py``): a tampered set is never trained on.
    """
    store, metrics = open_store(settings.resume)
    quarantined: list[str] = []
    return load_pool(store, settings, info, metrics, quarantined), quarantined


def quarantine_interrupted_sets(store: RunStore, metrics: list[dict]) -> list[Path]:
    """Move sets no complete round lists as accepted to ``sets/interrupted/`` (kept, not loaded)."""
    listed = {SetName(m["round"], int(n)) for m in metrics for n in m.get("accepted-nodes", [])}
    target = store.root / "sets" / "interrupted"
    moved = []
    for name, path in stored_sets(store.root):
        if name not in listed:
            target.mkdir(exist_ok=True)
            moved.append(path.replace(target / path.name))
    return moved


def load_pool(store: RunStore, settings: RunSettings, info: DatasetInfo, metrics: list[dict],
              quarantined: list[str] | None = None) -> SyntheticPool:
    """Latest accepted set per node over the complete rounds, each validated again; a set that
    fails is quarantined with its reason (appended to ``quarantined``) and left out."""
    pool = SyntheticPool()
    for record in metrics:
        exp = expectation(settings, info, record["round"])
        for node in record.get("accepted-nodes", []):
            path = store.root / set_path(record["round"], int(node))
            if not path.exists():
                raise ResumeError(f"{path}: an accepted set is missing (a store that lost files is not resumed)")
            try:
                pool.update(int(node), check_stored_set(path, exp))
            except PermissionError as err:  # the disk's fault, not the set's: never quarantine for it
                raise ResumeError(f"{path}: unreadable ({err})") from err
            except Exception as err:  # noqa: BLE001 - a damaged file raises anything (BadZipFile, EOFError, ...)
                reason = f"{type(err).__name__}: {str(err)[:300]}"
                quarantine_set(store, path, reason)
                if quarantined is not None:
                    quarantined.append(f"{set_path(record['round'], int(node))}: {reason}")
    return pool


def quarantine_set(store: RunStore, path: Path, reason: str) -> None:
    """Move a stored set that failed validation to ``sets/quarantined/`` with a ``.reason.txt``."""
    target = store.root / "sets" / "quarantined"
    target.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.replace(target / path.name)
    store.write(f"sets/quarantined/{path.name}.reason.txt", lambda f: f.write(reason + "\n"))
    log.error("fedistill: resume: %s quarantined: %s", path.name, reason)


def load_net(store: RunStore, settings: RunSettings, info: DatasetInfo, metrics: list[dict]):
    """The global model of the last complete round that trained, or ``None``; also restores global_model.pt."""
    trained = [m["round"] for m in metrics if m.get("accuracy") is not None]
    if not trained:
        return None
    path = model_path(trained[-1])
    task = settings.task
    net = network_for(info, seed=task.seed, width=task.net_width, depth=task.net_depth)
    try:
        net.load_state_dict(store.load_model(path))
    except Exception as err:  # noqa: BLE001 - unpickling refusal, missing file, wrong keys or shapes
        raise ResumeError(f"{store.root / path}: unusable checkpoint ({type(err).__name__}: {err})") from err
    store.save_model(net.state_dict())  # global_model.pt may hold an interrupted round's model
    return net
