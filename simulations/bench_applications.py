"""Benchmark the applications of a distilled set on the bundled MNIST sample (issue 8).

DM at IPC 10, then: cross-architecture evaluation (ConvNet, MLP, LeNet, AlexNet, ResNet-18,
beside a random real subset of the same size), a NAS proxy (a ConvNet grid ranked after
training on the DM set, on the random subset and on the whole pool; Spearman rho against the
pool), and class-incremental MNIST in 5 steps of 2 classes with a GDumb memory of k = IPC
images per class (DM-distilled, random, herding). Writes ``<preset>.json``, ``<preset>.md`` and
PNG plots under ``--out``.

    python simulations/bench_applications.py --quick     # smoke run, ~1-2 minutes on 2 cores
    python simulations/bench_applications.py --preset medium   # width-32 nets, 2 seeds: 53 min on 2 cores (measured)
    python simulations/bench_applications.py             # default preset: hours on 2 cores (estimate)
    python simulations/bench_applications.py --parts nas --device cuda
    python simulations/bench_applications.py --preset medium --parts crossarch \
        --sets mtt=bench_results/distill/mtt_ipc10.npz dsa=bench_results/distill/dsa_ipc10.npz
    python simulations/bench_applications.py --preset medium --parts crossarch --no-baselines \
        --seeds 0 --sets kip=bench_results/distill/kip_ipc10.npz   # only the saved set, one seed

The budgets are experiment files, conf/applications/<preset>.toml (conf/README.md); ``--config
PATH`` runs one of your own.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill import load_dataset, random_real_subset  # noqa: E402
from distill.continual import ContinualConfig, run_continual  # noqa: E402
from distill.crossarch import DEFAULT_ARCHS, CrossArchReport, cross_arch_evaluate  # noqa: E402
from distill.data import DatasetInfo, LabeledImages  # noqa: E402
from distill.methods import MethodConfig, config_fields, distill  # noqa: E402
from distill.nas import GROUND_TRUTH, NASReport, convnet_grid, nas_proxy  # noqa: E402
from distill.synthetic import SyntheticSet  # noqa: E402
from distill.task import method_config  # noqa: E402
from distill.train import TrainConfig  # noqa: E402
from simulations.experiments import (ApplicationsExperiment, add_experiment_args,  # noqa: E402
                                     chosen_experiment, method_task)

PARTS = ("crossarch", "nas", "continual")


Preset = ApplicationsExperiment


def dm_config(p: Preset, device: str, continual: bool = False) -> MethodConfig:
    """The DM config of the crossarch/nas set (``[methods.dm]``) or of the continual memories
    (``[cl-methods.dm]``), at the experiment's IPC and network, seed 0."""
    task, node = method_task("dm", p.net, (p.cl_methods if continual else p.methods).get("dm", {}), ipc=p.ipc)
    return method_config(task, seed=0, device=device, **node)


def continual_settings(config: MethodConfig) -> dict[str, Any]:
    """``config`` as ContinualConfig's method settings: every field but those the protocol sets
    (ipc = k, seed) and those the method fixes."""
    return {k: getattr(config, k) for k in config_fields(config.method) if k not in ("ipc", "seed")}


def run_crossarch(sets: dict[str, tuple[torch.Tensor, torch.Tensor]], test: LabeledImages,
                  p: Preset, device: str) -> dict[str, CrossArchReport]:
    cfg = TrainConfig(device=device)
    out = {}
    for name, (x, y) in sets.items():
        out[name] = cross_arch_evaluate(x, y, test, cfg, archs=DEFAULT_ARCHS, seeds=p.seeds,
                                        arch_kwargs={"convnet": p.arch_kwargs}, epochs=dict(p.arch_epochs))
        print(out[name].markdown(name), flush=True)
    return out


