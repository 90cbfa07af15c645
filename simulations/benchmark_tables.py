"""The docs' result tables, generated from the raw JSON in docs/benchmarks/ (never typed by hand).

    python simulations/benchmark_tables.py            # rewrite every generated table in place
    python simulations/benchmark_tables.py --check    # exit 1 when a doc differs from what its JSON gives
    python simulations/benchmark_tables.py --print federated demo     # print tables (markdown)

A generated table sits between two markers that this script writes and reads::

    <!-- generated: NAME from docs/benchmarks/X.json by simulations/benchmark_tables.py; do not edit -->
    ...a line naming the raw JSON (its date and machine where it records them), then the table...
    <!-- end generated: NAME -->

To change a table, change its JSON (rerun the benchmark) or its function here, then run the
script. ``--check`` (and tests/test_benchmark_tables.py) also fails on a marker naming an
unknown table, a table no doc uses, and any table in README.md or BENCHMARKS.md outside markers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RAW = Path("docs") / "benchmarks"
DOCS = ("README.md", "BENCHMARKS.md", "docs/reliability.md")  # the files whose generated blocks are kept
NO_HAND_TABLES = ("README.md", "BENCHMARKS.md")  # every table in these must be generated
START = re.compile(r"^<!-- generated: (?P<name>[a-z0-9-]+) .*-->$")
END = "<!-- end generated: {name} -->"

NAMES = {"random": "random real", "dm": "DM", "dc": "DC", "dsa": "DSA", "kip": "KIP", "rfad": "RFAD",
         "frepo": "FRePo", "bptt": "BPTT", "mtt": "MTT", "cafe": "CAFE", "dp-dm": "DP-DM",
         "dpsgd-gm": "DP gradient matching", "dp-sgd": "DP-SGD (network)"}


# -- formatting ----------------------------------------------------------------------------------

def pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}"


def md(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def method_label(row: dict) -> str:
    label = NAMES.get(row["method"], row["method"])
    extra = {k: v for k, v in (row.get("overrides") or {}).items() if k != "iterations"}
    return label + (" (" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")" if extra else "")


def iterations(row: dict) -> str:
    if not row.get("iterations"):
        return "-"
    conf = row.get("iterations_configured")
    return f"{row['iterations']:,}" + (f" / {conf:,}" if conf and conf != row["iterations"] else "")


def accuracy(row: dict) -> str:
    mean, std = row.get("acc_mean", row.get("mean")), row.get("acc_std", row.get("std"))
    return f"{pct(mean)} +- {pct(std)}"


# -- distillation (bench_distill.py rows) --------------------------------------------------------

def distill_rows(rows: list[tuple[str, dict]]) -> str:
    """One row per (raw file, bench_distill result): accuracy, cost, memory; the file when several."""
    several = len({source for source, _ in rows}) > 1
    out = []
    for source, r in rows:
        above = r["distill_peak_rss_mb"] - r["base_rss_mb"] if "distill_peak_rss_mb" in r else None
        out.append([method_label(r), r["ipc"], iterations(r), accuracy(r),
                    f"{len(r['accuracies'])} x {r.get('eval_epochs', r.get('epochs'))}",
                    f"{r['sec_per_iter']:.2f}" if r.get("sec_per_iter") else "-",
                    f"{r['peak_rss_mb']:,.0f}" if "peak_rss_mb" in r else "-",
                    f"{above:,.0f}" if above is not None else "-", *([source] if several else [])])
    return md(["method", "IPC", "iterations (run / configured)", "test accuracy % (mean +- std)",
               "seeds x eval epochs", "s / iteration", "peak RSS MB", "distillation's peak above baseline MB",
               *(["raw"] if several else [])], out)


def results(data: dict, source: str, keep: Callable[[dict], bool] = lambda r: True) -> list[tuple[str, dict]]:
    return [(source, r) for r in data["results"] if keep(r)]


def distill_cpu_table(cpu: dict) -> str:
    return distill_rows(results(cpu, "distill_cpu"))


# The papers' ConvNet-3 accuracies (%) at IPC 1 / 10 / 50 (issue 22's anchors): DM (Zhao & Bilen, WACV 2023),
# DSA (Zhao & Bilen, ICML 2021), KIP (Nguyen et al., ICLR 2021), FRePo (Zhou et al., NeurIPS 2022), random real.
PAPER_MNIST = {"dm": (89.7, 97.5, 98.6), "dsa": (88.7, 97.8, 99.2), "kip": (90.1, 97.5, 98.3),
               "frepo": (93.0, 98.6, 99.2), "random": (64.9, 95.1, 97.9)}


# CIFAR-10, same papers; MTT (Cazenavette et al., CVPR 2022); KIP with a ConvNet kernel, ZCA and learned labels.
PAPER_CIFAR10 = {"dm": (26.0, 48.9, 63.0), "dsa": (28.8, 52.1, 60.6), "mtt": (46.3, 65.3, 71.6),
                 "frepo": (46.8, 65.5, 71.7), "kip": (49.9, 62.7, 68.6), "random": (14.4, 26.0, 43.4)}


def with_paper(paper: dict, *runs: tuple[str, dict]) -> str:
    """bench_distill rows of one or more raw files, each beside the paper's figure at its IPC."""
    rows = [row for source, data in runs for row in results(data, source)]
    table = distill_rows(rows).splitlines()
    figures = [paper.get(r["method"], (None,) * 3)[{1: 0, 10: 1, 50: 2}.get(r["ipc"], 0)] for _, r in rows]
    cells = [f" {p:.1f} |" if p is not None else " - |" for p in figures]
    return "\n".join([table[0] + " paper % |", table[1] + " --- |", *(row + c for row, c in zip(table[2:], cells))])


