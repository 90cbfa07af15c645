"""Benchmark the federation: accuracy vs MB uploaded per client, fedistill beside FedAvg.

10 clients on the bundled MNIST sample at IID, Dirichlet 0.5 and 0.1: fedistill one-shot
(DM, IPC 10), fedistill iterative (3 rounds), FedAvg (up to 50 rounds, 1 local epoch); the
same ConvNet and partitions throughout. Then one-shot with 100 clients: wall time and peak
memory. Every run is a ``simulations/run.py`` subprocess (its own Ray, its own memory) whose
run store is read back; results are written after each run, so a cut-off benchmark keeps
what it finished.

    python simulations/bench_federated.py                        # everything (~1 h on 2 cores)
    python simulations/bench_federated.py --splits 0.1 --fedavg-rounds 20 --no-100
    python simulations/bench_federated.py --set net-width=64 --set ipc=20 --tag -ipc20
    python simulations/bench_federated.py --plot-only            # redraw from the JSON

The runs and splits are an experiment file, conf/federated/default.toml (conf/README.md); each
run is ``simulations/run.py --clients N --set KEY=VALUE ...`` with the file's run-config keys,
then ``--set``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.task import parse_assignments  # noqa: E402
from simulations.experiments import (FederatedExperiment, add_experiment_args, check_run_config,  # noqa: E402
                                     chosen_experiment)

OUT = ROOT / "docs" / "benchmarks"
SPLITS = ("iid", "0.5", "0.1")  # the plot's panels, in this order, where results have them


def set_args(run_config: Mapping[str, Any]) -> list[str]:
    """run.py's ``--set KEY=VALUE`` arguments for ``run_config`` (read back by ``parse_assignments``)."""
    text = {True: "true", False: "false"}
    return [a for k, v in run_config.items()
            for a in ("--set", f"{k}={text[v] if isinstance(v, bool) else v}")]