def run_nas(sets: dict[str, tuple[torch.Tensor, torch.Tensor]], train: LabeledImages,
            test: LabeledImages, p: Preset, device: str) -> NASReport:
    pool = train if p.nas_pool_size is None else random_real_subset(
        train, p.nas_pool_size // train.info.num_classes, seed=0)
    grid = convnet_grid(**p.nas_grid)
    report = nas_proxy(sets, pool, test, grid, TrainConfig(epochs=p.nas_proxy_epochs, device=device),
                       TrainConfig(epochs=p.nas_pool_epochs, device=device), seeds=p.nas_seeds)
    for source, s in report.summary().items():
        print(f"NAS proxy {source}: spearman {s['spearman']:.3f}, picks {s['selected']} "
              f"({100 * s['selected_true_acc']:.2f} % vs best {100 * s['best_true_acc']:.2f} %)", flush=True)
    return report


def run_cl(train: LabeledImages, test: LabeledImages, p: Preset, device: str) -> dict[str, dict]:
    out = {}
    for buffer in p.cl_buffers:
        runs = []
        for seed in p.cl_seeds:
            settings = continual_settings(dm_config(p, device, continual=True))
            cfg = ContinualConfig(k=p.ipc, buffer=buffer, method="dm", method_settings=settings, seed=seed,
                                  train=TrainConfig(epochs=p.cl_epochs, device=device, arch_kwargs=p.arch_kwargs))
            runs.append(run_continual(train, test, cfg).to_dict())
        per_step = [statistics.mean(r["accuracies"][i] for r in runs) for i in range(len(runs[0]["accuracies"]))]
        finals, averages = [r["final"] for r in runs], [r["average"] for r in runs]
        out[buffer] = {"runs": runs, "mean_per_step": per_step,
                       "final_mean": statistics.mean(finals), "final_std": statistics.pstdev(finals),
                       "average_mean": statistics.mean(averages), "average_std": statistics.pstdev(averages)}
        print(f"continual {buffer:<8} per step {[round(100 * a, 1) for a in per_step]} | final "
              f"{100 * out[buffer]['final_mean']:.2f} | average {100 * out[buffer]['average_mean']:.2f}", flush=True)
    return out


def load_extra_sets(specs: list[str], info: DatasetInfo) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``NAME=PATH`` saved sets (any method's, e.g. bench_distill's ``<method>_ipc<k>.npz``) as
    (decoded images, labels as stored: learned soft labels, KIP's and FRePo's by default, are
    part of what a set teaches, and the trainer takes them); refused if distilled from another
    dataset."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--sets takes NAME=PATH, got {spec!r}")
        if name in ("dm", "random") or name in out:
            raise SystemExit(f"--sets name {name!r} is taken")
        syn = SyntheticSet.load(path)
        if syn.meta.dataset.name != info.name:
            raise SystemExit(f"{path}: distilled from {syn.meta.dataset.name!r}, not {info.name!r}")
        out[name] = (syn.images.detach(), syn.labels.detach())
    return out


def markdown(report: dict) -> str:
    lines = [f"# Applications of a distilled set ({report['preset']} preset)", "",
             f"{report['machine']}; {report['date']}; `{report['command']}`", "",
             f"DM IPC {report['ipc']}: {report['dm']['iterations']} iterations, {report['dm']['seconds']:.0f} s."
             if report["dm"]["iterations"] else "No DM set distilled (saved sets only)."]
    if "crossarch" in report:
        archs = list(DEFAULT_ARCHS)
        lines += ["", "## Cross-architecture (test accuracy %, mean +- std over seeds)", "",
                  "| set | " + " | ".join(archs) + " |", "| --- " * (len(archs) + 1) + "|"]
        for name, rows in report["crossarch"].items():
            cells = {r["arch"]: f"{100 * r['mean']:.2f} +- {100 * r['std']:.2f}" for r in rows}
            lines.append(f"| {name} | " + " | ".join(cells[a] for a in archs) + " |")
    if "nas" in report:
        lines += ["", f"## NAS proxy ({len(report['nas']['rows'])} ConvNets)", "",
                  "| proxy | Spearman rho vs whole pool | picks | its true acc % | best true acc % |",
                  "| --- | --- | --- | --- | --- |"]
        for source, s in report["nas"]["summary"].items():
            lines.append(f"| {source} | {s['spearman']:.3f} | {s['selected']} | "
                         f"{100 * s['selected_true_acc']:.2f} | {100 * s['best_true_acc']:.2f} |")
    if "continual" in report:
        steps = len(next(iter(report["continual"].values()))["mean_per_step"])
        lines += ["", f"## Class-incremental MNIST (GDumb memory, k = {report['ipc']} per class)", "",
                  "| memory | " + " | ".join(f"step {i + 1}" for i in range(steps)) + " | final | average |",
                  "| --- " * (steps + 3) + "|"]
        for buffer, r in report["continual"].items():
            cells = [f"{100 * a:.2f}" for a in r["mean_per_step"]]
            lines.append(f"| {buffer} | " + " | ".join(cells) + f" | {100 * r['final_mean']:.2f} | "
                         f"{100 * r['average_mean']:.2f} |")
    return "\n".join(lines) + "\n"