MNIST70K_RUNS = ("distill_mnist70k_cpu", "distill_mnist70k_dm10")


def full_mnist_table(*runs: dict) -> str:
    """Full MNIST rows of each run (MNIST70K_RUNS, in order) beside the paper's figure at the same IPC."""
    return with_paper(PAPER_MNIST, *zip(MNIST70K_RUNS, runs))


CIFAR10_RUNS = ("distill_cifar10_ipc1", "distill_cifar10_cpu")


def cifar10_table(*runs: dict) -> str:
    """CIFAR-10 (JPEG) rows of each run (CIFAR10_RUNS, in order) beside the paper's figure at the same IPC."""
    return with_paper(PAPER_CIFAR10, *zip(CIFAR10_RUNS, runs))


def dm_speed_table(eager: dict, compiled: dict) -> str:
    """Ours against the reference DM loop, eager and compiled; work rate against the best GEMM rate
    the two runs measured on the same machine (its practical peak)."""
    peak = max(r["matmul_gflops"] for run in (eager, compiled) for r in run["speed"] if "matmul_gflops" in r)
    work = {r["ipc"]: r["gflop_per_iter"] for r in compiled["speed"]}  # the same work either way
    out = []
    for mode, run in (("eager", eager), ("compiled", compiled)):
        for r in run["speed"]:
            gflop = work.get(r["ipc"])
            rate = gflop / r["ours_s_per_iter"] if gflop else None
            out.append([r["ipc"], mode, f"{r['ours_s_per_iter']:.3f}", f"{r['reference_s_per_iter']:.3f}",
                        f"{r['ratio']:.2f}", f"{gflop:.0f}" if gflop else "-",
                        f"{rate:.0f}" if rate else "-", f"{rate / peak:.0%}" if rate else "-"])
    return md(["IPC", "ours", "ours s / iteration", "reference s / iteration", "ratio", "GFLOP / iteration",
               "ours GFLOP/s", f"of the GEMM peak ({peak:.0f} GFLOP/s)"], out)


def kip_ipc1_table(kip: dict, cpu: dict) -> str:
    return distill_rows(results(kip, "distill_kip_ipc1_cpu") + results(cpu, "distill_cpu", lambda r: r["ipc"] == 1))


def ipc50_table(meta: dict) -> str:
    return distill_rows(results(meta, "distill_meta_ipc50_cpu"))


def matching_cpu_table(mtt: dict, mtt400: dict, cafe: dict, idc: dict, cpu: dict) -> str:
    rows = (results(mtt, "distill_mtt_cpu") + results(mtt400, "distill_mtt400_cpu") + results(cafe, "distill_cafe_cpu")
            + results(idc, "distill_idc_cpu") + results(cpu, "distill_cpu", lambda r: r["method"] != "random"))
    return distill_rows(rows)


def kernel_memory_table(mem: dict) -> str:
    ipcs = sorted({r["ipc"] for r in mem["results"]})
    cell = {(r["method"], r["ipc"]): r["distill_peak_rss_mb"] - r["base_rss_mb"] for r in mem["results"]}
    methods = list(dict.fromkeys(r["method"] for r in mem["results"]))
    return md(["method", *(f"IPC {i}: MB above baseline" for i in ipcs)],
              [[NAMES[m], *(f"{cell[m, i]:,.0f}" for i in ipcs)] for m in methods])


def gpu_table(gpu: dict) -> str:
    rows = [r for r in gpu["results"] if r.get("group") in ("matching", "focused")]
    order = ["random", "dm", "dc", "dsa", "whole pool"]
    rows.sort(key=lambda r: (r["ipc"] is None, r["ipc"] or 0, order.index(r["method"]), r.get("iterations", 0)))
    out = []
    for r in rows:
        run = "focused" if r["group"] == "focused" else "sweep"
        if r["method"] == "whole pool":
            out.append([f"whole pool ({r['eval_epochs']} epochs)", "-", "-", accuracy(r), "-", run, "-"])
            continue
        out.append([method_label(r), r["ipc"], iterations(r), accuracy(r),
                    f"{r['sec_per_iter']:.3f}" if r["sec_per_iter"] else "-", run, f"{r['cuda_peak_mb']:,.0f}"])
    return md(["method", "IPC", "iterations (run / paper)", "test accuracy % (3 seeds)", "s / iteration", "run",
               "peak GPU MB"], out)


def gpu_meta_table(gpu: dict) -> str:
    """The sweep's methods side by side at IPC 1 and 10: accuracy (iterations run), s / iteration."""
    rows = [r for r in gpu["results"] if r.get("group") != "focused" and r["method"] != "random"
            and r["ipc"] in (1, 10) and r["method"] not in ("dc", "dsa")]
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(method_label(r), {})[r["ipc"]] = r
    out = []
    for label, cells in by.items():
        a, b = cells.get(1), cells.get(10)
        out.append([label, *(f"{accuracy(c)} ({c['iterations']:,})" if c else "-" for c in (a, b)),
                    " / ".join(f"{c['sec_per_iter']:.2f}" if c else "-" for c in (a, b))])
    return md(["method", "IPC 1: accuracy % (iterations)", "IPC 10: accuracy % (iterations)",
               "s / iteration at IPC 1 / 10"], out)


