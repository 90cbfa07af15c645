"""Benchmark the distillation core on the bundled MNIST sample.

For each method (random real subset, DM, DC, DSA, KIP, RFAD, FRePo, BPTT, MTT, CAFE) and IPC: test
accuracy mean +- std over several evaluation seeds, seconds per outer iteration, peak
memory; plus the whole-pool accuracy with the same evaluator. Each (method, IPC) runs in its
own subprocess so its peak RSS is its own. ``--reference-dir`` adds the DM speed comparison
against the reference code.

    python simulations/bench_distill.py --quick                       # one-minute smoke run
    python simulations/bench_distill.py --preset cpu --ipc 1 10       # ~20 min per method/IPC
    python simulations/bench_distill.py --speed-only --reference-dir ../DatasetCondensation
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill import load_dataset, make_config, random_real_subset  # noqa: E402
from distill.methods import distill  # noqa: E402
from distill.synthetic import SetMetadata, SyntheticSet  # noqa: E402
from distill.train import TrainConfig, evaluate  # noqa: E402
from distill.visualize import save_grid  # noqa: E402

METHODS = ("random", "dm", "dc", "dsa", "kip", "rfad", "frepo", "bptt", "mtt", "cafe")


@dataclass(frozen=True)
class Preset:
    """Iterations and method settings per (method, ipc), and the evaluator."""

    iterations: dict[tuple[str, int], int]
    settings: dict[str, dict] = field(default_factory=dict)
    gm_loops: dict[int, tuple[int, int]] = field(default_factory=dict)
    eval_epochs: dict[int, int] = field(default_factory=dict)
    pool_epochs: int = 20

    def iters(self, method: str, ipc: int) -> int:
        return self.iterations.get((method, ipc), self.iterations.get((method, 0), 0))


PRESETS = {
    # Smoke run: every code path, tiny budgets.
    "quick": Preset(
        iterations={("dm", 0): 3, ("dc", 0): 1, ("dsa", 0): 1,
                    ("kip", 0): 3, ("rfad", 0): 3, ("frepo", 0): 3, ("bptt", 0): 2,
                    ("mtt", 0): 2, ("cafe", 0): 1},
        settings={"dm": {"batch_real": 64}, "dc": {"batch_real": 32}, "dsa": {"batch_real": 32},
                  "kip": {"batch_real": 64}, "rfad": {"batch_real": 64, "n_models": 2},
                  "frepo": {"batch_real": 64}, "bptt": {"batch_real": 64, "inner_steps": 5, "truncate": 5},
                  "mtt": {"num_experts": 1, "expert_train_epochs": 2, "max_start_epoch": 0, "expert_epochs": 1,
                          "syn_steps": 2, "expert_cache": "bench_results/experts-quick"},
                  "cafe": {"batch_real": 64, "outer_loop": 1, "inner_loop": 1}},
        gm_loops={1: (1, 1), 10: (2, 2), 50: (2, 2)},
        eval_epochs={1: 20, 10: 20, 50: 10}, pool_epochs=1),
    # About 20 minutes per method and IPC on a 2-core CPU (measured iteration costs).
    "cpu": Preset(
        iterations={("dm", 1): 600, ("dm", 10): 600, ("dm", 50): 400,
                    ("dc", 1): 200, ("dsa", 1): 200, ("dc", 10): 40, ("dsa", 10): 40,
                    ("dc", 50): 15, ("dsa", 50): 15,
                    ("kip", 1): 4000, ("kip", 10): 2000, ("kip", 50): 500,
                    ("rfad", 1): 1500, ("rfad", 10): 600, ("rfad", 50): 120,
                    ("frepo", 1): 5000, ("frepo", 10): 1500, ("frepo", 50): 300,
                    ("bptt", 1): 600, ("bptt", 10): 150, ("bptt", 50): 25,
                    ("mtt", 1): 300, ("mtt", 10): 200, ("mtt", 50): 60,
                    ("cafe", 1): 100, ("cafe", 10): 40, ("cafe", 50): 15},
        settings={"dc": {"batch_real": 64}, "dsa": {"batch_real": 64},
                  "bptt": {"inner_steps": 10, "truncate": 5}, "cafe": {"batch_real": 256},
                  # Experts and student at width 32: at width 128 the 30 expert epochs alone ran over
                  # 10 min on a shared core without finishing. The evaluator stays width 128.
                  "mtt": {"arch_kwargs": {"width": 32}}},
        gm_loops={1: (1, 1), 10: (10, 10), 50: (10, 10)},
        eval_epochs={1: 1000, 10: 1000, 50: 500}, pool_epochs=20),
    # The papers' settings (GPU): DM 20k iterations, DC/DSA 1000, 1000 evaluation epochs.
    # DC/DSA loops as in Zhao et al. (outer, inner): IPC 1 (1, 1), IPC 10 (10, 50), IPC 50 (50, 10).
    "paper": Preset(
        iterations={("dm", 0): 20000, ("dc", 0): 1000, ("dsa", 0): 1000,
                    ("kip", 0): 5000, ("rfad", 0): 5000, ("frepo", 0): 20000, ("bptt", 0): 5000,
                    ("mtt", 0): 5000, ("cafe", 0): 1000},
        gm_loops={1: (1, 1), 10: (10, 50), 50: (50, 10)},
        eval_epochs={1: 1000, 10: 1000, 50: 1000}, pool_epochs=50),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_job(method: str, ipc: int, preset_name: str, seeds: int, device: str, out_dir: Path,
            time_limit: float | None = None, overrides: dict | None = None,
            eval_epochs: int | None = None) -> dict:
    """Distill (or subsample) and evaluate one (method, ipc); runs inside its own process."""
    preset = PRESETS[preset_name]
    data = load_dataset()
    base_rss = peak_rss_mb()  # torch + data loaded, before any distillation
    iterations = preset.iters(method, ipc)
    stamps: list[float] = []
    start = time.perf_counter()
    if method == "random":
        subset = random_real_subset(data.train, ipc, seed=0)
        syn = SyntheticSet(subset.images, subset.labels, SetMetadata(data.info, "random", ipc))
    else:
        settings = dict(preset.settings.get(method, {}))
        if method in ("dc", "dsa") and ipc in preset.gm_loops:
            settings["outer_loop"], settings["inner_loop"] = preset.gm_loops[ipc]
        settings.update(overrides or {})
        iterations = int(settings.pop("iterations", iterations))  # --set m.iterations=N beats the preset
        config = make_config(method, ipc=ipc, iterations=iterations, seed=0, device=device,
                             time_limit_s=time_limit, **settings)
        syn = distill(data.train, config, callback=lambda it, loss: stamps.append(time.perf_counter()))
    distill_s = time.perf_counter() - start
    distill_rss = peak_rss_mb()  # ru_maxrss only grows: this is the distillation's peak
    steps = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    eval_cfg = TrainConfig(epochs=eval_epochs or preset.eval_epochs.get(ipc, 300), device=device)
    result = evaluate(syn.images, syn.labels, data.test, eval_cfg, seeds=tuple(range(seeds)))
    name = f"{method}_ipc{ipc}"
    syn.save(out_dir / f"{name}.npz")
    save_grid(syn, out_dir / f"{name}.png")
    return {
        "method": method, "ipc": ipc, "preset": preset_name, "iterations": syn.meta.iterations,
        "iterations_configured": iterations, "overrides": overrides or {},
        "sec_per_iter": statistics.median(steps) if steps else 0.0, "distill_seconds": distill_s,
        "acc_mean": result.mean, "acc_std": result.std, "accuracies": list(result.accuracies),
        "eval_epochs": eval_cfg.epochs, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base_rss,
        "distill_peak_rss_mb": distill_rss,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def run_pool(preset_name: str, seeds: int, device: str) -> dict:
    data = load_dataset()
    cfg = TrainConfig(epochs=PRESETS[preset_name].pool_epochs, device=device)
    start = time.perf_counter()
    result = evaluate(data.train.images, data.train.labels, data.test, cfg, seeds=tuple(range(seeds)))
    return {"method": "whole pool", "ipc": None, "acc_mean": result.mean, "acc_std": result.std,
            "accuracies": list(result.accuracies), "eval_epochs": cfg.epochs,
            "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def speed_comparison(reference_dir: str, ipcs: list[int], iterations: int, rounds: int, device: str) -> list[dict]:
    """Median seconds per DM iteration, ours vs the reference, alternating blocks in one process."""
    from simulations.reference_dm import ReferenceDM

    data = load_dataset()
    rows = []
    for ipc in ipcs:
        ours: list[float] = []
        ref_times: list[float] = []
        ref = ReferenceDM(reference_dir, data.train, ipc, device=device)
        for r in range(rounds):
            stamps: list[float] = []
            t0 = time.perf_counter()
            cfg = make_config("dm", ipc=ipc, iterations=iterations, seed=r, device=device)
            distill(data.train, cfg, callback=lambda it, loss: stamps.append(time.perf_counter()))
            ours += [b - a for a, b in zip([t0] + stamps[:-1], stamps)][1:]  # drop warm-up step
            for i in range(iterations):
                t = time.perf_counter()
                ref.step()
                if i:
                    ref_times.append(time.perf_counter() - t)
        o, f = statistics.median(ours), statistics.median(ref_times)
        rows.append({"ipc": ipc, "ours_s_per_iter": o, "reference_s_per_iter": f, "ratio": o / f,
                     "samples": len(ours)})
        print(f"DM ipc={ipc}: ours {o:.3f} s/it, reference {f:.3f} s/it, ratio {o / f:.2f}", flush=True)
    return rows


def spawn_job(method: str, ipc: int, args: argparse.Namespace, out: Path) -> dict | None:
    """Run one (method, ipc) in its own process; append its row to ``results.jsonl`` as it lands."""
    cmd = [sys.executable, __file__, "--job", method, str(ipc), "--preset", args.preset,
           "--eval-seeds", str(args.eval_seeds), "--device", args.device, "--out", str(out)]
    if args.time_limit is not None:
        cmd += ["--time-limit", str(args.time_limit)]
    if args.eval_epochs is not None:
        cmd += ["--eval-epochs", str(args.eval_epochs)]
    for assignment in args.set:
        cmd += ["--set", assignment]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"job {method} ipc={ipc} failed:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{method:>6} ipc={ipc:<3} acc {100 * row['acc_mean']:.2f} +- {100 * row['acc_std']:.2f} "
          f"| {row['sec_per_iter']:.3f} s/it x {row['iterations']} | {row['peak_rss_mb']:.0f} MB", flush=True)
    return row


def parse_overrides(assignments: list[str], method: str) -> dict:
    """``--set dm.lr_img=0.5`` style overrides that apply to ``method``; values parse as JSON if they can."""
    settings = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        target, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set expects METHOD.KEY=VALUE, got {item!r}")
        if target == method:
            try:
                settings[name] = json.loads(value)
            except json.JSONDecodeError:
                settings[name] = value
    return settings


def table(results: list[dict]) -> str:
    lines = ["| method | IPC | iterations | accuracy % (mean +- std) | s / iteration | peak RSS MB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        acc = f"{100 * r['acc_mean']:.2f} +- {100 * r['acc_std']:.2f}"
        label = r["method"] + "".join(f" {k}={v}" for k, v in sorted(r.get("overrides", {}).items()))
        lines.append(f"| {label} | {r.get('ipc') or '-'} | {r.get('iterations', '-')} | {acc} | "
                     f"{r.get('sec_per_iter', 0):.2f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--quick", action="store_true", help="smoke run: --preset quick, IPC 1 and 10, 1 seed")
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--eval-seeds", type=int, default=3)
    p.add_argument("--no-pool", action="store_true", help="skip the whole-pool accuracy")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench_results/distill", help="output directory")
    p.add_argument("--reference-dir", default=None, help="DatasetCondensation checkout for the speed comparison")
    p.add_argument("--speed-only", action="store_true", help="only the DM speed comparison")
    p.add_argument("--time-limit", type=float, default=None,
                   help="wall-clock seconds per distillation; the report gives the iterations run")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override one method setting, e.g. --set frepo.lr_img=0.03 (repeatable)")
    p.add_argument("--eval-epochs", type=int, default=None,
                   help="override the preset's evaluation epochs (e.g. 1 for a memory-only probe)")
    p.add_argument("--parallel", type=int, default=1,
                   help="jobs at once (a GPU box; keep 1 on a small CPU so timings stay honest)")
    p.add_argument("--speed-iterations", type=int, default=6)
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--job", nargs=2, metavar=("METHOD", "IPC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.ipc, args.eval_seeds = "quick", [1, 10], 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.job:  # child process: one (method, ipc), result as JSON on the last stdout line
        print(json.dumps(run_job(args.job[0], int(args.job[1]), args.preset, args.eval_seeds, args.device, out,
                                 args.time_limit, parse_overrides(args.set, args.job[0]), args.eval_epochs)))
        return 0

    report: dict = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                               f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                    "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "device": args.device,
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    if args.reference_dir:
        report["speed"] = speed_comparison(args.reference_dir, [i for i in args.ipc if i <= 10] or [1],
                                           args.speed_iterations, args.speed_rounds, args.device)
    if not args.speed_only:
        jobs = [(method, ipc) for ipc in args.ipc for method in args.methods]
        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            pool_row = None if args.no_pool else pool.submit(run_pool, args.preset, args.eval_seeds, args.device)
            rows = list(pool.map(lambda job: spawn_job(*job, args, out), jobs))
            results = [r for r in rows if r is not None]
            if pool_row is not None:
                results.append(pool_row.result())
        report["results"] = results
        print(table(results))
    (out / f"{args.preset}.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / f'{args.preset}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
