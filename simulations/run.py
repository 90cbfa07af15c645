"""Run a federation of virtual clients on Flower's simulation engine (Ray) and write its run store.

    python simulations/run.py                                  # the demo: 10 clients, DM IPC 10, one-shot
    python simulations/run.py --alpha 0.1 --mode iterative --rounds 3
    python simulations/run.py --algorithm fedavg --rounds 20
    python simulations/run.py --clients 100 --set fraction-evaluate=0
    python simulations/run.py --param idc --param-kwargs '{"factor": 2}' --ipc 1
    python simulations/run.py --dp dp-dm --epsilon 8 --mode iterative --rounds 3 --privacy-budget 20
    python simulations/run.py --resume runs/20261128-004306-fedistill-iterative   # after a crash

Any run-config key (README "Run-config reference") can be set with ``--set key=value``.
``flwr.simulation.run_simulation`` hands the apps an empty run-config, so the settings are
fixed in code through :func:`server.app.make_server_app`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Flower's SuperLink must not `uv sync` dependencies; its state goes to a project-local home.
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_HOME", str(ROOT / ".flwr"))

from client.task import NODE_DATASETS_ENV  # noqa: E402
from distill.task import ALGORITHMS, DP_MODES, DistillTask, parse_assignments  # noqa: E402
from distill.methods import available_methods  # noqa: E402
from distill.params import available_parameterisations  # noqa: E402
from distill.partition import PARTITIONERS  # noqa: E402
from server.settings import MODES, RunSettings  # noqa: E402


PRIVACY_FLAGS = ("dp", "epsilon", "delta", "clip", "sigma", "rho", "privacy-budget")  # same name as the key
PARAM_FLAGS = ("param", "param-kwargs")  # same name as the key


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line. A flag left out is not sent: the run-config's default holds
    (server/settings.py, distill/task.py), so every default lives in one place."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10, help="number of virtual clients (SuperNodes)")
    p.add_argument("--algorithm", choices=ALGORITHMS, help=f"default: {DistillTask.algorithm}")
    p.add_argument("--mode", choices=MODES,
                   help="fedistill: one round (one-shot), or FedDM-style rounds with the global model as embedder "
                        f"(iterative); default: {RunSettings.mode}")
    p.add_argument("--rounds", type=int, help="rounds for iterative fedistill and FedAvg (num-server-rounds)")
    p.add_argument("--dataset", help=f"mnist10k (bundled), a torchvision name, an .npz path or an image folder "
                                     f"(a directory or .tar.gz); "
                                     f"default: {DistillTask.dataset}")
    p.add_argument("--partitioner", choices=PARTITIONERS,
                   help=f"how the data is split; default: {DistillTask.partitioner}")
    p.add_argument("--alpha", type=float, help="Dirichlet concentration (smaller = more skew)")
    p.add_argument("--method", choices=[m for m in available_methods() if m not in DP_MODES],
                   help=f"distillation method (DP methods: --dp); default: {DistillTask.method}")
    p.add_argument("--ipc", type=int, help="synthetic images per class per client")
    p.add_argument("--iterations", type=int, help="distillation iterations per client")
    p.add_argument("--param", choices=available_parameterisations(),
                   help="what clients store and upload: pixels, or a factorised set (--ipc then counts stored "
                        "bases per class; docs/distill.md 'Parameterisations')")
    p.add_argument("--param-kwargs", metavar="JSON",
                   help='the parameterisation\'s options as a JSON object, e.g. \'{"factor": 2}\'')
    p.add_argument("--seed", type=int, dest="seed_flag", metavar="SEED", help="run seed (client seeds derive from it)")
    p.add_argument("--cpus-per-client", type=int, dest="client_threads", metavar="N",
                   help="Ray CPUs per virtual client; also torch threads per client (client-threads)")
    p.add_argument("--runs-dir", help="where the run store directory goes (default: runs/ in this repository)")
    p.add_argument("--name", help="run name (default: algorithm-mode)")
    dp = p.add_argument_group("privacy (docs/privacy.md); unset flags keep the run-config defaults")
    dp.add_argument("--dp", choices=DP_MODES, help="example-level DP method (replaces --method)")
    dp.add_argument("--epsilon", type=float, help="target epsilon per round and client (with sigma 0)")
    dp.add_argument("--delta", type=float, help="delta every epsilon is reported at")
    dp.add_argument("--clip", type=float, help="per-example clipping bound")
    dp.add_argument("--sigma", type=float, help="noise multiplier; 0 = calibrate from --epsilon")
    dp.add_argument("--rho", type=float, help="KIP-rho: fraction of frozen noise pixels (no guarantee)")
    dp.add_argument("--privacy-budget", type=float,
                    help="total epsilon a client spends over the run; past it, it declines (0 = no limit)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other run-config key, e.g. --set server-epochs=50 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", default="",
                   help="continue an interrupted fedistill run from its run store (its config.json decides "
                        "every setting; pass the same --clients); docs/reliability.md")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    args = p.parse_args(argv)
    # What the run will use, for the callers that read them (Ray's CPUs per client are its torch
    # threads; run_backdoor.py's trigger seed is the run seed): the flag, else the run-config's.
    args.seed = _effective(args.seed_flag, args.set, "seed")
    args.cpus_per_client = _effective(args.client_threads, args.set, "client-threads")
    return args


def _effective(flag: Any, assignments: list[str], key: str) -> Any:
    """``flag``, else ``key`` as ``--set`` gives it, else the task's default (a bad ``--set`` is
    reported by :func:`overrides_from_args`)."""
    default = getattr(DistillTask, key.replace("-", "_"))
    if flag is not None:
        return flag
    try:
        return parse_assignments(assignments).get(key, default)
    except ValueError:
        return default


# flag -> run-config key, where they differ; every other flag is its key with "_" -> "-"
FLAG_KEYS = {"rounds": "num-server-rounds", "name": "run-name", "seed_flag": "seed"}
FLAGS = ("algorithm", "mode", "rounds", "dataset", "partitioner", "alpha", "method", "ipc", "iterations",
              "seed_flag", "client_threads", "runs_dir", "name")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config the CLI arguments amount to (kebab-case keys): only the flags given, then ``--set``."""
    out: dict[str, Any] = {
        # the run-config's runs-dir, under this repository rather than the working directory
        "runs-dir": str(ROOT / RunSettings.runs_dir),
        # wait until every virtual client has registered before sampling
        "min-available-nodes": args.clients, "min-train-nodes": min(2, args.clients),
    }
    for dest in FLAGS + tuple(k.replace("-", "_") for k in PRIVACY_FLAGS + PARAM_FLAGS):
        if getattr(args, dest, None) is not None:
            out[FLAG_KEYS.get(dest, dest.replace("_", "-"))] = getattr(args, dest)
    if args.resume:
        out["resume"] = args.resume
    try:
        out.update(parse_assignments(args.set))
    except ValueError as err:
        raise SystemExit(str(err)) from err
    data = out.get("dataset")
    if isinstance(data, str) and "/" in data and not Path(data).is_absolute() and Path(data).exists():
        out["dataset"] = str(Path(data).resolve())  # the virtual nodes need not share this working directory
    return out