def cuda_smoke_table(gpu: dict) -> str:
    out = [[r["method"], f"{r['seconds']:.1f}", "yes" if r["finite"] else "NO", "yes" if r["on_cpu"] else "NO",
            "yes" if r["repeatable"] else "no", f"{r['privacy']['epsilon']:.3f}" if r["privacy"] else "-"]
           for r in gpu["cuda_smoke"]]
    return md(["method", "seconds", "finite", "set returned on CPU", "bit-repeatable on CUDA",
               "epsilon spent (target 8)"], out)


# -- applications (bench_applications.py) ---------------------------------------------------------

ARCHS = ("convnet", "mlp", "lenet", "alexnet", "resnet18")


def crossarch_table(xa: dict) -> str:
    out = []
    for key, cells in xa["crossarch"].items():
        by = {c["arch"]: c for c in cells}
        seeds = {len(c["accuracies"]) for c in cells}
        means = [by[a]["mean"] for a in ARCHS]
        out.append([f"{key}: {xa['provenance'][key].split(';')[0]}",
                    *(f"{pct(by[a]['mean'])} +- {pct(by[a]['std'])}" if len(by[a]["accuracies"]) > 1
                      else pct(by[a]["mean"]) for a in ARCHS),
                    pct(statistics.fmean(means)), "/".join(str(s) for s in sorted(seeds))])
    return md(["set (100 images unless said)", *ARCHS, "mean of 5", "seeds"], out)


def nas_table(apps: dict) -> str:
    s = apps["nas"]["summary"]
    return md(["proxy", "Spearman rho vs the whole pool", "picks", "its true accuracy %", "best true accuracy %"],
              [[{"dm": "DM IPC 10", "random": "random real"}[k], f"{v['spearman']:.3f}", v["selected"],
                pct(v["selected_true_acc"]), pct(v["best_true_acc"])] for k, v in s.items()])


def continual_table(apps: dict) -> str:
    out = []
    for k, v in apps["continual"].items():
        out.append([{"distill": "DM-distilled"}.get(k, k), *(pct(a) for a in v["mean_per_step"]),
                    pct(v["average_mean"])])
    steps = len(next(iter(apps["continual"].values()))["mean_per_step"])
    return md(["memory", *(f"step {i + 1}" for i in range(steps)), "average"], out)


# -- federation (bench_federated.py, run stores) ---------------------------------------------------

SPLITS = (("iid", "IID"), ("0.5", "Dirichlet 0.5"), ("0.1", "Dirichlet 0.1"))


def fedavg_at(run: dict, rounds: int) -> dict:
    return next(c for c in run["curve"] if c["round"] == rounds)


def federated_table(fed: dict, skip: tuple[str, ...] = ()) -> str:
    """Every split's fedistill runs and FedAvg (at 20 rounds and at its last); ``skip``: runs left out."""
    out = []
    for key, split in SPLITS:
        if f"fedavg-{key}" not in fed:
            continue
        for name, label in ((f"oneshot-{key}", "fedistill one-shot, IPC 10"),
                            (f"oneshot-ipc20-{key}", "fedistill one-shot, IPC 20"),
                            (f"iterative-{key}", "fedistill iterative, IPC 10")):
            if name not in fed or name in skip:
                continue
            r = fed[name]
            per_round = " / ".join(pct(c["accuracy"]) for c in r["curve"])
            out.append([split, label, len(r["curve"]), pct(r["accuracy"]) + (f" ({per_round})" if len(r["curve"]) > 1
                                                                             else ""),
                        f"{r['mb-per-client']:.3f}", f"{r['wall-seconds']:,.0f} s", f"{r['peak-rss-gib']:.2f}"])
        avg = fed[f"fedavg-{key}"]
        if len(avg["curve"]) > 20:
            at20 = fedavg_at(avg, 20)
            out.append([split, "FedAvg", 20, pct(at20["accuracy"]), f"{at20['mb-per-client']:.3f}", "-", "-"])
        out.append([split, "FedAvg", len(avg["curve"]), pct(avg["accuracy"]), f"{avg['mb-per-client']:.3f}",
                    f"{avg['wall-seconds']:,.0f} s", f"{avg['peak-rss-gib']:.2f}"])
    return md(["split", "method", "rounds", "global accuracy %", "MB uploaded / client", "wall time",
               "peak memory GiB"], out)


def mnist10k_federated_table(fed: dict) -> str:
    return federated_table(fed, skip=("iterative-0.1",))  # 0.1 iterative ran under the earlier server recipe


def crossover_table(fed: dict) -> str:
    """How many FedAvg rounds (and bytes) reach each one-shot run's accuracy."""
    out = []
    for key, split in SPLITS:
        if f"fedavg-{key}" not in fed:
            continue
        avg = fed[f"fedavg-{key}"]
        for name in (f"oneshot-{key}", f"oneshot-ipc20-{key}"):
            if name not in fed:
                continue
            r = fed[name]
            first = next((c for c in avg["curve"] if c["accuracy"] >= r["accuracy"]), None)
            reach = (f"round {first['round']} ({pct(first['accuracy'])} %)", f"{first['mb-per-client']:.3f}",
                     f"{first['mb-per-client'] / r['mb-per-client']:.0f}x") if first else ("not reached", "-", "-")
            out.append([split, "IPC 20" if "ipc20" in name else "IPC 10", pct(r["accuracy"]),
                        f"{r['mb-per-client']:.3f}", *reach])
    return md(["split", "one-shot", "one-shot accuracy %", "one-shot MB / client",
               "first FedAvg round at or above it", "FedAvg MB / client by then", "bytes ratio"], out)


