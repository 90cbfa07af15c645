"""Benchmark the distillation core on the bundled MNIST sample.

For each method (random real subset, DM, DC, DSA, KIP, RFAD, FRePo, BPTT, MTT, CAFE) and IPC: test
accuracy mean +- std over several evaluation seeds, seconds per outer iteration, peak
memory; plus the whole-pool accuracy with the same evaluator. Each (method, IPC) runs in its
own subprocess so its peak RSS is its own. ``--reference-dir`` adds the DM speed comparison
against the reference code.

    python simulations/bench_distill.py --quick                       # smoke run of every method, ~8 min on 2 cores
    python simulations/bench_distill.py --preset cpu --ipc 1 10       # ~20 min per method/IPC
    python simulations/bench_distill.py --preset cpu --methods frepo --set frepo.lr-img=0.03
    python simulations/bench_distill.py --config my_budgets.toml     # an experiment file of your own
    python simulations/bench_distill.py --speed-only --reference-dir ../DatasetCondensation
    python simulations/bench_distill.py --compile ...                 # torch.compile the real branch and evaluator

The budgets are experiment files, conf/distill/<preset>.toml (conf/README.md). ``--set KEY=VALUE``
takes run-config keys over the file: a plain key (``iterations=5``, ``net-width=64``) for every
method, a dotted one (``frepo.lr-img=0.03``, ``mtt.iterations=400``) for one method.
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
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill import load_dataset, random_real_subset  # noqa: E402
from distill.accel import compile_enabled, use_compile  # noqa: E402
from distill.data import BUNDLED, Dataset  # noqa: E402
from distill.methods import MethodConfig, distill  # noqa: E402
from distill.networks import network_for  # noqa: E402
from distill.synthetic import SetMetadata, SyntheticSet  # noqa: E402
from distill.task import method_config, parse_assignments, split_keys  # noqa: E402
from distill.train import evaluate  # noqa: E402
from distill.visualize import save_grid  # noqa: E402
from distill.zca import ZCA, whiten_dataset  # noqa: E402
from simulations.experiments import (DistillExperiment, add_experiment_args, chosen_experiment,  # noqa: E402
                                     TASK_KEYS, load_experiment, method_task)

METHODS = ("random", "dm", "dc", "dsa", "kip", "rfad", "frepo", "bptt", "mtt", "cafe")
REFERENCE_NET = {"net-width": 128, "net-depth": 3}  # the reference code's ConvNet (speed comparison)


def method_overrides(assignments: list[str], method: str) -> dict[str, Any]:
    """What ``--set`` changes for ``method``: plain task keys (every method), then ``method``'s
    dotted ones, kebab-case (``frepo.lr_img`` is ``frepo.lr-img``). An unknown method prefix or
    plain key raises ``ValueError``; an unknown method setting, once the job's task is built."""
    kebab = [key.replace("_", "-") + sep + value for key, sep, value in (str(a).partition("=") for a in assignments)]
    plain, nested = split_keys(parse_assignments(kebab))
    if stray := sorted(set(plain) - set(TASK_KEYS)):
        raise ValueError(f"--set {stray}: a plain key is one of {list(TASK_KEYS)}; "
                         "a method's own setting is dotted, e.g. dm.lr-img=0.5")
    return {**plain, **nested.get(method, {})}


