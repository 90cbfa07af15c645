"""DP-DM (or DP-GM) rows of bench_privacy's medium preset with the code before and after a change, side by side.

A change that should leave accuracy alone (secret noise instead of seeded noise draws from the
same distribution) is checked against the code it replaced, measured in the same session on the
same machine: each (epsilon, repeat) runs the row once with each tree, the two in parallel
processes of one thread each. ``--before`` is a checkout of the earlier commit (e.g.
``git worktree add /tmp/before <commit>``).

    python simulations/bench_before_after.py --before /tmp/before --epsilons 2 8 --repeats 2 \
        --out docs/benchmarks/privacy_before_after.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ROW = """
import json, sys
sys.path.insert(0, {tree!r})
import torch
torch.set_num_threads(1)
import simulations.bench_privacy as bp
from distill import load_dataset
p = bp.PRESETS["medium"]
data = load_dataset("mnist10k")
train = data.train.first_per_class(p.per_class)
settings = {{"dp-dm": {{"iterations": p.dm_steps, "sample_rate": p.dm_sample_rate}},
             "dpsgd-gm": {{"iterations": p.gm_iterations, "outer_loop": p.gm_outer, "inner_loop": p.gm_inner,
                          "sample_rate": p.gm_sample_rate}}}}[{method!r}]
row = bp.distilled_row({method!r}, {method!r}, {eps}, {{"epsilon": {eps}, "seed": {seed}, **settings}},
                       train, data.test, p)
print("ROW " + json.dumps({{"accuracies": row["accuracies"], "accuracy": row["accuracy"],
                            "seconds": row["seconds"], "sigma": row["privacy"]["sigma"],
                            "epsilon": row["privacy"]["epsilon"]}}))
"""


def run_pair(before: Path, eps: float, seed: int, method: str = "dp-dm") -> dict[str, dict]:
    """The row with each tree, in two processes at once; ``{"before": row, "after": row}``.

    The seed changes with the repeat: the earlier code's seeded noise would otherwise draw the
    same noise every time (the later code's noise is secret whatever the seed).
    """
    code = {name: ROW.format(tree=str(tree), eps=eps, seed=seed, method=method)
            for name, tree in (("before", before), ("after", ROOT))}
    procs = {name: subprocess.Popen([sys.executable, "-c", code[name]], cwd=str(tree),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
             for name, tree in (("before", before), ("after", ROOT))}
    rows = {}
    for name, proc in procs.items():
        out, err = proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{name} row failed: {err[-2000:]}")
        rows[name] = json.loads(lines[-1][4:])
    return rows


def table(rows: list[dict]) -> str:
    """Per epsilon: each tree's accuracy per repeat (seed = first seed + repeat), their means and the difference."""
    lines = ["| method | target eps | before: accuracy % per repeat | after: accuracy % per repeat | mean before | mean after | after - before |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, eps in sorted({(r.get("method", "dp-dm"), r["epsilon_target"]) for r in rows}):
        sel = [r for r in rows if r.get("method", "dp-dm") == method and r["epsilon_target"] == eps]
        b = [100 * r["before"]["accuracy"] for r in sel]
        a = [100 * r["after"]["accuracy"] for r in sel]
        lines.append(f"| {method} | {eps:g} | {', '.join(f'{v:.2f}' for v in b)} | {', '.join(f'{v:.2f}' for v in a)} | "
                     f"{statistics.mean(b):.2f} | {statistics.mean(a):.2f} | {statistics.mean(a) - statistics.mean(b):+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, help="checkout of the earlier commit (required unless --table)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 8.0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="repeat r runs with seed first-seed + r")
    parser.add_argument("--method", choices=("dp-dm", "dpsgd-gm"), default="dp-dm")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "before_after.json")
    parser.add_argument("--table", action="store_true", help="only print the table of an existing --out")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())["rows"]))
        return 0
    if args.before is None or not (args.before / "simulations" / "bench_privacy.py").is_file():
        parser.error(f"--before {args.before} is not a checkout of this project")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.before, capture_output=True, text=True).stdout.strip()
    result = {"command": " ".join(["python", "simulations/bench_before_after.py", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d"), "before_commit": commit, "machine": platform.machine(),
              "preset": f"medium ({args.method} rows)", "rows": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for rep in range(args.repeats):
        for eps in args.epsilons:
            seed = args.first_seed + rep
            pair = run_pair(args.before, eps, seed=seed, method=args.method)
            result["rows"].append({"method": args.method, "epsilon_target": eps, "repeat": rep, "seed": seed,
                                   **pair})
            args.out.write_text(json.dumps(result, indent=1))
            print(f"eps {eps:g} repeat {rep}: before {100 * pair['before']['accuracy']:.2f} % "
                  f"after {100 * pair['after']['accuracy']:.2f} %", flush=True)
    print(table(result["rows"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