def equal_bytes_table(fed: dict) -> str:
    """fedistill's accuracy after each of its rounds beside FedAvg's best within the same bytes.

    FedAvg's side is its best accuracy over the rounds whose cumulative upload per client is at
    most fedistill's at that point, so a row is a comparison at equal (or fewer) bytes.
    """
    out = []
    for key, split in SPLITS:
        if f"fedavg-{key}" not in fed:
            continue
        avg = fed[f"fedavg-{key}"]["curve"]
        for kind, label in (("oneshot", "one-shot"), ("iterative", "iterative")):
            for c in fed.get(f"{kind}-{key}", {}).get("curve", []):
                within = [a for a in avg if a["mb-per-client"] <= c["mb-per-client"] + 1e-9]
                best = max(within, key=lambda a: a["accuracy"], default=None)
                out.append([split, f"{label}, round {c['round']}", f"{c['mb-per-client']:.3f}", pct(c["accuracy"]),
                            f"{pct(best['accuracy'])} (round {best['round']}, {best['mb-per-client']:.3f} MB)"
                            if best else "no round fits", f"{100 * (c['accuracy'] - best['accuracy']):+.2f}"
                            if best else "-"])
        last = fed.get(f"iterative-{key}")
        if last and len(avg) >= 20:
            at20 = fedavg_at(fed[f"fedavg-{key}"], 20)
            out.append([split, "iterative, last round against FedAvg's 20 rounds",
                        f"{last['mb-per-client']:.3f} / {at20['mb-per-client']:.3f}", pct(last["accuracy"]),
                        f"{pct(at20['accuracy'])} (round 20)", f"{100 * (last['accuracy'] - at20['accuracy']):+.2f}"])
    return md(["split", "fedistill", "MB uploaded / client", "fedistill accuracy %",
               "FedAvg's best within those bytes %", "difference (points)"], out)


def clients100_table(fed: dict) -> str:
    r = fed["oneshot100-0.5"]
    return md(["clients", "split", "global accuracy %", "MB uploaded / client", "wall time", "peak memory GiB"],
              [[r["clients"], "Dirichlet 0.5", pct(r["accuracy"]), f"{r['mb-per-client']:.3f}",
                f"{r['wall-seconds']:,.0f} s", f"{r['peak-rss-gib']:.2f}"]])


def demo_table(summary: dict, config: dict) -> str:
    return md(["clients", "split", "method", "server epochs / batch", "global accuracy %", "federated eval %",
               "MB uploaded / client (max)", "accepted / rejected", "server loop"],
              [[summary["clients"], f"{config['partitioner']} {config['alpha']}",
                f"{config['method'].upper()} IPC {config['ipc']}, {config['iterations']} iterations, {summary['mode']}",
                f"{config['server-epochs']} / {config['server-batch-size']}", pct(summary["accuracy"]),
                pct(summary["federated-accuracy"]),
                f"{summary['mb-uploaded-per-client']:.3f} ({summary['mb-uploaded-max-client']:.3f})",
                f"{summary['accepted']} / {summary['rejected']}", f"{summary['wall-seconds']:.1f} s"]])


def scale_table(scale: dict, rerun: dict) -> str:
    rows = [(k, v, "scale") for k, v in scale.items()] + [(k, v, "scale_100_after_per_message_pulls")
                                                          for k, v in rerun.items()]
    return md(["clients", "accepted", "pool images", "global accuracy %", "MB / client", "wall time", "peak memory GiB",
               "raw"],
              [[f"{v['clients']:,}", f"{v['accepted']:,} / {v['clients']:,}", f"{v['pool-images']:,}",
                pct(v["accuracy"]), f"{v['mb-per-client']:.3f}", f"{v['wall-seconds']:,.0f} s",
                f"{v['peak-rss-gib']:.2f}", src] for _, v, src in rows])


# -- privacy ---------------------------------------------------------------------------------------

def _eps(x: Any, digits: int = 3) -> str:
    return "inf" if x == "inf" else f"{x:.{digits}f}"


def privacy_rows(rows: list[dict]) -> list[list[Any]]:
    return [[NAMES.get(r["row"], r["row"]), _eps(r["target_epsilon"], 0),
             f"{_eps(r['epsilon'])} ({r['privacy']['accountant']})" if "accountant" in r.get("privacy", {})
             else _eps(r["epsilon"]),
             f"{r['privacy']['sigma']:.3f}" if r.get("privacy", {}).get("sigma") else "-",
             f"{pct(r['accuracy'])} +- {pct(statistics.pstdev(r['accuracies']))}",
             f"{r['seconds']:.0f}"] for r in rows]


HEAD_PRIVACY = ["row", "target epsilon", "epsilon spent (accountant)", "sigma", "accuracy % (2 eval seeds)",
                "seconds"]


def privacy_dp_table(secret: dict) -> str:
    rows = sorted((r for r in secret["rows"] if r["target_epsilon"] != "inf"), key=lambda r: r["target_epsilon"])
    return md(HEAD_PRIVACY, privacy_rows(rows))


def privacy_nodp_table(seeded: dict) -> str:
    return md(HEAD_PRIVACY, privacy_rows([r for r in seeded["rows"] if r["target_epsilon"] == "inf"]))


