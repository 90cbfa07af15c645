"""BENCHMARKS.md "Reliability" tables, generated from their raw JSON (never typed by hand).

    python simulations/reliability_table.py [hostile kills fuzz deploy chunks]   # the markdown tables

Inputs (docs/benchmarks/): ``hostile_clients.json`` (``FEDISTILL_HOSTILE_REPORT=... pytest
tests/test_hostile_clients.py``), ``kills.json`` (``simulations/bench_kills.py``),
``fuzz_counts.json`` (``FEDISTILL_FUZZ_COUNTS=... pytest tests/test_server_fuzz.py``),
``deploy_approval.json`` (``simulations/deploy.py bench`` rows, several runs),
``chunk_inflation.json`` (``simulations/chunk_inflation.py --repeat 256`` and ``1024``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "docs" / "benchmarks"


def hostile_table(figures: dict) -> str:
    attacks, fed, avg = figures["attacks"], figures["fedistill"], figures["fedavg"]
    rows = [("upload (fedistill train reply)", attacks["upload"],
             f"all refused; honest sets kept {fed['honest-sets-kept']} / {fed['honest-nodes']} and the global model "
             f"{'bit-identical' if fed['global-model-bit-identical'] else 'DIFFERENT'} to the attacker-free run's"),
            ("federated evaluation report", attacks["evaluation"],
             f"all left out ({fed['federated-rejected']} refused)"),
            ("FedAvg update", attacks["fedavg"],
             f"all refused before averaging ({avg['rejected']} over {avg['rounds']} rounds); accuracy "
             f"{avg['accuracy']:.4f} = attacker-free {avg['attacker-free-accuracy']:.4f}"),
            ("shown harmless by their own runs (client-id claim, forged accuracy at a legal weight)",
             attacks["shown-harmless-by-own-runs"], "victim kept bit-identical; mean moved within its bound")]
    lines = ["| attack surface | attacks | outcome |", "| --- | --- | --- |"]
    lines += [f"| {name} | {n} | {outcome} |" for name, n, outcome in rows]
    lines.append(f"| **all** | **{figures['attack-kinds']}** | rejected with their kind, or harmless |")
    return "\n".join(lines)


def kills_table(k: dict) -> str:
    rows = [("kill points (writes x phases)", f"{k['kill-points']} ({len(k['phases'])} phases)"),
            ("killed by a real SIGKILL at the point", k["killed-by-sigkill"]),
            ("kills that left a temp file", k["kills-leaving-a-temp-file"]),
            ("accepted sets at the kill / lost", f"{k['sets-accepted-at-kill']} / {k['sets-lost']}"),
            ("resumed runs identical to the uninterrupted run",
             f"{k['identical-to-uninterrupted']} / {k['of-resumable']}"),
            ("kills before config.json existed (resume refused: nothing accepted yet)", k["refused-no-config-yet"]),
            ("wall time", f"{k['seconds']:.0f} s")]
    return "\n".join(["| figure | value |", "| --- | --- |", *[f"| {a} | {b} |" for a, b in rows]])


def deploy_table(rows: list[dict]) -> str:
    by_mode: dict[str, list[dict]] = {}
    for row in rows:
        by_mode.setdefault(row["mode"], []).append(row)
    out = ["| mode | runs | startup | `flwr run` | server loop | total | accepted | accuracy |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, runs in by_mode.items():
        def med(key: str) -> str:
            return f"{statistics.median(r[key] for r in runs):.1f} s"
        low, high = min(r["accepted"] for r in runs), max(r["accepted"] for r in runs)
        accepted = f"{low if low == high else f'{low}-{high}'} / {runs[0]['nodes']}"
        accs = ", ".join(f"{100 * r['accuracy']:.2f}" for r in runs)
        out.append(f"| {mode} (approval {'on' if runs[0].get('approval') else 'off'}) | {len(runs)} | "
                   f"{med('startup-s')} | {med('flwr-run-s')} | {med('server-wall-s')} | {med('total-s')} | "
                   f"{accepted} | {accs} % |")
    return "\n".join(out)


def fuzz_table(counts: dict) -> str:
    out = ["| fuzz test | mutations | built by Flower, rejected | Flower refused to build | as raw bytes: rejected | "
           "not inflatable by Flower |", "| --- | --- | --- | --- | --- | --- |"]
    total = {k: 0 for k in ("mutations", "built", "flower-refused-to-build", "raw-rejected",
                            "raw-flower-cannot-inflate")}
    for name, c in counts.items():
        out.append(f"| {name} | " + " | ".join(str(c.get(k, 0)) for k in total) + " |")
        total = {k: v + c.get(k, 0) for k, v in total.items()}
    out.append("| **all** | " + " | ".join(f"**{v}**" for v in total.values()) + " |")
    return "\n".join(out)


def chunk_table(rows: list[dict]) -> str:
    out = ["| forged Array object | plus one chunk | bytes sent | bytes materialised | peak RSS growth "
           "| inflate time |",
           "| --- | --- | --- | --- | --- | --- |"]
    out += [f"| {r['array-object-bytes']:,} B ({r['repeat']:,} references) | {r['chunk-bytes'] >> 20} MiB | "
            f"{r['bytes-sent']:,} | {r['bytes-materialised']:,} ({r['bytes-materialised'] / 2**20:,.0f} MiB) | "
            f"{r['peak-rss-growth-mib']:,.0f} MiB | {r['inflate-seconds']:.1f} s |" for r in rows]
    return "\n".join(out)


TABLES = {"hostile": ("hostile_clients.json", hostile_table), "kills": ("kills.json", kills_table),
          "fuzz": ("fuzz_counts.json", fuzz_table), "deploy": ("deploy_approval.json", deploy_table),
          "chunks": ("chunk_inflation.json", chunk_table)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=RAW)
    parser.add_argument("tables", nargs="*", choices=[[], *TABLES], default=list(TABLES),
                        help="which tables (default: all)")
    args = parser.parse_args(argv)
    for name in args.tables:
        source, table = TABLES[name]
        print(f"<!-- {name}: simulations/reliability_table.py {name} (docs/benchmarks/{source}) -->")
        print(table(json.loads((args.raw / source).read_text())), end="\n\n")


if __name__ == "__main__":
    main()
