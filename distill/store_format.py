"""A run store's file names and ``config.json`` format, in the one Flower-free place every reader imports.

A run store (``runs/<time>-<name>/``, written by :mod:`server.store`) keeps each accepted set as
``sets/round<RRR>-node<id>.npz`` and the run-config as ``config.json``, stamped with the store's
format (:data:`FORMAT_KEY`). The server writes and resumes through this module, and so do the offline
readers (``attacks/``, which may import neither Flower nor ``server/``, and ``simulations/``): a
name is made and parsed here only, and every reader of ``config.json`` gets it through
:func:`read_config`, migrated to the current format.

Formats of ``config.json``:

1. no :data:`FORMAT_KEY` (every store written before it existed): the flat run-config. DM's
   ``lr-img`` and ``batch-real`` were flat keys, used only when ``method`` was ``"dm"``.
2. per-method settings are namespaced (``dm.lr-img``, ``dm.batch-real``, ...).

>>> set_name(3, 42)
'round003-node42.npz'
>>> parse_set_name("round003-node42.npz")
SetName(round=3, node=42)
>>> migrate_config({"method": "dm", "lr-img": 0.5})
{'method': 'dm', 'dm.lr-img': 0.5, 'fedistill-store-format': 2}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

CONFIG_NAME = "config.json"
SETS_DIR = "sets"
FORMAT_KEY = "fedistill-store-format"
STORE_FORMAT = 2  # what this code writes
SUPPORTED_FORMATS = (1, 2)  # what it reads (older ones through MIGRATIONS)
_SET_NAME = re.compile(r"round(\d+)-node(-?\d+)\.npz")
_DM_KEYS_V1 = ("lr-img", "batch-real")


class StoreFormatError(ValueError):
    """A ``config.json`` whose format this code does not read; the message names the store and the formats."""


@dataclass(frozen=True)
class SetName:
    """What a stored set's file name says: the round that accepted it and the node that sent it."""

    round: int
    node: int

    @property
    def name(self) -> str:
        return set_name(self.round, self.node)

    @property
    def path(self) -> str:
        """Relative to the run store's root."""
        return f"{SETS_DIR}/{self.name}"


def set_name(round_: int, node: int) -> str:
    """``round<RRR>-node<id>.npz``; ``round_`` >= 1 (rounds count from 1), both plain integers."""
    if not (_plain_int(round_) and _plain_int(node)) or round_ < 1:
        raise ValueError(f"a set's round must be an integer >= 1 and its node an integer, got {round_!r}, {node!r}")
    return f"round{round_:03d}-node{node}.npz"


def set_path(round_: int, node: int) -> str:
    """:func:`set_name` under ``sets/``, relative to the run store's root."""
    return f"{SETS_DIR}/{set_name(round_, node)}"


def model_path(round_: int) -> str:
    """``models/round<RRR>.pt``: the global model checkpoint of a round (kept for resume)."""
    if not _plain_int(round_) or round_ < 1:
        raise ValueError(f"a checkpoint's round must be an integer >= 1, got {round_!r}")
    return f"models/round{round_:03d}.pt"


def parse_set_name(name: str) -> SetName:
    """The round and node in a set's file name; ``ValueError`` for any name :func:`set_name` does not make
    (``round1-node5.npz``, ``node05``, a temp file's name): only the store's own names are its sets."""
    match = _SET_NAME.fullmatch(name)
    parsed = SetName(int(match[1]), int(match[2])) if match else None
    if parsed is None or parsed.round < 1 or parsed.name != name:
        raise ValueError(f"{name[:120]!r} is not a stored set's name (round<RRR>-node<id>.npz)")
    return parsed


def stored_sets(root: str | Path) -> list[tuple[SetName, Path]]:
    """Every file directly under ``<root>/sets/`` named as a stored set, by (round, node); other files
    (temp files, ``interrupted/`` and ``quarantined/`` folders) are not sets of the store."""
    folder = Path(root) / SETS_DIR
    found = []
    for path in folder.iterdir() if folder.is_dir() else []:
        try:
            found.append((parse_set_name(path.name), path))
        except ValueError:
            continue
    return sorted((f for f in found if f[1].is_file()), key=lambda f: (f[0].round, f[0].node))


def stamp_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """What ``config.json`` holds: the flat run-config and the format this code writes."""
    return {**dict(run_config), FORMAT_KEY: STORE_FORMAT}


def config_format(raw: Mapping[str, Any], source: str | Path = CONFIG_NAME) -> int:
    """The format of a ``config.json`` document (1 without :data:`FORMAT_KEY`); :class:`StoreFormatError`
    for a format this code cannot read, naming ``source``, the format and the supported ones."""
    if FORMAT_KEY not in raw:
        return 1
    fmt = raw[FORMAT_KEY]
    supported = ", ".join(map(str, SUPPORTED_FORMATS))
    if not _plain_int(fmt) or fmt < 1:
        raise StoreFormatError(f"{source}: {FORMAT_KEY} must be an integer >= 1, got {fmt!r} "
                               f"(this fedistill reads formats {supported})")
    if fmt not in SUPPORTED_FORMATS:
        raise StoreFormatError(f"{source}: run store format {fmt} is newer than this fedistill reads "
                               f"(formats {supported}); read it with the fedistill that wrote it, or a newer one")
    return fmt


def migrate_config(raw: Mapping[str, Any], source: str | Path = CONFIG_NAME) -> dict[str, Any]:
    """A ``config.json`` document upgraded to :data:`STORE_FORMAT` (stamped with it); ``raw`` is not changed.

    >>> migrate_config({"method": "kip", "lr-img": 0.5, "batch-real": 64})  # ignored by format 1: dropped
    {'method': 'kip', 'fedistill-store-format': 2}
    """
    fmt = config_format(raw, source)
    config = {k: v for k, v in raw.items() if k != FORMAT_KEY}
    for step in range(fmt, STORE_FORMAT):
        config = MIGRATIONS[step](config)
    return stamp_config(config)


def read_config(store_dir: str | Path) -> dict[str, Any]:
    """The run-config of the store at ``store_dir`` in the current format, without :data:`FORMAT_KEY`:
    what ``RunSettings.from_run_config`` takes. The one reader of ``config.json``.

    Raises ``OSError`` when there is none, ``ValueError`` when it is not a JSON object, and
    :class:`StoreFormatError` (a ``ValueError``) for a format this code does not read.
    """
    root = Path(store_dir)
    raw = json.loads((root / CONFIG_NAME).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{root / CONFIG_NAME}: not a JSON object but {type(raw).__name__}")
    config = migrate_config(raw, root)
    del config[FORMAT_KEY]
    return config


def _format_1_to_2(config: dict[str, Any]) -> dict[str, Any]:
    """DM's flat ``lr-img`` / ``batch-real`` become ``dm.lr-img`` / ``dm.batch-real`` when ``method`` was
    ``"dm"`` (format 1's default); under any other method format 1 ignored them, so they go."""
    out = {k: v for k, v in config.items() if k not in _DM_KEYS_V1}
    if config.get("method", "dm") == "dm":
        out.update({f"dm.{k}": config[k] for k in _DM_KEYS_V1 if k in config})
    return out


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _format_1_to_2}  # format -> format + 1


def _plain_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
