"""``python -m distill``: distill a dataset centrally, evaluate a saved set, draw a set as PNG.

    python -m distill methods
    python -m distill distill --method dm --ipc 10 --iterations 200 --out dm10.npz
    python -m distill evaluate dm10.npz --arch convnet --epochs 300 --seeds 3
    python -m distill show dm10.npz --out dm10.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .data import BUNDLED, load_dataset
from .methods import available_methods, coerce_settings, config_fields, distill, make_config
from .synthetic import SyntheticSet
from .train import TrainConfig, evaluate
from .visualize import save_grid


def _parse_sets(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_methods(args: argparse.Namespace) -> int:
    hidden = {"embedder_state", "progress"}
    for name in available_methods():
        config = make_config(name)
        shown = [f"{k}={getattr(config, k)!r}" for k in config_fields(name) if k not in hidden]
        print(f"{name}: " + ", ".join(shown))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    data = load_dataset(args.dataset, root=args.data_root)
    settings = coerce_settings(args.method, _parse_sets(args.set))
    config = make_config(args.method, ipc=args.ipc, iterations=args.iterations, seed=args.seed,
                         device=args.device, init=args.init, progress=True, **settings)
    start = time.perf_counter()
    syn = distill(data.train, config)
    seconds = time.perf_counter() - start
    syn.save(args.out)
    print(f"{args.method} ipc={args.ipc}: {len(syn)} images in {seconds:.1f} s "
          f"({seconds / max(args.iterations, 1):.2f} s/iteration) -> {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    syn = SyntheticSet.load(args.path)
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
    d.add_argument("--dataset", default=BUNDLED, help="mnist10k (bundled), mnist, fashionmnist, cifar10, svhn, or an .npz path")
    d.add_argument("--data-root", default=None, help="download/cache directory for torchvision datasets")
    d.add_argument("--method", default="dm", choices=available_methods())
    d.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    d.add_argument("--iterations", type=int, default=200, help="outer iterations")
    d.add_argument("--init", default="real", choices=["real", "noise"], help="start from real samples or noise")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method setting, e.g. --set lr_img=0.5 (see `methods`)")
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
    e.add_argument("--json", action="store_true", help="also print the result as JSON")
    e.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("show", help="draw a saved set as a PNG grid (one row per class)")
    s.add_argument("path")
    s.add_argument("--out", default=None, help="PNG path (default: next to the set)")
    s.set_defaults(fn=cmd_show)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
