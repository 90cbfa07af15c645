"""Retrain the global model from a run store's accepted sets with other server settings.

The clients' work (the uploaded sets) stays fixed, so this isolates what the server's
training recipe is worth:

    python simulations/retrain_pool.py runs/<run> --set server-epochs=300 --set server-batch-size=64

The pool is the one a resume of the run would start from (:func:`server.resume.accepted_pool`):
the sets the complete rounds list as accepted, latest per node, each validated again against the
run's own settings (``config.json``, migrated to the current store format); a set that fails is
quarantined with its reason, as on resume, and never trained on. ``--set`` changes only how the
pool is trained, never what a set is checked against.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from client.task import cached_dataset  # noqa: E402
from distill.store_format import read_config  # noqa: E402
from distill.task import parse_assignments  # noqa: E402
from distill.train import accuracy_and_loss  # noqa: E402
from server.resume import accepted_pool, resume_settings  # noqa: E402
from server.rounds import train_global  # noqa: E402
from server.settings import RunSettings  # noqa: E402


def retrain(run: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train a fresh global model on ``run``'s validated pool under its settings overlaid by
    ``overrides`` (kebab-case); its test accuracy, the pool's size and the sets quarantined."""
    stored = resume_settings(run)  # the run's own settings: what its sets are validated against
    test = cached_dataset(stored.task.dataset).test
    pool, quarantined = accepted_pool(stored, test.info)
    if not len(pool):
        raise ValueError(f"{run}: no valid accepted set to train on (quarantined: {quarantined})")
    settings = RunSettings.from_run_config({**read_config(run), **overrides})
    start = time.perf_counter()
    net = train_global(pool, settings, settings.task.seed)
    acc, _ = accuracy_and_loss(net, cached_dataset(settings.task.dataset).test)
    return {"run": str(run), "pool-sets": len(pool), "pool-images": pool.num_images(), "quarantined": quarantined,
            "accuracy": acc, "train-seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run store directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="server settings to change")
    args = p.parse_args(argv)
    try:
        overrides = parse_assignments(args.set)
    except ValueError as err:
        p.error(str(err))
    print(json.dumps({**retrain(args.run, overrides), "settings": args.set}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