def before_after_table(*runs: dict) -> str:
    out = []
    for name, data in zip(("privacy_before_after", "privacy_before_after_gm", "privacy_before_after_seed5"), runs):
        for r in data["rows"]:
            b, a = r["before"]["accuracy"], r["after"]["accuracy"]
            out.append([r.get("method", "dp-dm"), _eps(r["epsilon_target"], 0),
                        f"seed {r['seed']}" if "seed" in r else f"repeat {r['repeat']}",
                        f"{r['before']['sigma']:.3f} / {r['after']['sigma']:.3f}", pct(b), pct(a),
                        f"{100 * (a - b):+.2f}", name])
    return md(["method", "target epsilon", "draw", "sigma before / after", "seeded noise: accuracy %",
               "secret noise: accuracy %", "after - before (points)", "raw"], out)


def federated_dp_table(summary: dict, fed: dict) -> str:
    nodes = list(summary["privacy"].values())
    plain = fed["oneshot-0.5"]
    return md(["run", "global accuracy %", "largest client epsilon (accountant, delta)", "MB uploaded / client (max)",
               "accepted", "wall time"],
              [[f"{summary['dp']}, {summary['clients']} clients, {summary['mode']}", pct(summary["accuracy"]),
                f"{summary['epsilon-max']:.3f} ({nodes[0]['accountant']}, {nodes[0]['delta']:g})",
                f"{summary['mb-uploaded-per-client']:.3f} ({summary['mb-uploaded-max-client']:.3f})",
                f"{summary['accepted']} / {summary['clients']}", f"{summary['wall-seconds']:.0f} s"],
               [f"no DP: DM, {plain['clients']} clients, one-shot (oneshot-0.5 of federated.json)",
                pct(plain["accuracy"]), "-", f"{plain['mb-per-client']:.3f}", "-", f"{plain['wall-seconds']:.0f} s"]])


def server_audit_table(audit: dict) -> str:
    def num(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)
    return md(["mechanism", "trials (calibration / counted)", "test", "TPR", "FPR", "epsilon lower bound", "ceiling",
               "confidence", "accountant epsilon", "exact Gaussian epsilon", "seconds"],
              [[r["mechanism"], f"{r['calibration_trials']} / {r['counted_trials']}", r["test"], f"{r['tpr']:.4f}",
                f"{r['fpr']:.4f}", f"{r['epsilon_lb']:.2f}", f"{r['ceiling']:.2f}", f"{r['confidence']:.2f}",
                num(r["accountant_epsilon"], ".2f"), num(r["exact_gaussian_epsilon"], ".2f"), f"{r['seconds']:.0f}"]
               for r in audit["rows"]])


# -- attacks ---------------------------------------------------------------------------------------

def membership_table(report: dict) -> str:
    """Per target, each attack's held-out TPR at 1 % FPR (95 % interval) and AUC."""
    rows = report["membership_inference"]["attacks"]
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    cell = {(r["target"], r["attack"]): r for r in rows}
    out = []
    for t in dict.fromkeys(r["target"] for r in rows):
        acc = next(r["test_accuracy"] for r in rows if r["target"] == t)
        cells = []
        for a in attacks:
            r = cell.get((t, a))
            cells.append("-" if r is None else f"{r['tpr_at_1pct_fpr']:.3f} [{r['tpr_at_1pct_ci'][0]:.3f}, "
                                               f"{r['tpr_at_1pct_ci'][1]:.3f}] (AUC {r['auc']:.3f})")
        out.append([f"{t} ({pct(acc, 1)} %)", *cells])
    return md(["target (test accuracy)", *attacks], out)


def canary_table(report: dict) -> str:
    return md(["target", "canaries", "inserted", "guesses (correct)", "epsilon lower bound", "ceiling", "confidence",
               "accountant epsilon"],
              [[r["target"], r["canaries"], r["included"], f"{r['guesses']} ({r['correct']})",
                f"{r['empirical_epsilon_lb']:.2f}", f"{r['ceiling']:.2f}", f"{r['confidence']:.2f}",
                _eps(r["claimed_epsilon"], 2) if r["claimed_epsilon"] != "none" else "none"]
               for r in report["dp_audit"]["canary_rows"]])


def _doorping(settings: dict) -> str:
    keys = (("start", "start"), ("update_every", "update every"), ("restamp", "restamp"),
            ("target_weight", "target term"), ("contrast_weight", "contrast"))
    def show(v: Any) -> str:
        return ("on" if v else "off") if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{label} {show(settings[k])}" for k, label in keys if k in settings) or "-"


def backdoor_probes_table(supervised: dict, ipc50: dict) -> str:
    out = []
    for source, data in (("backdoor_supervised_probes", supervised), ("backdoor_ipc50_probes", ipc50)):
        for p in data["probes"]:
            bd = p["config"]["backdoor"]
            steps = {r["name"]: f"{r['asr']:.3f} / {r['cta']:.3f}" for r in p["rows"]}
            s = bd["settings"]
            out.append([f"{NAMES[bd['method']]} IPC {s['ipc']}, {s['iterations']} iterations",
                        f"{bd['size']}x{bd['size']}", pct(bd["fraction"], 0) + " %",
                        _doorping(bd.get("doorping_settings", {})), p["config"].get("seed", 0),
                        *(steps.get(k, "-") for k in ("clean", "naive", "doorping")), source])
    return md(["distillation", "trigger", "poisoned", "DOORPING settings", "seed", "clean ASR / CTA",
               "naive ASR / CTA", "DOORPING ASR / CTA", "raw"], out)


def backdoor_capacity_table(cap: dict) -> str:
    return md(["IPC", "trigger", "carriers (share of target-class slots)", "carriers / set", "ASR", "CTA", "seeds"],
              [[r["ipc"], f"{r['size']}x{r['size']}", f"{r['carriers']} ({pct(r['share'], 0)} %)",
                pct(r["carrier_fraction_of_set"], 0) + " %", f"{r['asr_mean']:.3f}", f"{r['cta_mean']:.3f}",
                len(r["runs"])] for r in cap["rows"]])


