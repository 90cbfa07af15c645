"""How far one-shot fedistill scales in simulation: wall time and peak memory at 10 / 100 / 1000 clients.

Every count runs the same one-shot federation (``simulations/run.py`` in its own process, IID
over the bundled sample, so at 1000 clients each node holds about 7 training images) with
settings small enough that the count, not the distillation, sets the cost: IPC 1, 20 DM
iterations, every class a node holds is distilled (``min-class-samples=1``,
``samples-per-image=1``), 20 server epochs. Peak memory is the resident memory of the whole
process tree (driver, Ray, client actors), sampled every 0.5 s: the server keeps the accepted
pool, not the messages, so it should grow with the pool.

    python simulations/bench_scale.py                       # 10, 100, 1000 clients
    python simulations/bench_scale.py --clients 10 100 --set iterations=5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulations.bench_federated import run_one  # noqa: E402

SCALE_CONFIG = ("ipc=1", "iterations=20", "min-class-samples=1", "samples-per-image=1", "server-epochs=20",
                "fraction-evaluate=0", "holdout-fraction=0")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config on top of the scale settings (repeatable)")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "scale.json")
    args = p.parse_args(argv)
    settings = [*SCALE_CONFIG, *args.set]
    results: dict[str, dict] = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs_dir = args.out.parent / "scale_runs"
    for n in args.clients:
        job = ["--mode", "one-shot", "--partitioner", "iid", "--clients", str(n),
               *[a for kv in settings for a in ("--set", kv)]]
        row = run_one(f"scale{n}", job, runs_dir)
        results[str(n)] = dict(row, settings=settings)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, sort_keys=True))  # kept after every count
    print(f"{'clients':>7} {'accepted':>8} {'pool':>6} {'accuracy':>8} {'wall s':>7} {'peak GiB':>8}")
    for n, r in sorted(results.items(), key=lambda kv: int(kv[0])):
        acc = "n/a" if r.get("accuracy") is None else f"{100 * r['accuracy']:.2f}%"
        print(f"{n:>7} {r.get('accepted', '?')!s:>8} {r.get('pool-images', '?')!s:>6} {acc:>8} "
              f"{r.get('wall-seconds', 0):7.0f} {r.get('peak-rss-gib', 0):8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