def job_config(exp: DistillExperiment, method: str, ipc: int, overrides: dict[str, Any] | None = None,
               **node: Any) -> MethodConfig:
    """The method config of one (method, ipc) job: the file's table at ``ipc``, then ``overrides``."""
    task, file_node = method_task(method, exp.net, exp.method_table(method, ipc), overrides or {}, ipc=ipc)
    return method_config(task, seed=0, **{**file_node, **node})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_job(method: str, ipc: int, preset_name: str, seeds: int, device: str, out_dir: Path,
            time_limit: float | None = None, overrides: dict | None = None,
            eval_epochs: int | None = None, exp: DistillExperiment | None = None, dataset: str = BUNDLED) -> dict:
    """Distill (or subsample) and evaluate one (method, ipc); runs inside its own process."""
    exp = exp or load_experiment(preset_name, "distill")
    data, zca = experiment_data(exp, dataset)
    base_rss = peak_rss_mb()  # torch + data loaded, before any distillation
    iterations = 0
    stamps: list[float] = []
    start = time.perf_counter()
    if method == "random":
        subset = random_real_subset(data.train, ipc, seed=0)
        syn = SyntheticSet(subset.images, subset.labels, SetMetadata(data.info, "random", ipc))
    else:
        config = job_config(exp, method, ipc, overrides, device=device, time_limit_s=time_limit)
        iterations = config.iterations
        syn = distill(data.train, config, callback=lambda it, loss: stamps.append(time.perf_counter()))
    distill_s = time.perf_counter() - start
    distill_rss = peak_rss_mb()  # ru_maxrss only grows: this is the distillation's peak
    steps = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    eval_cfg = exp.train_config(ipc, device, eval_epochs)
    result = evaluate(syn.images, syn.labels, data.test, eval_cfg, seeds=tuple(range(seeds)))
    name = f"{method}_ipc{ipc}"
    syn.save(out_dir / f"{name}.npz")  # in the space it was distilled in (``+zca`` in its dataset name)
    shown = syn if zca is None else SyntheticSet(zca.invert(syn.images), syn.labels, syn.meta)
    save_grid(shown, out_dir / f"{name}.png")
    return {
        "method": method, "ipc": ipc, "preset": preset_name, "iterations": syn.meta.iterations,
        "iterations_configured": iterations, "overrides": overrides or {},
        "sec_per_iter": statistics.median(steps) if steps else 0.0, "distill_seconds": distill_s,
        "acc_mean": result.mean, "acc_std": result.std, "accuracies": list(result.accuracies),
        "eval_epochs": eval_cfg.epochs, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base_rss,
        "distill_peak_rss_mb": distill_rss,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "compiled": compile_enabled(),  # False after a compiler failure fell back to eager
    }


def experiment_data(exp: DistillExperiment, dataset: str) -> tuple[Dataset, ZCA | None]:
    """The benchmark's data, ZCA-whitened (statistics of the public training split) where the
    experiment says so, with the fitted transform (None without)."""
    data = load_dataset(dataset)
    if not exp.zca:
        return data, None
    return whiten_dataset(data, exp.zca_eps)


def run_pool(exp: DistillExperiment, seeds: int, device: str, dataset: str = BUNDLED) -> dict:
    data, _ = experiment_data(exp, dataset)
    cfg = exp.train_config(None, device)
    start = time.perf_counter()
    result = evaluate(data.train.images, data.train.labels, data.test, cfg, seeds=tuple(range(seeds)))
    return {"method": "whole pool", "ipc": None, "acc_mean": result.mean, "acc_std": result.std,
            "accuracies": list(result.accuracies), "eval_epochs": cfg.epochs,
            "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def conv_flops(net: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Multiply-adds x 2 of the convolutions in one ``embed`` pass of one image (DM never runs
    the classifier)."""
    total = [0.0]

    def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total[0] += 2.0 * k * output[0].numel()

    hooks = [m.register_forward_hook(count) for m in net.modules()]
    with torch.no_grad():
        net.embed(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return total[0]


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """This machine's best measured float32 GEMM rate: the practical peak an iteration is compared with."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * size ** 3 / min(times) / 1e9


def speed_comparison(reference_dir: str, ipcs: list[int], iterations: int, rounds: int, device: str) -> list[dict]:
    """Median seconds per DM iteration, ours vs the reference, alternating blocks in one process."""
    from simulations.reference_dm import ReferenceDM

    data = load_dataset()
    info = data.info
    net = network_for(info, "convnet", width=REFERENCE_NET["net-width"], depth=REFERENCE_NET["net-depth"])
    per_image = conv_flops(net, (info.channels, info.height, info.width))
    rows = []
    for ipc in ipcs:
        ours: list[float] = []
        ref_times: list[float] = []
        ref = ReferenceDM(reference_dir, data.train, ipc, device=device)
        gemm: list[float] = []  # the GEMM rate between blocks: its best is the peak on these cores now
        for r in range(rounds):
            gemm.append(matmul_gflops(repeats=3))
            stamps: list[float] = []
            t0 = time.perf_counter()
            task, _ = method_task("dm", REFERENCE_NET, {"iterations": iterations}, ipc=ipc)
            cfg = method_config(task, seed=r, device=device)
            distill(data.train, cfg, callback=lambda it, loss: stamps.append(time.perf_counter()))
            ours += [b - a for a, b in zip([t0] + stamps[:-1], stamps)][1:]  # drop warm-up step
            for i in range(iterations):
                t = time.perf_counter()
                ref.step()
                if i:
                    ref_times.append(time.perf_counter() - t)
        o, f = statistics.median(ours), statistics.median(ref_times)
        # an iteration's work: the real batch forward; the synthetic batch forward and its backward
        # to the input only (DM freezes the weights): about 2 forward passes
        flop = per_image * info.num_classes * (256 + 2 * ipc)
        peak = max(gemm + [matmul_gflops(repeats=3)])
        rows.append({"ipc": ipc, "ours_s_per_iter": o, "reference_s_per_iter": f, "ratio": o / f,
                     "samples": len(ours), "flop_model": "real forward + 2 x synthetic forward",
                     "gflop_per_iter": flop / 1e9, "ours_gflops": flop / o / 1e9, "matmul_gflops": peak,
                     "matmul_gflops_samples": gemm, "fraction_of_matmul_peak": flop / o / 1e9 / peak})
        print(f"DM ipc={ipc}: ours {o:.3f} s/it, reference {f:.3f} s/it, ratio {o / f:.2f}; "
              f"{flop / 1e9:.0f} GFLOP/it, {flop / o / 1e9:.0f} GFLOP/s = {flop / o / 1e9 / peak:.0%} of "
              f"this machine's GEMM rate ({peak:.0f} GFLOP/s)", flush=True)
    return rows