def backdoor_federated_table(fed: dict) -> str:
    defenses = list(dict.fromkeys(r["defense"] for r in fed["rows"]))
    cell = {(r["attack"], r["defense"]): r for r in fed["rows"]}
    out = []
    for attack in dict.fromkeys(r["attack"] for r in fed["rows"]):
        cells = []
        for d in defenses:
            r = cell.get((attack, d))
            cells.append("-" if r is None else f"{r['asr']:.3f} / {r['cta']:.3f}"
                         + (f" (dropped {', '.join(r['dropped'])})" if r["dropped"] else ""))
        out.append([attack, *cells])
    return md(["attack", *(f"defense {d}: ASR / CTA" for d in defenses)], out)


# -- reliability (the test suite's figures) --------------------------------------------------------

def hostile_table(figures: dict) -> str:
    attacks, fed, avg = figures["attacks"], figures["fedistill"], figures["fedavg"]
    rows = [["upload (fedistill train reply)", attacks["upload"],
             f"all refused; honest sets kept {fed['honest-sets-kept']} / {fed['honest-nodes']} and the global model "
             f"{'bit-identical' if fed['global-model-bit-identical'] else 'DIFFERENT'} to the attacker-free run's"],
            ["federated evaluation report", attacks["evaluation"],
             f"all left out ({fed['federated-rejected']} refused)"],
            ["FedAvg update", attacks["fedavg"],
             f"all refused before averaging ({avg['rejected']} over {avg['rounds']} rounds); accuracy "
             f"{avg['accuracy']:.4f} = attacker-free {avg['attacker-free-accuracy']:.4f}"],
            ["shown harmless by their own runs (client-id claim, forged accuracy at a legal weight)",
             attacks["shown-harmless-by-own-runs"], "victim kept bit-identical; mean moved within its bound"],
            ["**all**", f"**{figures['attack-kinds']}**", "rejected with their kind, or harmless"]]
    return md(["attack surface", "attacks", "outcome"], rows)


def kills_table(k: dict) -> str:
    rows = [["kill points (writes x phases)", f"{k['kill-points']} ({len(k['phases'])} phases)"],
            ["killed by a real SIGKILL at the point", k["killed-by-sigkill"]],
            ["kills that left a temp file", k["kills-leaving-a-temp-file"]],
            ["accepted sets at the kill / lost", f"{k['sets-accepted-at-kill']} / {k['sets-lost']}"],
            ["resumed runs identical to the uninterrupted run",
             f"{k['identical-to-uninterrupted']} / {k['of-resumable']}"],
            ["kills before config.json existed (resume refused: nothing accepted yet)", k["refused-no-config-yet"]],
            ["wall time", f"{k['seconds']:.0f} s"]]
    return md(["figure", "value"], rows)


def deploy_table(rows: list[dict]) -> str:
    by_mode: dict[str, list[dict]] = {}
    for row in rows:
        by_mode.setdefault(row["mode"], []).append(row)
    out = []
    for mode, runs in by_mode.items():
        def med(key: str) -> str:
            return f"{statistics.median(r[key] for r in runs):.1f} s"
        low, high = min(r["accepted"] for r in runs), max(r["accepted"] for r in runs)
        out.append([f"{mode} (approval {'on' if runs[0].get('approval') else 'off'})", len(runs), med("startup-s"),
                    med("flwr-run-s"), med("server-wall-s"), med("total-s"),
                    f"{low if low == high else f'{low}-{high}'} / {runs[0]['nodes']}",
                    ", ".join(pct(r["accuracy"]) for r in runs) + " %"])
    return md(["mode", "runs", "startup", "`flwr run`", "server loop", "total", "accepted", "accuracy"], out)


def fuzz_table(counts: dict) -> str:
    keys = ("mutations", "built", "flower-refused-to-build", "raw-rejected", "raw-flower-cannot-inflate")
    total = dict.fromkeys(keys, 0)
    out = []
    for name, c in counts.items():
        out.append([name, *(c.get(k, 0) for k in keys)])
        total = {k: v + c.get(k, 0) for k, v in total.items()}
    out.append(["**all**", *(f"**{v}**" for v in total.values())])
    return md(["fuzz test", "mutations", "built by Flower, rejected", "Flower refused to build",
               "as raw bytes: rejected", "not inflatable by Flower"], out)


def chunk_table(rows: list[dict]) -> str:
    return md(["forged Array object", "plus one chunk", "bytes sent", "bytes materialised", "peak RSS growth",
               "inflate time"],
              [[f"{r['array-object-bytes']:,} B ({r['repeat']:,} references)", f"{r['chunk-bytes'] >> 20} MiB",
                f"{r['bytes-sent']:,}", f"{r['bytes-materialised']:,} ({r['bytes-materialised'] / 2**20:,.0f} MiB)",
                f"{r['peak-rss-growth-mib']:,.0f} MiB", f"{r['inflate-seconds']:.1f} s"] for r in rows])


# -- the README's headline -------------------------------------------------------------------------

