"""Every registered method (DP ones too, when Opacus is installed) for a few iterations on CUDA.

Checks what the CPU test suite cannot: each method runs on the GPU, returns a CPU set of the
right shape with finite values, and whether the same config gives a bit-identical set twice on
this GPU (cuDNN may pick non-deterministic kernels; the answer is reported, not assumed). One
JSON line per method, then a summary line.

    python simulations/cuda_smoke.py --device cuda --out bench_results/cuda_smoke.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill import load_dataset  # noqa: E402
from distill.methods import MethodConfig, available_methods, distill  # noqa: E402
from distill.task import method_config  # noqa: E402
from simulations.experiments import method_task  # noqa: E402

# Run-config keys per method (any other method: 2 iterations), at IPC 2 on the networks' default
# ConvNet (width 128, depth 3): the GPU sees the papers' network, not the federation's small one.
BASE = {"net-width": 128, "net-depth": 3}
SETTINGS = {
    "dm": {"iterations": 5}, "dc": {"iterations": 2, "outer-loop": 2, "inner-loop": 2},
    "dsa": {"iterations": 2, "outer-loop": 2, "inner-loop": 2}, "kip": {"iterations": 5},
    "rfad": {"iterations": 5}, "frepo": {"iterations": 5}, "bptt": {"iterations": 3, "inner-steps": 5},
    "dp-dm": {"iterations": 5, "epsilon": 8.0}, "dpsgd-gm": {"iterations": 2, "epsilon": 8.0},
}


def smoke_config(method: str, device: str) -> MethodConfig:
    """``method``'s config in this smoke test (a DP method's task sets ``dp``)."""
    task, node = method_task(method, BASE, SETTINGS.get(method, {"iterations": 2}), ipc=2)
    return method_config(task, seed=0, device=device, **node)


def check(method: str, data, device: str) -> dict:
    cfg = smoke_config(method, device)
    t0 = time.perf_counter()
    a = distill(data.train, cfg)
    seconds = time.perf_counter() - t0
    b = distill(data.train, cfg)
    return {"method": method, "ok": True, "device": device, "seconds": round(seconds, 3),
            "images": list(a.images.shape), "on_cpu": a.images.device.type == "cpu",
            "finite": bool(torch.isfinite(a.images).all()), "repeatable": bool(torch.equal(a.images, b.images)),
            "privacy": a.meta.privacy}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    data = load_dataset()
    rows = []
    for method in available_methods():
        try:
            row = check(method, data, args.device)
        except Exception as exc:  # report every method, even after one fails
            row = {"method": method, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                   "trace": traceback.format_exc()[-1500:]}
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    ok = all(r["ok"] and r["finite"] and r["on_cpu"] for r in rows)
    print(json.dumps({"summary": "ok" if ok else "FAILED", "methods": len(rows),
                      "torch": torch.__version__, "device_name": torch.cuda.get_device_name()
                      if args.device.startswith("cuda") else args.device}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