def progress_line(record: dict[str, Any]) -> str:
    acc = record.get("accuracy")
    parts = [f"round {record['round']:>3}", f"acc {100 * acc:6.2f}%" if acc is not None else "acc    n/a",
             f"{record.get('mb-uploaded-per-client', 0):8.3f} MB/client",
             f"{record.get('elapsed-seconds', 0):7.1f} s"]
    if "accepted" in record:
        parts.insert(2, f"accepted {record['accepted']}/{record['sent']} rejected {record['rejected']}")
    if record.get("federated-accuracy") is not None:
        parts.append(f"fed-eval {100 * record['federated-accuracy']:.2f}%")
    return " | ".join(parts)


def final_table(summary: dict[str, Any], settings: RunSettings, clients: int) -> str:
    task = settings.task
    split = task.partitioner + (f"(alpha={task.alpha})" if task.partitioner == "dirichlet" else "")
    rows = [("algorithm", f"{summary['algorithm']} ({summary['mode']})" if summary["algorithm"] == "fedistill"
             else "fedavg"),
            ("clients / split", f"{clients} / {split} on {task.dataset}"),
            ("method", f"{task.distill_method}, ipc {task.ipc}, {task.iterations} iterations, "
             f"init {task.init if task.dp == 'none' else 'noise'}"
             if task.algorithm == "fedistill" else f"{task.local_epochs} local epoch(s), lr {task.local_lr}"),
            *_privacy_rows(summary, task),
            ("rounds", str(summary["rounds"])),
            ("global accuracy", "n/a" if summary["accuracy"] is None else f"{100 * summary['accuracy']:.2f} %"),
            ("federated eval", "n/a" if summary.get("federated-accuracy") is None
             else f"{100 * summary['federated-accuracy']:.2f} %"),
            ("uploaded / client", f"{summary['mb-uploaded-per-client']:.3f} MB (max {summary['mb-uploaded-max-client']:.3f})"),
            ("accepted / rejected", f"{summary['accepted']} / {summary['rejected']}"),
            ("wall time", f"{summary['wall-seconds']:.1f} s (server loop)"),
            ("run store", summary["run"])]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}} | {v}" for k, v in rows), line])