def headline_table(fed: dict, secret: dict, seeded: dict, mia: dict, *, link: Callable[[str], str]) -> str:
    def raw(*names: str) -> str:
        return ", ".join(f"[{n}.json]({link(str(RAW / (n + '.json')))})" for n in names)

    out = []
    for key, split, name in (("0.1", "Dirichlet 0.1", "oneshot-ipc20-0.1"), ("iid", "IID", "oneshot-iid")):
        r, at20 = fed[name], fedavg_at(fed[f"fedavg-{key}"], 20)
        ipc = 20 if "ipc20" in name else 10
        out.append([f"federated MNIST, 10 clients, {split}",
                    f"one-shot DM IPC {ipc}: **{pct(r['accuracy'])} %**, "
                    f"{r['mb-per-client']:.3f} MB uploaded per client",
                    f"FedAvg: {pct(at20['accuracy'])} % after 20 rounds, {at20['mb-per-client']:.3f} MB per client",
                    raw("federated")])
    dp = {(r["row"], r["target_epsilon"]): r for r in secret["rows"]}
    eps = sorted({e for _, e in dp if e != "inf"})
    nodp = next(r for r in seeded["rows"] if r["row"] == "dm (no DP)")
    series = " / ".join(pct(dp["dp-dm", e]["accuracy"], 1) for e in eps)
    sgd = " / ".join(pct(dp["dp-sgd", e]["accuracy"], 1) for e in eps)
    cfg = secret["settings"]
    out.append([f"DP distillation, central ({cfg['per_class']} images per class), IPC {cfg['ipc']}, "
                f"epsilon {' / '.join(f'{e:g}' for e in eps)} (delta {secret['delta']:g})",
                f"DP-DM set: **{series} %**",
                f"DP-SGD on the network: {sgd} %; DM without DP: {pct(nodp['accuracy'], 1)} %",
                raw("privacy_medium_secret", "privacy_medium")])
    attacks = mia["membership_inference"]["attacks"]

    def best(target: str, kinds: Callable[[str], bool]) -> dict:
        return max((a for a in attacks if a["target"] == target and kinds(a["attack"])),
                   key=lambda a: a["tpr_at_1pct_fpr"])
    model = lambda a: a != "distance-pixel"  # noqa: E731  (attacks on the trained model, not the set)
    dm_model, dm_set, dp_any = best("dm", model), best("dm", lambda a: a == "distance-pixel"), best("dp-dm", bool)
    real = best("real", model)
    dp_auc = max(a["auc"] for a in attacks if a["target"] == "dp-dm")
    dp_eps = next(r["epsilon"] for r in mia["dp_audit"]["accuracy_vs_epsilon"] if r["row"] == "dp-dm")
    out.append([f"membership inference, TPR at 1 % FPR ({mia['config']['shadows']} shadows)",
                f"DM set: **{dm_set['tpr_at_1pct_fpr']:.3f}** from the set itself, {dm_model['tpr_at_1pct_fpr']:.3f} "
                f"from its model ({dm_model['attack']}); DP-DM at epsilon {dp_eps:.0f}: "
                f"{dp_any['tpr_at_1pct_fpr']:.3f}, "
                f"every AUC <= {dp_auc:.3f}",
                f"model trained on the real members: {real['tpr_at_1pct_fpr']:.3f} ({real['attack']})",
                raw("attacks_medium")])
    return md(["measured", "fedistill", "baseline", "raw"], out)


# -- registry and the doc rewriter -----------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    sources: tuple[str, ...]  # JSON file names under docs/benchmarks/, passed to ``fn`` in this order
    fn: Callable[..., str]
    caption: bool = True  # a line naming the raw JSON (date, machine) above the table
    link: bool = False  # ``fn`` takes ``link=`` (doc-relative paths) for links inside the table


TABLES: dict[str, Table] = {
    "headline": Table(("federated", "privacy_medium_secret", "privacy_medium", "attacks_medium"), headline_table,
                      caption=False, link=True),
    "distill-cpu": Table(("distill_cpu",), distill_cpu_table),
    "distill-mnist70k": Table(MNIST70K_RUNS, full_mnist_table),
    "distill-cifar10": Table(CIFAR10_RUNS, cifar10_table),
    "dm-speed": Table(("dm_speed_eager", "dm_speed_compiled"), dm_speed_table),
    "distill-gpu": Table(("distill_paper_gpu",), gpu_table),
    "distill-gpu-meta": Table(("distill_paper_gpu",), gpu_meta_table),
    "cuda-smoke": Table(("distill_paper_gpu",), cuda_smoke_table),
    "kip-ipc1": Table(("distill_kip_ipc1_cpu", "distill_cpu"), kip_ipc1_table),
    "ipc50-cpu": Table(("distill_meta_ipc50_cpu",), ipc50_table),
    "kernel-memory": Table(("kernel_memory_cpu",), kernel_memory_table),
    "matching-cpu": Table(("distill_mtt_cpu", "distill_mtt400_cpu", "distill_cafe_cpu", "distill_idc_cpu",
                           "distill_cpu"), matching_cpu_table),
    "crossarch": Table(("applications_crossarch_all",), crossarch_table),
    "nas": Table(("applications_medium",), nas_table),
    "continual": Table(("applications_medium",), continual_table),
    "federated": Table(("federated",), mnist10k_federated_table),
    "crossover": Table(("federated",), crossover_table),
    "clients-100": Table(("federated",), clients100_table),
    "demo": Table(("demo_summary", "demo_config"), demo_table),
    "privacy-dp": Table(("privacy_medium_secret",), privacy_dp_table),
    "privacy-nodp": Table(("privacy_medium",), privacy_nodp_table),
    "before-after": Table(("privacy_before_after", "privacy_before_after_gm", "privacy_before_after_seed5"),
                          before_after_table),
    "federated-dp": Table(("federated_dp_eps8_summary", "federated"), federated_dp_table),
    "server-audit": Table(("server_audit",), server_audit_table),
    "membership": Table(("attacks_medium",), membership_table),
    "canary": Table(("attacks_medium",), canary_table),
    "backdoor-probes": Table(("backdoor_supervised_probes", "backdoor_ipc50_probes"), backdoor_probes_table),
    "backdoor-capacity": Table(("backdoor_capacity",), backdoor_capacity_table),
    "backdoor-federated": Table(("backdoor_federated_quick",), backdoor_federated_table),
    "hostile": Table(("hostile_clients",), hostile_table),
    "kills": Table(("kills",), kills_table),
    "fuzz": Table(("fuzz_counts",), fuzz_table),
    "deploy": Table(("deploy_approval",), deploy_table),
    "chunks": Table(("chunk_inflation",), chunk_table),
    "scale": Table(("scale", "scale_100_after_per_message_pulls"), scale_table),
}


