"""A federation with K malicious clients (naive or DOORPING backdoor), then ASR and CTA of the global model.

    python simulations/run_backdoor.py --malicious 1 --poison-fraction 0.1 --trigger-size 3 --target-class 0
    python simulations/run_backdoor.py --malicious 2 --malicious-seed 7 --set defense=both
    python simulations/run_backdoor.py --malicious 1 --clients 10 --iterations 100 --set defense=outlier
    python simulations/run_backdoor.py --attack doorping --malicious 1 --poison-fraction 0.1

Every other flag is ``simulations/run.py``'s. The malicious ClientApp is
``simulations/malicious_client.py``; the server is the production one (``--set defense=...``
switches its defenses, docs/attacks.md). The trigger never travels: ASR is computed here after
the run from the saved global model and the server's test split, and written to the run
store's ``summary.json`` under ``backdoor``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulations import run as base  # noqa: E402 - sets FLWR_HOME etc. before Flower is imported


def backdoor_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--malicious", type=int, default=1, help="number of malicious clients K")
    p.add_argument("--malicious-seed", type=int, default=None,
                   help="draw the K partitions with this seed (default: partitions 0..K-1)")
    p.add_argument("--trigger-size", type=int, default=3, help="side of the white square trigger (pixels)")
    p.add_argument("--poison-fraction", type=float, default=0.1, help="share of a malicious partition poisoned")
    p.add_argument("--target-class", type=int, default=0)
    p.add_argument("--attack", choices=("naive", "doorping"), default="naive",
                   help="naive: stamp + relabel before distilling; doorping: trigger learned during distillation")
    return p.parse_known_args(argv)


def measure(summary: dict[str, Any], spec: Any, malicious: list[int], attack: str = "naive",
            trigger_dir: str | None = None) -> dict[str, Any]:
    """ASR / CTA of the run's global model; written into its summary.json under ``backdoor``.

    Naive: the spec's trigger. DOORPING: each malicious partition's learned trigger (copied into
    the run store as ``backdoor/trigger-partitionN.npy``); ``asr`` is the best of them, as the
    attacker would pick, ``asr-by-partition`` each.
    """
    from attacks.backdoor import attack_success_rate, clean_test_accuracy
    from attacks.malicious import load_trigger
    from client.task import cached_dataset
    from distill.networks import network_for
    from server.defenses import split_holdout
    from server.store import RunStore
    from simulations.malicious_client import trigger_path

    store = RunStore(summary["run"])
    settings = base.RunSettings.from_run_config(store.read_config())  # migrated to the current store format
    _, test = split_holdout(cached_dataset(settings.task.dataset).test, settings.defense_config())  # as the server
    out: dict[str, Any] = {"attack": attack, "spec": spec.to_dict(), "malicious-partitions": malicious,
                           "asr": None, "cta": None}
    triggers = {pid: spec.trigger(test.info) for pid in malicious} if attack == "naive" else {}
    if not malicious:  # a clean federation: the spec's trigger gives the false-trigger floor
        triggers = {"none": spec.trigger(test.info)}
    for pid in malicious if attack != "naive" and trigger_dir else []:
        if (path := trigger_path(trigger_dir, pid)).exists():
            triggers[pid] = load_trigger(str(path), spec)
            data = path.read_bytes()
            store.write(f"backdoor/{path.name}", lambda f, d=data: f.write(d), mode="wb")
    if (store.root / "global_model.pt").exists():
        net = network_for(test.info, width=settings.task.net_width, depth=settings.task.net_depth)
        net.load_state_dict(store.load_model())
        net.eval()
        by = {str(pid): attack_success_rate(net, test, trig, spec.target) for pid, trig in triggers.items()}
        out["asr"] = max(by.values(), default=None)
        out["asr-by-partition"] = by
        out["cta"] = clean_test_accuracy(net, test)
    summary = dict(summary, backdoor=out)
    store.write_json("summary.json", summary)
    return summary


def simulate_backdoor(overrides: dict[str, Any], clients: int, malicious: list[int], spec: Any,
                      cpus_per_client: int = 1, verbose: bool = False, quiet: bool = False,
                      attack: str = "naive") -> dict[str, Any]:
    """One federation on Ray with ``malicious`` partitions poisoned; the summary with ``backdoor``."""
    import tempfile
    from flwr.simulation import run_simulation

    from server.app import make_server_app
    from simulations.malicious_client import make_malicious_app

    settings = base.RunSettings.from_run_config({}, **overrides)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    results: list[dict[str, Any]] = []
    on_round = None if quiet else (lambda r: print(base.progress_line(r), flush=True))
    server_app = make_server_app(on_round=on_round, on_done=results.append, **overrides)
    trigger_dir = tempfile.mkdtemp(prefix="fedistill-triggers-")  # Ray's actors share this machine
    with base.node_datasets_named(settings.task.dataset):  # the honest nodes load the run's dataset
        run_simulation(server_app=server_app, client_app=make_malicious_app(malicious, spec, attack, trigger_dir),
                       num_supernodes=clients,
                       backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                                       "init_args": {"logging_level": logging.INFO if verbose else logging.ERROR,
                                                     "log_to_driver": verbose}},
                       verbose_logging=verbose)
    try:
        if not results:
            raise RuntimeError("the simulation ended without a summary (rerun with --verbose)")
        return measure(results[0], spec, malicious, attack, trigger_dir)
    finally:
        shutil.rmtree(trigger_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from attacks.malicious import BackdoorSpec, malicious_partitions

    bd, rest = backdoor_args(argv)
    args = base.parse_args(rest)
    overrides = base.overrides_from_args(args)
    malicious = malicious_partitions(args.clients, bd.malicious, bd.malicious_seed)
    spec = BackdoorSpec(target=bd.target_class, fraction=bd.poison_fraction, size=bd.trigger_size, seed=args.seed)
    print(f"fedistill backdoor: {args.clients} clients, malicious partitions {malicious}, "
          f"{bd.poison_fraction:.0%} poisoned, {bd.trigger_size}px trigger -> class {bd.target_class}", flush=True)
    start = time.perf_counter()
    summary = simulate_backdoor(overrides, args.clients, malicious, spec, args.cpus_per_client, args.verbose,
                                attack=bd.attack)
    b = summary["backdoor"]
    dropped = summary.get("defense-dropped", [])
    print(f"ASR {b['asr']} CTA {b['cta']} | defense {summary.get('defense', 'none')}, dropped "
          f"{[d['node'] for d in dropped]} | run store {summary['run']} | {time.perf_counter() - start:.0f} s")
    return 0 if summary["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
