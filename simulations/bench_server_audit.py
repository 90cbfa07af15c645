"""The server-side audit's power and its limits: lower bounds and ceilings per mechanism.

Rows: one DP-DM release with the old public-seed noise (sigma calibrated for eps 1), the same
release with secret noise at accountant eps 1 / 4 / 8 (RDP, delta 1e-5), and a whole tiny
non-private DM distillation given as many trials as fit in ``--dm-seconds``. Writes JSON
(machine, date, command, rows) and prints the markdown table generated from that JSON.

    OMP_NUM_THREADS=1 python simulations/bench_server_audit.py           # about 4 minutes, one thread
    python simulations/bench_server_audit.py --counted 4000 --calibration 1000 --dm-seconds 10  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attacks.server_audit import (ALPHA, DELTA, AuditResult, DMGame, audit_noisy_sums,  # noqa: E402
                                  audit_non_dp_dm, dm_auditor, dm_game, play, trials_for_ceiling)

EPSILONS = (1.0, 4.0, 8.0)
WEAK_CLAIM = 1.0  # the public-seed release's sigma is calibrated for this epsilon


def dm_counted_trials(game: DMGame, seconds: float, calibration: int) -> tuple[int, float]:
    """How many counted DM trials fit in ``seconds`` with the calibration, and the time per trial
    (timed on 6 trials after a discarded first one, which pays for one-off set-up)."""
    auditor, rng = dm_auditor(game), np.random.default_rng(99)
    play(game.upload, auditor, 1, rng, run_seed=99)
    start = time.perf_counter()
    play(game.upload, auditor, 6, rng, run_seed=99, first_round=2)
    per_trial = (time.perf_counter() - start) / 6
    return max(10, int(seconds / per_trial) - calibration), per_trial


def run_rows(calibration: int, counted: int, dm_seconds: float, seed: int) -> list[AuditResult]:
    """Every row, printing each as it finishes (the DP rows take seconds, the DM row a minute or two)."""
    rows = [audit_noisy_sums(WEAK_CLAIM, False, calibration, counted, seed=seed)]
    print(f"{rows[-1].mechanism}: eps_lb {rows[-1].epsilon_lb:.2f} ({rows[-1].seconds:.0f}s)", flush=True)
    for eps in EPSILONS:
        rows.append(audit_noisy_sums(eps, True, calibration, counted, seed=seed + int(eps)))
        print(f"{rows[-1].mechanism}: eps_lb {rows[-1].epsilon_lb:.2f} ({rows[-1].seconds:.0f}s)", flush=True)
    dm_cal, game = 40, dm_game()
    dm_counted, per_trial = dm_counted_trials(game, dm_seconds, dm_cal)
    print(f"non-DP DM: {per_trial * 1000:.0f} ms per trial -> {dm_cal} + {dm_counted} trials", flush=True)
    rows.append(audit_non_dp_dm(dm_cal, dm_counted, game=game, seed=seed))
    print(f"{rows[-1].mechanism}: eps_lb {rows[-1].epsilon_lb:.2f} ({rows[-1].seconds:.0f}s)", flush=True)
    return rows


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(result: dict) -> str:
    """The markdown table of a results JSON (so the docs quote exactly what was measured)."""
    lines = ["| mechanism | trials (calibration / counted) | test | TPR | FPR | eps lower bound | ceiling "
             "| confidence | accountant eps (RDP) | exact Gaussian eps | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['mechanism']} | {r['calibration_trials']} / {r['counted_trials']} | {r['test']} "
                     f"| {r['tpr']:.4f} | {r['fpr']:.4f} | {r['epsilon_lb']:.2f} | {r['ceiling']:.2f} "
                     f"| {r['confidence']:.2f} | {_num(r['accountant_epsilon'])} "
                     f"| {_num(r['exact_gaussian_epsilon'])} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "server_audit.json")
    parser.add_argument("--calibration", type=int, default=10_000,
                        help="DP rows: trials that pick test and threshold")
    parser.add_argument("--counted", type=int, default=40_000,
                        help=f"DP rows: counted trials (a ceiling above 8 needs {trials_for_ceiling(8.0)} "
                             "per side, so ~2.5x that in all, the coin splitting them)")
    parser.add_argument("--dm-seconds", type=float, default=100.0, help="time for the non-DP DM row's trials")
    parser.add_argument("--seed", type=int, default=0, help="coins and the run seed of the public knowledge")
    parser.add_argument("--table", action="store_true", help="only print the table of an existing --out")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return 0
    start = time.perf_counter()
    rows = run_rows(args.calibration, args.counted, args.dm_seconds, args.seed)
    argv_used = argv if argv is not None else sys.argv[1:]
    result = {"command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", ""),
                                   "python", "simulations/bench_server_audit.py", *argv_used]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "alpha": ALPHA, "delta": DELTA,
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
              "wall_seconds": time.perf_counter() - start,
              "rows": [{**r.to_row(), "ceiling_exceeds_accountant": (r.accountant_epsilon is None
                                                                    or r.ceiling > r.accountant_epsilon)}
                       for r in rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(table(json.loads(args.out.read_text())))
    print(f"wrote {args.out} ({result['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
