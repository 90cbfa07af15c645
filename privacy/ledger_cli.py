"""What a node has spent, per run and in total: ``python -m privacy.ledger_cli show LEDGER``.

``init LEDGER --data FILE`` creates an empty ledger guarding ``FILE`` (its sha256), so a node
can refuse to start from a missing one; ``show`` prints a table (``--json`` for the raw figures).
"""

from __future__ import annotations

import argparse
import json
import sys

from .node_ledger import LedgerError, NodeLedger, file_identity, parse, summary


def _show(args: argparse.Namespace) -> int:
    try:
        with open(args.ledger) as f:
            state = parse(f.read(), args.ledger)
    except (OSError, LedgerError) as err:
        print(f"error: {args.ledger}: {err}", file=sys.stderr)
        return 2
    accountant = args.accountant or state.get("accountant", "rdp")
    delta = args.delta or float(state.get("delta", 1e-5))
    report = summary(state, accountant, delta)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"ledger {args.ledger}\ndata   {report['data_id']}\nepsilon at delta {delta:g} ({accountant})")
    print(f"{'run':<24} {'rounds':>6} {'epsilon':>10}")
    for run, row in report["runs"].items():
        print(f"{run[:24]:<24} {row['rounds']:>6} {row['epsilon']:>10.4f}")
    total = report["epsilon_total"]
    print(f"{'lifetime total':<24} {'':>6} {total if total is not None else float('inf'):>10.4f}")
    if report["releases"]:
        print(f"kept releases: {', '.join(report['releases'])}")
    return 0


def _init(args: argparse.Namespace) -> int:
    data_id = args.data_id or file_identity(args.data)
    try:
        NodeLedger(args.ledger, data_id, args.accountant or "rdp", args.delta or 1e-5).init()
    except LedgerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"ledger {args.ledger} guards {data_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m privacy.ledger_cli", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print the spending per run and in total")
    show.add_argument("ledger")
    show.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    init = sub.add_parser("init", help="create an empty ledger for a data file")
    init.add_argument("ledger")
    source = init.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="the data file the ledger guards (its sha256 is the identity)")
    source.add_argument("--data-id", help="an explicit identity instead of --data")
    for p in (show, init):
        p.add_argument("--accountant", choices=("rdp", "prv"), default=None)
        p.add_argument("--delta", type=float, default=None)
    args = parser.parse_args(argv)
    return _show(args) if args.command == "show" else _init(args)


if __name__ == "__main__":
    sys.exit(main())