def spawn_job(method: str, ipc: int, args: argparse.Namespace, out: Path) -> dict | None:
    """Run one (method, ipc) in its own process; append its row to ``results.jsonl`` as it lands."""
    chosen = ["--config", args.config] if args.config else ["--preset", args.preset]
    cmd = [sys.executable, __file__, "--job", method, str(ipc), *chosen,
           "--eval-seeds", str(args.eval_seeds), "--device", args.device, "--out", str(out),
           "--dataset", args.dataset]
    if args.time_limit is not None:
        cmd += ["--time-limit", str(args.time_limit)]
    if args.eval_epochs is not None:
        cmd += ["--eval-epochs", str(args.eval_epochs)]
    if compile_enabled():
        cmd.append("--compile")
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
    add_experiment_args(p, "distill", default="cpu")
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
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a run-config key over the experiment file: iterations=5 (every method), "
                        "frepo.lr-img=0.03 or mtt.iterations=400 (one method); repeatable")
    p.add_argument("--eval-epochs", type=int, default=None,
                   help="override the preset's evaluation epochs (e.g. 1 for a memory-only probe)")
    p.add_argument("--parallel", type=int, default=1,
                   help="jobs at once (a GPU box; keep 1 on a small CPU so timings stay honest)")
    p.add_argument("--speed-iterations", type=int, default=6)
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--dataset", default=None,
                   help="the data, as load_dataset takes it: a name, an .npz (../shared/data/mnist70k.npz) or an image "
                        "folder (../shared/data/cifar10-jpeg.tar.gz); default: the experiment file's, else the "
                        "bundled sample")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the no-grad embeddings and the evaluator's step (distill/accel.py): "
                        "about 0.7x the time on CPU after 15-35 s of compilation per process")
    p.add_argument("--job", nargs=2, metavar=("METHOD", "IPC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.ipc, args.eval_seeds = [1, 10], 1
    try:  # the file, and every job's config built before any work: a bad file or --set fails here
        args.preset, exp = chosen_experiment(args, "distill", default="cpu")
        for method in [args.job[0]] if args.job else args.methods:
            for ipc in [int(args.job[1])] if args.job else args.ipc:
                if method != "random":
                    job_config(exp, method, ipc, method_overrides(args.set, method))
    except ValueError as err:
        p.error(str(err))
    args.dataset = args.dataset or exp.data_source or BUNDLED
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.compile:  # FEDISTILL_COMPILE=1 turns it on as well; nothing here turns it off
        use_compile(True)

    if args.job:  # child process: one (method, ipc), result as JSON on the last stdout line
        method = args.job[0]
        print(json.dumps(run_job(method, int(args.job[1]), args.preset, args.eval_seeds, args.device, out,
                                 args.time_limit, method_overrides(args.set, method), args.eval_epochs, exp,
                                 args.dataset)))
        return 0

    report: dict = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                               f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                    "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "device": args.device,
                    "dataset": BUNDLED if args.speed_only else args.dataset, "zca": exp.zca,
                    "compile": compile_enabled(),
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    if args.reference_dir:
        report["speed"] = speed_comparison(args.reference_dir, [i for i in args.ipc if i <= 10] or [1],
                                           args.speed_iterations, args.speed_rounds, args.device)
    if not args.speed_only:
        jobs = [(method, ipc) for ipc in args.ipc for method in args.methods]
        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            pool_row = None if args.no_pool else pool.submit(run_pool, exp, args.eval_seeds, args.device, args.dataset)
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