def _provenance(data: Any) -> str:
    """What a raw file says about when and where it was measured (nothing if it does not say)."""
    if not isinstance(data, dict):
        return ""
    machine = data.get("machine", data.get("_machine"))
    if isinstance(machine, dict):
        machine = ", ".join(f"{k} {v}" for k, v in machine.items())
    return "; ".join(str(x) for x in (data.get("date"), machine) if x)


def render(name: str, doc: str, root: Path = ROOT) -> str:
    """The whole generated block (markers included) of table ``name`` as it belongs in ``doc``."""
    if name not in TABLES:
        raise ValueError(f"unknown generated table {name!r}; known: {sorted(TABLES)}")
    table = TABLES[name]
    paths = [RAW / f"{s}.json" for s in table.sources]
    datas = [json.loads((root / p).read_text()) for p in paths]

    def link(path: str) -> str:
        return Path(os.path.relpath(root / path, (root / doc).parent)).as_posix()

    body = table.fn(*datas, link=link) if table.link else table.fn(*datas)
    lines = [f"<!-- generated: {name} from {', '.join(p.as_posix() for p in paths)} by "
             f"simulations/benchmark_tables.py; do not edit -->"]
    if table.caption:
        said = [f"[{p.name}]({link(p.as_posix())})" + (f" ({_provenance(d)})" if _provenance(d) else "")
                for p, d in zip(paths, datas)]
        lines += ["Raw: " + ", ".join(said) + ".", ""]
    return "\n".join([*lines, body, "", END.format(name=name)])


def update(text: str, doc: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """``text`` with every generated block regenerated, and the names of the blocks found."""
    lines, out, names, i = text.split("\n"), [], [], 0
    while i < len(lines):
        start = START.match(lines[i])
        if not start:
            out.append(lines[i])
            i += 1
            continue
        name = start["name"]
        try:
            end = lines.index(END.format(name=name), i + 1)
        except ValueError:
            raise ValueError(f"{doc}: generated table {name!r} has no '{END.format(name=name)}' line") from None
        out.extend(render(name, doc, root).split("\n"))
        names.append(name)
        i = end + 1
    return "\n".join(out), names


def hand_tables(text: str) -> list[int]:
    """Line numbers (1-based) of table rows outside generated blocks and code fences."""
    found, inside, fence = [], False, False
    for n, line in enumerate(text.split("\n"), 1):
        if line.startswith("```"):
            fence = not fence
        elif START.match(line):
            inside = True
        elif line.startswith("<!-- end generated: "):
            inside = False
        elif line.startswith("|") and not inside and not fence:
            found.append(n)
    return found


def problems(root: Path = ROOT, docs: tuple[str, ...] = DOCS) -> list[str]:
    """Everything ``--check`` reports: stale or unknown blocks, unused tables, hand-typed tables."""
    found, used = [], set()
    for doc in docs:
        text = (root / doc).read_text()
        try:
            new, names = update(text, doc, root)
        except ValueError as err:
            found.append(str(err))
            continue
        used.update(names)
        if new != text:
            old_blocks = dict(_blocks(text))
            for name, block in _blocks(new):
                if old_blocks.get(name) != block:
                    found.append(f"{doc}: table {name!r} differs from its JSON (run simulations/benchmark_tables.py)")
        if doc in NO_HAND_TABLES:
            found += [f"{doc}:{n}: a table row outside a generated block" for n in hand_tables(text)]
    found += [f"table {name!r} is in none of {', '.join(docs)}" for name in sorted(set(TABLES) - used)]
    return found


def _blocks(text: str) -> list[tuple[str, str]]:
    pattern = re.compile(r"^<!-- generated: ([a-z0-9-]+) .*?^<!-- end generated: \1 -->$", re.M | re.S)
    return [(m.group(1), m.group(0)) for m in pattern.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift and exit 1 instead of rewriting")
    parser.add_argument("--print", nargs="+", metavar="TABLE", choices=sorted(TABLES), dest="show",
                        help="print these tables' blocks (as they belong in BENCHMARKS.md)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    args = parser.parse_args(argv)
    if args.show:
        print("\n\n".join(render(name, "BENCHMARKS.md", args.root) for name in args.show))
        return 0
    if args.check:
        found = problems(args.root)
        print("\n".join(found) if found else "every generated table matches its JSON", file=sys.stderr)
        return 1 if found else 0
    for doc in DOCS:
        text = (args.root / doc).read_text()
        new, names = update(text, doc, args.root)
        if new != text:
            (args.root / doc).write_text(new)
        print(f"{doc}: {len(names)} table(s){' rewritten' if new != text else ', unchanged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
