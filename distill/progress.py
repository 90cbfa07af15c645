"""Progress bars that suit where the output goes: live on a terminal, sparse in a log.

A tqdm bar redraws many times a second. On a terminal that is one line; in a log file, a Ray
actor's output or Flower's log stream every redraw is a line of its own, thousands per run.
So off a terminal a bar writes about one line per 5 % of its total (or one a minute when the
total is unknown).
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm.auto import tqdm

LOG_STEPS = 20  # lines per bar off a terminal: one per 5 %


def progress(iterable: Iterable[Any], desc: str, enabled: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable)`` with ``desc``; ``enabled=False`` draws nothing."""
    if not enabled:
        return tqdm(iterable, desc=desc, disable=True, **kwargs)
    stream = kwargs.get("file") or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, desc=desc, **kwargs)
    total = kwargs.pop("total", None)
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if total:
        return tqdm(iterable, desc=desc, total=total, miniters=max(1, total // LOG_STEPS), mininterval=0,
                    maxinterval=float("inf"), ascii=True, **kwargs)
    return tqdm(iterable, desc=desc, mininterval=60, ascii=True, **kwargs)
