"""``python -m distill``: distill a dataset centrally, evaluate a saved set, draw a set as PNG.

    python -m distill methods
    python -m distill distill --method dm --ipc 10 --iterations 200 --out dm10.npz
    python -m distill distill --method kip --set kip.kernel=ntk --set net-width=64 --out kip.npz
    python -m distill evaluate dm10.npz --arch convnet --epochs 300 --seeds 3
    python -m distill show dm10.npz --out dm10.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import accel
from .data import BUNDLED, load_dataset
from .methods import MethodConfig, available_methods, distill
from .synthetic import SyntheticSet
from .task import DistillTask, declared_method_keys, method_config, method_defaults, parse_assignments
from .train import TrainConfig, evaluate
from .visualize import save_grid


def cmd_methods(args: argparse.Namespace) -> int:
    for name, table in declared_method_keys().items():
        print(f"{name}: " + ", ".join(f"{name}.{k}={v!r}" for k, v in table.items()))
    return 0


# The task fields a central distillation takes; the rest of a task is about a federation.
TASK_KEYS = ("ipc", "iterations", "init", "seed", "net-width", "net-depth", "rho", "param", "param-kwargs", "dp",
             "epsilon", "delta", "clip", "sigma", "sample-rate", "accountant")


def central_config(args: argparse.Namespace) -> MethodConfig:
    """The method config ``python -m distill distill`` runs: the flags, then ``--set`` (run-config
    keys, the method's own dotted: ``dm.lr-img=0.5``), through the task like any client's.

    What is left unset is the method's own default, not a federation's: a central distillation
    runs the method config's iterations (200) on the library's ConvNet (width 128) unless
    ``--iterations`` / ``--set net-width=...`` say otherwise.
    """
    sets = parse_assignments(args.set)
    if plain := sorted(k for k in sets if "." not in k and k not in TASK_KEYS):
        raise ValueError(f"--set {plain}: a central distillation takes {list(TASK_KEYS)} and <method>.<setting>")
    flags = {"method": args.method, "ipc": args.ipc, "iterations": args.iterations, "init": args.init,
             "seed": args.seed}
    given = {**{k: v for k, v in flags.items() if v is not None}, **sets}
    private = str(given.get("dp", "none")) != "none"
    method = str(given["dp"] if private else given.get("method", DistillTask.method))
    defaults = {k: v for k, v in method_defaults(method).items() if k in ("iterations", "init")}
    task = DistillTask.from_config({**defaults, **given})
    network = {} if {"net-width", "net-depth"} & set(given) else {"arch_kwargs": {}}  # the library's ConvNet
    return method_config(task, seed=task.seed, device=args.device, progress=True, **network)


def cmd_distill(args: argparse.Namespace) -> int:
    data = load_dataset(args.dataset, root=args.data_root)
    config = central_config(args)
    start = time.perf_counter()
    syn = distill(data.train, config)
    seconds = time.perf_counter() - start
    syn.save(args.out)
    print(f"{config.method} ipc={config.ipc}: {len(syn)} images in {seconds:.1f} s "
          f"({seconds / max(config.iterations, 1):.2f} s/iteration) -> {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    syn = SyntheticSet.load(args.path)
    if syn.meta.dataset.name.endswith("+zca"):
        raise ValueError(f"{args.path} lives in a ZCA-whitened space ({syn.meta.dataset.name}); raw test images "
                         "would score it wrongly: evaluate it where it was made (bench_distill.py with a zca preset)")
    data = load_dataset(args.dataset or syn.meta.dataset.name, root=args.data_root)
    if data.info.image_shape != syn.meta.dataset.image_shape:
        raise SystemExit(f"set is {syn.meta.dataset.image_shape}, dataset {data.info.name} is {data.info.image_shape}")
    config = TrainConfig(arch=args.arch, epochs=args.epochs, lr=args.lr, dsa=not args.no_dsa, device=args.device)
    result = evaluate(syn.images, syn.labels, data.test, config, seeds=tuple(range(args.seeds)), progress=True)
    print(f"{args.path}: {result}")
    if args.json:
        print(json.dumps({"accuracies": result.accuracies, "mean": result.mean, "std": result.std,
                          "arch": result.arch, "epochs": result.epochs}))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    syn = SyntheticSet.load(args.path)
    out = args.out or str(args.path).rsplit(".", 1)[0] + ".png"
    print(f"wrote {save_grid(syn, out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("methods", help="list methods and their settings").set_defaults(fn=cmd_methods)

    d = sub.add_parser("distill", help="distill a dataset centrally into a saved set")
    d.add_argument("--dataset", default=BUNDLED,
                   help="mnist10k (bundled), mnist, fashionmnist, cifar10, svhn, an .npz path, or an image folder "
                        "(a directory or .tar.gz of <class>/<image>)")
    d.add_argument("--data-root", default=None, help="download/cache directory for torchvision datasets")
    d.add_argument("--method", choices=[m for m in available_methods() if not m.startswith("dp")],
                   help="default: the task's (dm); for a DP method use --set dp=dp-dm")
    d.add_argument("--ipc", type=int, help="synthetic images per class (default: the task's, 10)")
    d.add_argument("--iterations", type=int, help="outer iterations (default: the task's, 100)")
    d.add_argument("--init", choices=["real", "noise"], help="start from real samples or noise")
    d.add_argument("--seed", type=int)
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.add_argument("--compile", action="store_true", help="torch.compile the hot loops (docs/library.md, 'Speed')")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a run-config key, the method's own dotted, e.g. --set dm.lr-img=0.5 --set net-width=64 "
                        "(the same keys as flwr run -c and simulations/run.py --set; list: `methods`)")
    d.add_argument("--out", required=True, help="output .npz")
    d.set_defaults(fn=cmd_distill)

    e = sub.add_parser("evaluate", help="train fresh networks on a saved set, report test accuracy")
    e.add_argument("path")
    e.add_argument("--dataset", default=None, help="test data (default: the set's own dataset)")
    e.add_argument("--data-root", default=None)
    e.add_argument("--arch", default="convnet", help="convnet, mlp, lenet, alexnet, resnet18")
    e.add_argument("--epochs", type=int, default=300)
    e.add_argument("--lr", type=float, default=0.01)
    e.add_argument("--seeds", type=int, default=3, help="number of evaluation seeds")
    e.add_argument("--no-dsa", action="store_true", help="train without DSA augmentation")
    e.add_argument("--device", default="cpu")
    e.add_argument("--compile", action="store_true", help="torch.compile the training step")
    e.add_argument("--json", action="store_true", help="also print the result as JSON")
    e.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("show", help="draw a saved set as a PNG grid (one row per class)")
    s.add_argument("path")
    s.add_argument("--out", default=None, help="PNG path (default: next to the set)")
    s.set_defaults(fn=cmd_show)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "compile", False):
        accel.use_compile(True)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
