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

The counts and settings are an experiment file, conf/scale/default.toml (conf/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.task import parse_assignments  # noqa: E402
from simulations.bench_federated import run_one, set_args  # noqa: E402
from simulations.experiments import add_experiment_args, check_run_config, chosen_experiment  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_experiment_args(p, "scale", default="default")
    p.add_argument("--clients", type=int, nargs="+", default=None, help="client counts (default: the file's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config on top of the file's (repeatable)")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "scale.json")
    args = p.parse_args(argv)
    try:
        _, exp = chosen_experiment(args, "scale", default="default")
        run_config = {**exp.run_config, **parse_assignments(args.set)}
        check_run_config("--set", run_config)
    except ValueError as err:
        p.error(str(err))
    settings = set_args(run_config)[1::2]  # "key=value", as the rows record them
    results: dict[str, dict] = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs_dir = args.out.parent / "scale_runs"
    for n in args.clients or exp.clients:
        job = ["--clients", str(n), *set_args(run_config)]
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
