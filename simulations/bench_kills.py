"""Real SIGKILLs inside every run-store write, then a resume: how many sets are lost, whether the result is the same.

A seeded 2-round iterative run (3 in-process nodes, 2 sampled per round) makes 12 store writes
(config, per round 2 sets + round checkpoint + global model + metrics line, summary). For each
write and each of 4 phases of its atomic write (half the bytes written; written, not fsynced;
fsynced, not renamed; renamed, folder not fsynced) a fresh run kills itself there with SIGKILL,
another process resumes it, and the result is compared with an uninterrupted run
(``tests/kill_harness.py``). Writes a JSON summary for BENCHMARKS.md.

    python simulations/bench_kills.py                    # all 48 points, forked from one warm process
    python simulations/bench_kills.py --exec             # each run in a fresh interpreter (slower)
    python simulations/bench_kills.py --points set-r2-a:mid-write metrics-r1:before-replace
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.kill_harness import (ALL_POINTS, WRITE_LABELS, Zygote, exec_launch, exercise, reference,  # noqa: E402
                                summarise)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", nargs="+", default=list(ALL_POINTS), metavar="LABEL:PHASE")
    p.add_argument("--exec", action="store_true", help="a fresh interpreter per run instead of forks of a warm one")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "kills.json")
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    args = p.parse_args(argv)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-kills-") as tmp:
        work = args.workdir or Path(tmp)
        launch = exec_launch(work / "ledgers") if args.exec else Zygote(work / "ledgers", work / "zygote.log")
        try:
            ref = reference(launch, work / "reference")
            labels = [w.label for w in ref.writes]
            if tuple(labels) != WRITE_LABELS:
                print(f"warning: the run's writes are {labels}, not {list(WRITE_LABELS)}", file=sys.stderr)
            outcomes = []
            for i, point in enumerate(args.points):
                out = exercise(launch, work / f"point-{i:02d}", ref, point)
                outcomes.append(out)
                print(f"{point:32s} killed={out.killed} resume={out.resume[:60]} lost={len(out.sets_lost)} "
                      f"identical={out.matches_reference} ({out.seconds:.1f} s)", flush=True)
        finally:
            if isinstance(launch, Zygote):
                launch.close()
    summary = {**summarise(ref, outcomes), "launch": "exec" if args.exec else "zygote-fork",
               "seconds": round(time.monotonic() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    brief = {k: v for k, v in summary.items() if k != "outcomes"}
    print(json.dumps(brief, indent=2))
    bad = [o["point"] for o in summary["outcomes"] if o["sets_lost"] or not o["killed"]]
    return 1 if bad or summary["identical-to-uninterrupted"] != summary["of-resumable"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