def plots(report: dict, out: Path, preset: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    if report.get("crossarch"):
        archs, names = list(DEFAULT_ARCHS), list(report["crossarch"])
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 3), 4))
        width = 0.8 / len(names)
        colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")  # no two sets share a colour
        for i, name in enumerate(names):
            by_arch = {r["arch"]: r for r in report["crossarch"][name]}
            ax.bar([a + (i - (len(names) - 1) / 2) * width for a in range(len(archs))],
                   [100 * by_arch[a]["mean"] for a in archs], width,
                   yerr=[100 * by_arch[a]["std"] for a in archs], label=name, capsize=2, color=colours(i))
        ax.set(xticks=range(len(archs)), xticklabels=archs, ylabel="test accuracy (%)",
               title="cross-architecture: trained on each set", ylim=(50, 100))
        ax.legend(fontsize=7, ncol=2)
        figures.append((fig, out / f"{preset}_crossarch.png"))
    if "nas" in report:
        rows, summary = report["nas"]["rows"], report["nas"]["summary"]
        fig, ax = plt.subplots(figsize=(5, 4))
        for source, s in summary.items():
            ax.scatter([100 * r[f"acc_{GROUND_TRUTH}"] for r in rows], [100 * r[f"acc_{source}"] for r in rows],
                       label=f"{source} (rho {s['spearman']:.2f})", s=18)
        ax.set(xlabel="accuracy trained on the whole pool (%)", ylabel="accuracy trained on the proxy (%)",
               title="NAS proxy: ConvNet grid")
        ax.legend()
        figures.append((fig, out / f"{preset}_nas_proxy.png"))
    if "continual" in report:
        fig, ax = plt.subplots(figsize=(5, 4))
        for buffer, r in report["continual"].items():
            steps = range(1, len(r["mean_per_step"]) + 1)
            ax.plot(steps, [100 * a for a in r["mean_per_step"]], marker="o", label=buffer)
        ax.set(xlabel="step (2 new classes each)", ylabel="accuracy on classes seen (%)",
               title=f"class-incremental MNIST, k = {report['ipc']}", xticks=list(range(1, 6)))
        ax.legend()
        figures.append((fig, out / f"{preset}_continual.png"))
    for fig, path in figures:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return [path for _, path in figures]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_experiment_args(p, "applications", default="default")
    p.add_argument("--quick", action="store_true", help="smoke run (--preset quick)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which applications to run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench_results/applications", help="output directory")
    p.add_argument("--sets", nargs="+", default=[], metavar="NAME=PATH",
                   help="saved synthetic sets evaluated beside DM's in the crossarch and nas parts")
    p.add_argument("--no-baselines", action="store_true",
                   help="evaluate only the --sets: distill no DM set and draw no random subset")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="evaluation seeds of the crossarch part (default: the preset's)")
    args = p.parse_args(argv)
    if args.no_baselines and not args.sets:
        p.error("--no-baselines needs --sets: there would be nothing to evaluate")
    if args.no_baselines and "continual" in args.parts:
        p.error("--no-baselines applies to crossarch and nas; the continual part distills its own buffers")
    try:
        preset_name, preset = chosen_experiment(args, "applications", default="default")
    except ValueError as err:
        p.error(str(err))
    if args.seeds is not None:
        preset = replace(preset, seeds=tuple(args.seeds))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    data = load_dataset()
    extra = load_extra_sets(args.sets, data.info)  # before any training: a bad path fails at once
    test = data.test if preset.test_per_class is None else data.test.first_per_class(preset.test_per_class)
    report: dict = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                               f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                    "date": time.strftime("%Y-%m-%d"), "preset": preset_name, "device": args.device,
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "ipc": preset.ipc,
                    "test_images": len(test), "settings": asdict(preset)}
    report["dm"] = {"iterations": 0, "seconds": 0.0}
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = dict(extra)
    if {"crossarch", "nas"} & set(args.parts) and not args.no_baselines:
        t0 = time.perf_counter()
        syn = distill(data.train, dm_config(preset, args.device))
        report["dm"] = {"iterations": syn.meta.iterations, "seconds": time.perf_counter() - t0}
        rand = random_real_subset(data.train, preset.ipc, seed=0)
        sets = {"dm": (syn.images, syn.hard_labels()), "random": (rand.images, rand.labels), **extra}
        syn.save(out / f"{preset_name}_dm_ipc{preset.ipc}.npz")
    if "crossarch" in args.parts:
        chosen = sets if preset.crossarch_random else {k: v for k, v in sets.items() if k != "random"}
        report["crossarch"] = {k: v.rows() for k, v in run_crossarch(chosen, test, preset, args.device).items()}
    if "nas" in args.parts:
        nas = run_nas(sets, data.train, test, preset, args.device)
        report["nas"] = {"rows": nas.rows(), "summary": nas.summary()}
    if "continual" in args.parts:
        report["continual"] = run_cl(data.train, test, preset, args.device)
    report["seconds"] = time.perf_counter() - start

    (out / f"{preset_name}.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / f"{preset_name}.md").write_text(md)
    written = plots(report, out, preset_name)
    print(md)
    print(f"wrote {out / f'{preset_name}.json'}, {out / f'{preset_name}.md'}, "
          + ", ".join(str(w) for w in written) + f" in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