def _privacy_rows(summary: dict[str, Any], task: Any) -> list[tuple[str, str]]:
    """The final table's privacy line: what was asked per round, and the most a client spent."""
    if task.dp == "none":
        return [("privacy", f"none (KIP-rho {task.rho}, no guarantee)")] if task.rho > 0 else []
    ask = f"sigma {task.sigma}" if task.sigma > 0 else f"epsilon {task.epsilon}"
    budget = f", budget {task.privacy_budget:g}" if task.privacy_budget > 0 else ""
    spent = "n/a" if summary.get("epsilon-max") is None else f"{summary['epsilon-max']:.3f}"
    declined = sum(c.get("rounds-declined", 0) for c in summary.get("privacy", {}).values())
    return [("privacy", f"{task.dp}, {ask} per round, delta {task.delta:g}{budget}; max client epsilon "
                        f"{spent} ({task.accountant}), {declined} declined round(s)")]


@contextlib.contextmanager
def node_datasets_named(dataset: str) -> Iterator[None]:
    """Name ``dataset`` as the virtual nodes' own while a simulation runs, then restore the variable.

    A node loads only a dataset it names (client.task.dataset_refusal); Flower gives virtual nodes
    no node-config of their own, so this process's environment (which Ray's workers inherit)
    names the run's dataset for them.
    """
    previous = os.environ.get(NODE_DATASETS_ENV)
    os.environ[NODE_DATASETS_ENV] = dataset
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(NODE_DATASETS_ENV, None)
        else:
            os.environ[NODE_DATASETS_ENV] = previous


def simulate(overrides: dict[str, Any], clients: int, cpus_per_client: int = 1, verbose: bool = False,
             quiet: bool = False) -> dict[str, Any]:
    """Run one federation on Ray; returns the server's summary."""
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import make_server_app

    settings = RunSettings.from_run_config({}, **overrides)  # fail on a bad setting before Ray starts
    if overrides.get("resume"):
        from server.resume import resume_settings

        settings = resume_settings(str(overrides["resume"]))
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    results: list[dict[str, Any]] = []
    on_round = None if quiet else (lambda r: print(progress_line(r), flush=True))
    on_reply = None if quiet else (lambda k, n: print(f"\r  replies {k}/{n}", end="\n" if k == n else "",
                                                      flush=True))
    server_app = make_server_app(on_round=on_round, on_done=results.append, on_reply=on_reply, **overrides)
    with node_datasets_named(settings.task.dataset):
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                       backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                                       "init_args": {"logging_level": logging.INFO if verbose else logging.ERROR,
                                                     "log_to_driver": verbose}},
                       verbose_logging=verbose)
    if not results:
        raise RuntimeError("the simulation ended without a summary: see the log above (rerun with --verbose)")
    return results[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = overrides_from_args(args)
    settings = RunSettings.from_run_config({}, **overrides)
    if args.resume:
        from server.resume import resume_settings

        settings = resume_settings(args.resume)  # the run's own config.json, as the server will use
        print(f"fedistill: resuming {args.resume}", flush=True)
    print(f"fedistill: {args.clients} virtual clients, {settings.name}, "
          f"{settings.task.partitioner} split of {settings.task.dataset}", flush=True)
    start = time.perf_counter()
    summary = simulate(overrides, args.clients, args.cpus_per_client, args.verbose)
    print(final_table(summary, settings, args.clients))
    print(f"total wall time {time.perf_counter() - start:.1f} s (including Ray start-up)")
    return 0 if summary["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
