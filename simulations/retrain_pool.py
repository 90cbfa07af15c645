"""Retrain the global model from a run store's accepted sets with other server settings.

The clients' work (the uploaded sets) stays fixed, so this isolates what the server's
training recipe is worth:

    python simulations/retrain_pool.py runs/<run> --set server-epochs=300 --set server-batch-size=64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.train import accuracy_and_loss  # noqa: E402
from client.task import cached_dataset  # noqa: E402
from distill.synthetic import SyntheticSet  # noqa: E402
from server.pool import SyntheticPool  # noqa: E402
from server.rounds import train_global  # noqa: E402
from server.settings import RunSettings  # noqa: E402
from simulations.run import _value  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run store directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="server settings to change")
    args = p.parse_args(argv)
    config = json.loads((args.run / "config.json").read_text())
    config.update({k: _value(v) for k, _, v in (kv.partition("=") for kv in args.set)})
    settings = RunSettings.from_run_config(config)
    pool = SyntheticPool()
    sets = sorted((args.run / "sets").glob("round*-node*.npz"))
    for path in sets:  # later rounds replace earlier ones: latest set per node
        pool.update(int(path.stem.split("node")[1]), SyntheticSet.load(path))
    start = time.perf_counter()
    net = train_global(pool, settings, settings.task.seed)
    acc, _ = accuracy_and_loss(net, cached_dataset(settings.task.dataset).test)
    print(json.dumps({"run": str(args.run), "pool-images": pool.num_images(), "settings": args.set,
                      "accuracy": acc, "train-seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
