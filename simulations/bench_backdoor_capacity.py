"""The backdoor ceiling of a small real-looking set (issue 5): ASR vs how many trigger carriers it holds.

For each IPC, trigger size and share of the target class's slots given to carriers (triggered
non-target images labelled target, ``attacks.capacity.carrier_set``), train the central backdoor
evaluator (ConvNet width 32, depth 3, 50 epochs, no DSA: the probes' settings) and measure ASR
and CTA. No distillation produces more carriers than its target class has slots, so the rows
bound what naive poisoning or DOORPING through DM/DC/KIP/BPTT can reach with this evaluator.

    python simulations/bench_backdoor_capacity.py                      # IPC 10 and 50, triggers 3 and 5
    python simulations/bench_backdoor_capacity.py --ipc 10 --sizes 3 --shares 1.0 --seeds 3

Writes ``capacity.json`` and ``capacity.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attacks.backdoor import Trigger, train_and_score  # noqa: E402
from attacks.capacity import carrier_set  # noqa: E402
from attacks.membership import audit_pool  # noqa: E402
from distill.data import Dataset, LabeledImages, load_dataset  # noqa: E402
from distill.train import TrainConfig  # noqa: E402

EVALUATOR = TrainConfig(arch="convnet", arch_kwargs={"width": 32, "depth": 3}, epochs=50, batch_size=64, dsa=False)


def measure(data: Dataset, client: LabeledImages, ipc: int, size: int, share: float, seed: int, target: int) -> dict:
    """One carrier set, one evaluator seed: ASR and CTA."""
    trigger = Trigger.solid(data.info, size=size)
    carriers = int(round(share * ipc))
    s = carrier_set(client, trigger, ipc, carriers, target, seed=seed)
    return {"ipc": ipc, "size": size, "share": share, "carriers": carriers, "seed": seed,
            "carrier_fraction_of_set": carriers / len(s),
            **train_and_score(s.images, s.labels, data.test, trigger, target, EVALUATOR, seed)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for ipc, size in sorted({(r["ipc"], r["size"]) for r in rows}):
        pts = sorted((r["share"], r["asr_mean"]) for r in rows if r["ipc"] == ipc and r["size"] == size)
        ax.plot(*zip(*pts), marker="o", label=f"IPC {ipc}, {size}x{size} trigger")
    ax.axhline(0.9, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("share of the target class's slots holding carriers")
    ax.set_ylabel("ASR")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    p.add_argument("--sizes", type=int, nargs="+", default=[3, 5], help="trigger sides in pixels")
    p.add_argument("--shares", type=float, nargs="+", default=[0.2, 0.5, 1.0])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--client-size", type=int, default=1000)
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--out", default="bench_results/backdoor_capacity")
    args = p.parse_args(argv)
    if any(not 0.0 <= s <= 1.0 for s in args.shares):
        p.error("--shares must lie in [0, 1]")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = load_dataset()
    client = audit_pool(data.train, args.client_size, 1)  # the central backdoor section's client
    rows = []
    for ipc in args.ipc:
        for size in args.sizes:
            for share in args.shares:
                runs = [measure(data, client, ipc, size, share, seed, args.target) for seed in range(args.seeds)]
                asr, cta = [r["asr"] for r in runs], [r["cta"] for r in runs]
                row = {**{k: runs[0][k] for k in ("ipc", "size", "share", "carriers", "carrier_fraction_of_set")},
                       "asr_mean": statistics.mean(asr), "cta_mean": statistics.mean(cta), "runs": runs}
                rows.append(row)
                print(f"IPC {ipc:>3} trigger {size}x{size} carriers {row['carriers']:>3} "
                      f"({100 * row['carrier_fraction_of_set']:.0f} % of the set): ASR {row['asr_mean']:.3f} "
                      f"CTA {row['cta_mean']:.3f}", flush=True)
    (out / "capacity.json").write_text(json.dumps(
        {"evaluator": dataclasses.asdict(EVALUATOR), "client_size": args.client_size, "target": args.target,
         "torch_threads": torch.get_num_threads(), "seconds": time.perf_counter() - start, "rows": rows}, indent=2, default=str))
    plot(rows, out / "capacity.png")
    print(f"wrote {out}/capacity.json and capacity.png")


if __name__ == "__main__":
    main()
