"""One way to put arrays on disk and read them back: atomic ``.npz`` writes, pickle-free reads.

Synthetic sets and expert buffers cross trust boundaries (uploads, shared caches), so a read
never unpickles (object arrays are refused) and a write never leaves half a file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def save_npz_atomic(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` to ``path`` through a temp file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_npz_safely(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of ``path``, read with ``allow_pickle=False``; object arrays raise ``ValueError``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except ValueError as err:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        raise ValueError(f"{path}: refused ({err})") from err
