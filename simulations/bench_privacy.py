"""Accuracy vs epsilon on the bundled MNIST sample: DP-DM and DP gradient matching beside DP-SGD.

IPC 10, delta 1e-5, epsilon in {1, 2, 4, 8, inf}: each DP distillation method's synthetic set
is evaluated by training fresh networks on it (several seeds); the baseline trains the same
kind of network directly on the real data with Opacus DP-SGD at the same (epsilon, delta).
At epsilon = inf the rows are the non-private counterparts (DM and DSA from noise, plain SGD).
KIP-rho rows: non-private DM (real initialisation) at rho in {0, 0.5, 0.9}. Writes JSON, a
markdown table and a PNG plot (accuracy vs epsilon).

    python simulations/bench_privacy.py --quick          # smoke run, ~2 min on 2 CPU cores
    python simulations/bench_privacy.py --preset medium  # about an hour on 2 quiet CPU cores (width-64 nets)
    python simulations/bench_privacy.py                  # the full run: hours on CPU

The budgets are experiment files, conf/privacy/<preset>.toml (conf/README.md); ``--config PATH``
runs one of your own.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill import load_dataset  # noqa: E402
from distill.data import LabeledImages  # noqa: E402
from distill.methods import distill  # noqa: E402
from distill.networks import seeded_network  # noqa: E402
from distill.task import method_config  # noqa: E402
from distill.train import TrainConfig, accuracy, evaluate, train_network  # noqa: E402
from privacy.dpsgd_baseline import DPSGDConfig, train_dpsgd  # noqa: E402
from simulations.experiments import (PrivacyExperiment, add_experiment_args, chosen_experiment,  # noqa: E402
                                     load_experiment, method_task, preset_names)

EPSILONS = (1.0, 2.0, 4.0, 8.0, math.inf)
# Run order: the rows the targets are judged on first (epsilon 8 against no DP, then KIP-rho), so
# a run cut off by its time budget keeps them (rows.jsonl is written row by row).
EPSILON_ORDER = (8.0, math.inf, 1.0, 2.0, 4.0)
RHO_AFTER = math.inf
RHOS = (0.0, 0.5, 0.9)


Preset = PrivacyExperiment
# name -> experiment, as conf/privacy/ holds them (bench_before_after.py reads PRESETS["medium"])
PRESETS = {name: load_experiment(name, "privacy") for name in preset_names("privacy")}


def _evaluate(images: torch.Tensor, labels: torch.Tensor, test: LabeledImages, p: Preset) -> list[float]:
    cfg = TrainConfig(arch_kwargs={"width": p.eval_net_width, "depth": p.eval_net_depth}, epochs=p.eval_epochs)
    return list(evaluate(images, labels, test, cfg, seeds=p.eval_seeds).accuracies)


def row_config(method: str, settings: dict[str, Any], p: Preset) -> Any:
    """A row's method config: ``method``'s table in the file, then the row's own run-config keys
    (``epsilon``, ``init``, ``rho``...; a ``seed`` is the config's seed, 0 when absent)."""
    settings = dict(settings)
    seed = int(settings.pop("seed", 0))
    task, node = method_task(method, p.net, p.methods.get(method, {}), settings, ipc=p.ipc)
    return method_config(task, seed=seed, **node)


def distilled_row(name: str, method: str, eps: float, settings: dict, train: LabeledImages,
                  test: LabeledImages, p: Preset) -> dict:
    """Distill, evaluate, and record what the set cost (epsilon and sigma from its metadata)."""
    start = time.perf_counter()
    syn = distill(train, row_config(method, settings, p))
    seconds = time.perf_counter() - start
    accs = _evaluate(syn.images, syn.labels, test, p)
    priv = dict(syn.meta.privacy)
    return {"row": name, "method": method, "target_epsilon": eps, "accuracies": accs,
            "accuracy": sum(accs) / len(accs), "epsilon": priv.get("epsilon", math.inf),
            "privacy": priv, "seconds": seconds}


def dpsgd_row(eps: float, train: LabeledImages, test: LabeledImages, p: Preset) -> dict:
    """The baseline: the network trained on the real data, with DP-SGD (or plain SGD at inf)."""
    start = time.perf_counter()
    accs, priv = [], {}
    dpsgd_net = {"width": p.dpsgd_net_width, "depth": p.dpsgd_net_depth}
    for seed in p.eval_seeds:
        if math.isinf(eps):
            info = train.info
            net = seeded_network("convnet", info.channels, info.num_classes, (info.height, info.width),
                                 seed=seed, **dpsgd_net)
            train_network(net, train.images, train.labels,
                          TrainConfig(arch_kwargs=dpsgd_net, epochs=p.dpsgd_epochs, dsa=False), seed=seed)
        else:
            res = train_dpsgd(train, DPSGDConfig(epsilon=eps, epochs=p.dpsgd_epochs,
                                                 arch_kwargs=dpsgd_net, seed=seed))
            net = res.net
            priv = {k: v for k, v in asdict(res).items() if k != "net"}
        accs.append(accuracy(net, test))
    return {"row": "dp-sgd", "method": "dp-sgd", "target_epsilon": eps, "accuracies": accs,
            "accuracy": sum(accs) / len(accs), "epsilon": priv.get("epsilon", math.inf),
            "privacy": priv, "seconds": time.perf_counter() - start}


def run(p: Preset, log, epsilons: tuple[float, ...] = EPSILON_ORDER) -> list[dict]:
    data = load_dataset("mnist10k")
    train = data.train.first_per_class(p.per_class) if p.per_class > 0 else data.train
    test = data.test if p.test_size <= 0 else data.test.subset(torch.arange(p.test_size))
    rows = []
    for eps in epsilons:
        if math.isinf(eps):  # the non-private counterparts, from noise as the DP rows
            dm = ("dm (no DP)", "dm", {"init": "noise"})
            gm = ("dsa (no DP)", "dsa", {"init": "noise"})
        else:
            dm = ("dp-dm", "dp-dm", {"epsilon": eps})
            gm = ("dpsgd-gm", "dpsgd-gm", {"epsilon": eps})
        for name, method, settings in (dm, gm):
            rows.append(distilled_row(name, method, eps, settings, train, test, p))
            log(rows[-1])
        rows.append(dpsgd_row(eps, train, test, p))
        log(rows[-1])
        if eps == RHO_AFTER:
            for rho in RHOS:
                rows.append(distilled_row(f"dm rho={rho}", "dm", math.inf,
                                          {"init": "real", "rho": rho, "iterations": p.rho_iterations},
                                          train, test, p))
                log(rows[-1])
    return sorted(rows, key=lambda r: (r["row"].startswith("dm rho"), r["target_epsilon"]))


def table(rows: list[dict]) -> str:
    lines = ["| row | target eps | eps spent (accountant) | sigma | accuracy % | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        priv = r["privacy"]
        spent = "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.3f} ({priv.get('accountant', '')})"
        sigma = f"{priv['sigma']:.3f}" if "sigma" in priv else "-"
        accs = [100 * a for a in r["accuracies"]]
        std = (sum((a - sum(accs) / len(accs)) ** 2 for a in accs) / len(accs)) ** 0.5
        lines.append(f"| {r['row']} | {r['target_epsilon']:g} | {spent} | {sigma} | "
                     f"{100 * r['accuracy']:.2f} +- {std:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def compare(old: list[dict], new: list[dict]) -> str:
    """Markdown: each DP row of ``new`` beside the same row of an earlier run ``old`` (raw JSON rows)."""
    before = {(r["row"], r["target_epsilon"]): r for r in old}
    lines = ["| row | target eps | before: accuracy % | now: accuracy % | change (points) |",
             "| --- | --- | --- | --- | --- |"]
    for r in new:
        o = before.get((r["row"], r["target_epsilon"]))
        if o is None:
            continue
        a, b = 100 * o["accuracy"], 100 * r["accuracy"]
        lines.append(f"| {r['row']} | {r['target_epsilon']:g} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    finite = [e for e in EPSILONS if not math.isinf(e)]
    x_inf = 2 * max(finite)
    for family, names in (("DP-DM", ("dp-dm", "dm (no DP)")), ("DP gradient matching", ("dpsgd-gm", "dsa (no DP)")),
                          ("DP-SGD on the network", ("dp-sgd",))):
        pts = sorted((x_inf if math.isinf(r["target_epsilon"]) else r["target_epsilon"], 100 * r["accuracy"])
                     for r in rows if r["row"] in names)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=family)
    ax.set_xscale("log", base=2)
    ax.set_xticks([*finite, x_inf], [f"{e:g}" for e in finite] + ["inf"])
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MNIST sample, IPC 10")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _jsonable(x):
    """Strict JSON: infinite epsilons become the string "inf"."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny subsets and budgets (--preset quick)")
    add_experiment_args(parser, "privacy", default="full")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_privacy",
                        help="folder for results.json, table.md and accuracy_vs_epsilon.png")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--epsilons", default="", help="comma-separated subset of 8,inf,1,2,4 (default: all)")
    parser.add_argument("--compare", type=Path, default=None,
                        help="an earlier results.json: print each row beside its earlier accuracy")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        preset_name, preset = chosen_experiment(args, "privacy", default="full")
    except ValueError as err:
        parser.error(str(err))
    args.out.mkdir(parents=True, exist_ok=True)

    def log(row: dict) -> None:  # each row also lands on disk at once: a cut-off run keeps it
        with open(args.out / "rows.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(row), allow_nan=False) + "\n")
        print(f"{row['row']:>14} eps={row['target_epsilon']:<4g} spent={row['epsilon']:.3f} "
              f"acc={100 * row['accuracy']:.2f}% ({row['seconds']:.0f}s)", flush=True)

    epsilons = tuple(float(e) for e in args.epsilons.split(",")) if args.epsilons else EPSILON_ORDER
    rows = run(preset, log, epsilons)
    result = {"preset": preset_name, "settings": asdict(preset), "delta": 1e-5, "noise": "secret",
              "command": " ".join(["python", "simulations/bench_privacy.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d"),
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(_jsonable(result), indent=2, allow_nan=False))
    (args.out / "table.md").write_text(table(rows) + "\n")
    plot(rows, args.out / "accuracy_vs_epsilon.png")
    print(table(rows))
    if args.compare is not None:
        text = compare(json.loads(args.compare.read_text())["rows"], _jsonable(rows))
        (args.out / "compare.md").write_text(text + "\n")
        print(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