def jobs(exp: FederatedExperiment, splits: list[str], methods: list[str], sets: Mapping[str, Any],
         tag: str = "", large: bool = True, rounds: Mapping[str, int] | None = None
         ) -> list[tuple[str, int, dict[str, Any]]]:
    """``(name, clients, run-config)`` of every run: each (split, method), then the large run.

    A run's run-config is the file's ``run-config``, its split's keys, its run's keys (with
    ``rounds`` as their ``num-server-rounds``), then ``sets``.
    """
    runs = {m: {**r, **({"num-server-rounds": rounds[m]} if rounds and m in rounds else {})}
            for m, r in exp.runs.items()}
    out = [(f"{m}{tag}-{s}", exp.clients, {**exp.run_config, **exp.splits[s], **runs[m], **sets})
           for s in splits for m in methods]
    if large:
        out.append((f"{exp.large_run}{exp.large_clients}-{exp.large_split}", exp.large_clients,
                    {**exp.run_config, **exp.splits[exp.large_split], **runs[exp.large_run], **sets}))
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (Ray's raylet and actors included)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(stat[1]), []).append(int(entry.name))
            rss[int(entry.name)] = int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


def run_one(name: str, args: list[str], runs_dir: Path) -> dict[str, Any]:
    """One ``simulations/run.py`` run; returns its summary, per-round metrics, wall time and peak memory."""
    cmd = [sys.executable, str(ROOT / "simulations" / "run.py"), "--runs-dir", str(runs_dir), "--name", name, *args]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join(timeout=2)
    tail = "\n".join(line for line in out.splitlines() if line.startswith(("round", "global", "uploaded")))
    print(tail, flush=True)
    if proc.returncode != 0:
        print(out[-3000:], flush=True)
        return {"name": name, "error": f"exit code {proc.returncode}", "wall-seconds": wall}
    root = sorted(runs_dir.glob(f"*-{name}"))[-1]
    summary = json.loads((root / "summary.json").read_text())
    metrics = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [{"round": m["round"], "accuracy": m.get("accuracy"), "mb-per-client": m["mb-uploaded-per-client"]}
             for m in metrics]
    return {"name": name, "args": args, "accuracy": summary["accuracy"],
            "mb-per-client": summary["mb-uploaded-per-client"], "curve": curve, "run": str(root),
            "wall-seconds": wall, "peak-rss-gib": peak[0] / 2**30, "clients": summary["clients"],
            "accepted": summary.get("accepted"), "rejected-by-kind": summary.get("rejected-by-kind", {}),
            "pool-images": metrics[-1].get("pool-images")}


def data_title(dataset: str) -> str:
    """How the plot names a run-config's ``dataset``: the bundled sample, else the file's name."""
    return "bundled MNIST (8k train / 2k test)" if dataset == "mnist10k" else Path(dataset).name


def plot(results: dict[str, Any], path: Path, panels: tuple[str, ...] | list[str] = SPLITS,
         title: str = "10 clients, bundled MNIST (8k train / 2k test)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in panels if any(f"{m}-{s}" in results for m in ("oneshot", "iterative", "fedavg"))]
    fig, axes = plt.subplots(1, len(splits), figsize=(max(7.5, 4.2 * len(splits)), 3.8), sharey=True, squeeze=False)
    styles = {"iterative": ("fedistill iterative", "s-", "C1"), "oneshot": ("fedistill one-shot", "*", "C0"),
              "oneshot-ipc20": ("fedistill one-shot, IPC 20", "P", "C3"), "fedavg": ("FedAvg", ".-", "C2")}
    for ax, split in zip(axes[0], splits):
        for kind, (label, fmt, color) in styles.items():
            r = results.get(f"{kind}-{split}")
            if not r or "curve" not in r:
                continue
            pts = [(c["mb-per-client"], 100 * c["accuracy"]) for c in r["curve"] if c["accuracy"] is not None]
            one_shot = kind.startswith("oneshot")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], fmt, color=color, label=label,
                    markersize=12 if one_shot else 5, zorder=3 if one_shot else 2)
        ax.set_xscale("log")
        ax.set_title("IID" if split == "iid" else f"Dirichlet alpha={split}")
        ax.set_xlabel("MB uploaded per client")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("global test accuracy (%)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    plotted = [r for k, r in results.items() if k.rsplit("-", 1)[0] in ("oneshot", "iterative", "fedavg")]
    extra = " ".join(sorted({kv for r in plotted for kv in r.get("settings", [])})) or "defaults"
    fig.suptitle(f"{title}, same ConvNet for all ({extra})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_experiment_args(p, "federated", default="default")
    p.add_argument("--splits", nargs="+", default=None, help="splits of the file to run (default: all)")
    p.add_argument("--methods", nargs="*", default=None, help="runs of the file to run (default: all)")
    p.add_argument("--fedavg-rounds", type=int, default=None, help="the fedavg run's rounds (default: the file's)")
    p.add_argument("--iterative-rounds", type=int, default=None,
                   help="the iterative run's rounds (default: the file's)")
    p.add_argument("--no-100", action="store_true", help="skip the large (100-client) run")
    p.add_argument("--out", type=Path, default=OUT / "federated.json")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--tag", default="", help="suffix of the result keys' method part, e.g. -ipc20 for a variant row")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config passed to every run (e.g. a smoke test: --set iterations=2)")
    args = p.parse_args(argv)
    try:
        _, exp = chosen_experiment(args, "federated", default="default")
        sets = parse_assignments(args.set)
    except ValueError as err:
        p.error(str(err))
    for flag, chosen, known in (("--splits", args.splits, exp.splits), ("--methods", args.methods, exp.runs)):
        if chosen is not None and (unknown := sorted(set(chosen) - set(known))):
            p.error(f"{flag} {unknown}: the experiment has {sorted(known)}")
    rounds = {m: n for m, n in (("fedavg", args.fedavg_rounds), ("iterative", args.iterative_rounds)) if n is not None}
    planned = jobs(exp, list(exp.splits) if args.splits is None else args.splits,
                   list(exp.runs) if args.methods is None else args.methods, sets, args.tag,
                   large=not args.no_100, rounds=rounds)
    try:  # every run's settings, checked before the first federation starts
        for name, _, run_config in planned:
            check_run_config(name, run_config)
    except ValueError as err:
        p.error(str(err))

    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    if not args.plot_only:
        runs_dir = ROOT / "bench_results" / "federated" / "runs"
        for name, clients, run_config in planned:
            job_args = ["--clients", str(clients), *set_args(run_config)]
            results[name] = dict(run_one(name, job_args, runs_dir), settings=list(args.set))
            results["_machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2, sort_keys=True))
    width = f", ConvNet width {exp.run_config['net-width']}" if "net-width" in exp.run_config else ""
    plot(results, args.out.with_suffix(".png"), list(exp.splits),
         f"{exp.clients} clients, {data_title(str(exp.run_config.get('dataset', 'mnist10k')))}{width}")
    for name, r in sorted(results.items()):
        if name.startswith("_"):
            continue
        acc = "n/a" if r.get("accuracy") is None else f"{100 * r['accuracy']:.2f}%"
        print(f"{name:<16} acc {acc:>7}  {r.get('mb-per-client', 0):8.3f} MB/client  "
              f"{r.get('wall-seconds', 0):7.1f} s  peak {r.get('peak-rss-gib', 0):.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
