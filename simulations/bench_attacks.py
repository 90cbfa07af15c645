"""Membership inference and backdoor benchmark on the bundled MNIST sample (issue 5), central part.

LiRA and RMIA (online/offline, whole-pipeline shadows) and the loss/confidence attacks against
a real-trained ConvNet (the leaky baseline), DM-, DC- and DP-DM-distilled targets; the distance
attack on each synthetic set; a canary DP audit of each target (mislabelled canaries, one-run
and Clopper-Pearson lower bounds beside the accountant's epsilon); naive and DOORPING
backdoors through DM with ASR/CTA beside the clean floor. Writes ``bench_attacks.json`` and the audit report (HTML) under ``--out``.

    python simulations/bench_attacks.py --quick     # 400-image pool, 8 shadows, leaky + DM targets: ~11 min on a busy 2-core CPU
    python simulations/bench_attacks.py --medium    # the same scale, 16 shadows, real / DM / DC / DP-DM targets, no backdoor
    python simulations/bench_attacks.py             # the benchmark: 1000-image pool, 16 shadows (hours on CPU)

    python simulations/bench_attacks.py --federated --quick   # federated part only (Ray; see below)

Federated part (``--federated``): 10 virtual clients, one malicious (naive and DOORPING backdoors
through the malicious ClientApp of simulations/malicious_client.py), the server's defenses none /
holdout / outlier / both, plus a clean federation as the false-trigger floor: ASR, CTA and the
dropped partitions of each; written to ``federated.json`` under ``--out`` (9 Ray runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attacks.audit import run_audit  # noqa: E402

CONVNET = {"arch": "convnet", "arch_kwargs": {"width": 32, "depth": 3}, "epochs": 100, "batch_size": 64, "dsa": False}
FULL = {
    "pool_size": 1000, "shadows": 16, "train": CONVNET,
    "targets": [
        {"kind": "real"},
        {"kind": "distill", "method": "dm", "settings": {"ipc": 10, "iterations": 200}},
        {"kind": "distill", "method": "dc", "settings": {"ipc": 10, "iterations": 100}},
        {"kind": "distill", "method": "dp-dm", "settings": {"ipc": 10, "iterations": 200, "epsilon": 4.0}},
    ],
    # IPC 50, 10 % poison, 5x5: the regime where a set can carry a backdoor at all (the paper's 1 % and
    # 2x2 at IPC 10 sit far below the carrier ceiling: docs/attacks.md, bench_backdoor_capacity.py).
    "backdoor": {"method": "dm", "settings": {"ipc": 50, "iterations": 200}, "fraction": 0.1, "size": 5,
                 "target": 0, "client_size": 5000, "doorping": True},
    "canary": {"kind": "mislabel", "count": 2000, "client_size": 2000, "score": "loss"},
}
QUICK = {
    "pool_size": 400, "shadows": 8,
    "train": {"arch": "convnet", "arch_kwargs": {"width": 16, "depth": 2}, "epochs": 30, "batch_size": 50, "dsa": False},
    "targets": [{"kind": "real"}, {"kind": "distill", "method": "dm", "settings": {"ipc": 10, "iterations": 20}}],
    "backdoor": {"method": "dm", "settings": {"ipc": 10, "iterations": 20}, "fraction": 0.1, "size": 3, "target": 0,
                 "client_size": 1000, "doorping": True,
                 "doorping_settings": {"update_every": 5, "trigger_steps": 20, "proxy_steps": 10}},
    "canary": {"kind": "mislabel", "count": 200, "client_size": 500, "score": "loss"},
}

# LiRA with the 16 shadows against all four kinds of target, at the quick preset's small
# scale (one CPU core, well under an hour); the backdoor is measured by the probes (docs/attacks.md).
SMALL_NET = {"arch_kwargs": {"width": 16, "depth": 2}}
MEDIUM = {
    **QUICK, "shadows": 16, "backdoor": None,
    "targets": [
        {"kind": "real"},
        {"kind": "distill", "method": "dm", "settings": {"ipc": 10, "iterations": 20}},
        # DC at IPC 1 (the paper's single outer/inner loop): at IPC 10 one shadow costs ~3 min of a core
        {"kind": "distill", "method": "dc", "settings": {"ipc": 1, "iterations": 50, **SMALL_NET}},
        # a shadow's half pool holds ~20 images per class: the default noisy-count gate (sigma 10,
        # threshold 30) would drop every class, so the counts are released with sigma 3 (accounted)
        {"kind": "distill", "method": "dp-dm", "settings": {"ipc": 10, "iterations": 20, "epsilon": 4.0,
                                                           "count_sigma": 3.0, "count_threshold": 6.0}},
    ],
}

FEDERATED = {"clients": 10, "malicious": 1, "fraction": 0.3, "size": 5, "target": 0,
             "run": {"iterations": 100, "ipc": 10, "server-epochs": 300}}
FEDERATED_QUICK = {**FEDERATED, "run": {"iterations": 20, "ipc": 10, "server-epochs": 50, "server-dsa": False}}
DEFENSE_MODES = ("none", "holdout", "outlier", "both")


def federated(out: Path, quick: bool, attacks: tuple[str, ...] = ("naive", "doorping")) -> list[dict]:
    """The federated backdoor table: a clean run, then one malicious client under each defense.

    ``attacks`` picks the malicious rows to run; rows of other attacks (and the clean row) already
    in ``federated.json`` with the same config are kept, so the table can be measured in parts."""
    from attacks.malicious import BackdoorSpec, malicious_partitions
    from simulations.run_backdoor import simulate_backdoor

    cfg = FEDERATED_QUICK if quick else FEDERATED
    spec = BackdoorSpec(target=cfg["target"], fraction=cfg["fraction"], size=cfg["size"])
    path = out / "federated.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    rows = [r for r in previous.get("rows", []) if previous.get("config") == cfg and r["attack"] not in attacks]
    clean = [] if any(r["attack"] == "none" for r in rows) else [("clean", "naive", 0, "none")]
    plan = [*clean, *((f"{attack}/{d}", attack, cfg["malicious"], d) for attack in attacks for d in DEFENSE_MODES)]
    for name, attack, k, defense in plan:
        bad = malicious_partitions(cfg["clients"], k)
        overrides = {**cfg["run"], "defense": defense, "min-available-nodes": cfg["clients"],
                     "fraction-evaluate": 0.0, "runs-dir": str(out / "runs"), "run-name": name.replace("/", "-")}
        start = time.perf_counter()
        summary = simulate_backdoor(overrides, cfg["clients"], bad, spec, quiet=True, attack=attack)
        row = {"run": name, "attack": attack if k else "none", "defense": defense, "malicious": bad, **{k2: summary["backdoor"][k2] for k2 in ("asr", "cta")},
               "dropped": [d.get("client") or d["node"] for d in summary.get("defense-dropped", [])],
               "dropped-reasons": [d["reason"] for d in summary.get("defense-dropped", [])],
               "seconds": time.perf_counter() - start, "store": summary["run"]}
        rows.append(row)
        print(f"{name:<16} ASR {row['asr']:.3f}  CTA {row['cta']:.3f}  dropped partitions {row['dropped']}  "
              f"{row['seconds']:.0f} s", flush=True)
        path.write_text(json.dumps({"config": cfg, "rows": rows}, indent=2))  # after each row: an interrupted table keeps its runs
    return rows


def membership_table(report: dict) -> str:
    """Markdown: per target, each attack's held-out TPR at 1 % FPR (95 % interval) and AUC, from the JSON."""
    rows = report["membership_inference"]["attacks"]
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    cell = {(r["target"], r["attack"]): r for r in rows}
    lines = ["| target (test acc) | " + " | ".join(attacks) + " |", "| --- |" + " --- |" * len(attacks)]
    for t in targets:
        acc = next(r["test_accuracy"] for r in rows if r["target"] == t)
        cells = []
        for a in attacks:
            r = cell.get((t, a))
            if r is None:
                cells.append("-")
                continue
            lo, hi = r["tpr_at_1pct_ci"]
            cells.append(f"{r['tpr_at_1pct_fpr']:.3f} [{lo:.3f}, {hi:.3f}] (AUC {r['auc']:.3f})")
        lines.append(f"| {t} ({100 * acc:.1f} %) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small run (~11 min on a busy 2-core CPU)")
    size.add_argument("--medium", action="store_true",
                      help="16 shadows against real, DM, DC and DP-DM targets at the quick preset's scale")
    p.add_argument("--out", default="bench_results/attacks", help="output directory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--federated", action="store_true", help="only the federated backdoor / defenses part")
    p.add_argument("--attacks", nargs="+", choices=("naive", "doorping"), default=["naive", "doorping"],
                   help="with --federated: the malicious rows to (re)run; other attacks' rows are kept")
    p.add_argument("--table", type=Path, default=None, help="only print the membership table of a bench_attacks.json")
    args = p.parse_args(argv)
    if args.table is not None:
        print(membership_table(json.loads(args.table.read_text())))
        return
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.federated:
        federated(out, args.quick, tuple(args.attacks))
        return
    cfg_path = out / "audit_config.json"
    cfg_path.write_text(json.dumps(QUICK if args.quick else MEDIUM if args.medium else FULL, indent=2))
    start = time.perf_counter()
    report = run_audit(cfg_path, out)
    report["wall_seconds"] = time.perf_counter() - start
    (out / "bench_attacks.json").write_text(json.dumps(report, indent=2, default=str))
    print("\n".join(report["summary"]["lines"]))
    print(f"{report['wall_seconds']:.0f} s; wrote {out}/bench_attacks.json and {out}/report.html")


if __name__ == "__main__":
    main()
