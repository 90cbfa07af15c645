"""``python -m attacks.audit <run store dir | audit config .json> --out DIR``: report.json + report.html.

A directory with ``config.json`` is a run store (:mod:`attacks.store_audit`); a ``.json`` file
is a central-scenario config (:class:`attacks.central.CentralConfig`; ``{}`` takes the defaults).
``--quick`` shrinks the central scenario to a smoke test.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from distill.data import load_dataset

from .central import CentralConfig, clean_floor, run_central
from .membership import AttackResult
from .metrics import clopper_pearson
from .report import (accuracy_epsilon_figure, bars_figure, has_epsilon_sweep, render_html, roc_figure,
                     thumbnails_figure)
from .store_audit import audit_store

QUICK = dict(pool_size=100, shadows=4,
             train={"arch": "mlp", "arch_kwargs": {"width": 64}, "epochs": 30, "lr": 0.05, "batch_size": 50, "dsa": False},
             targets=({"kind": "real"}, {"kind": "distill", "method": "dm", "settings": {"ipc": 2, "iterations": 5}}),
             backdoor={"method": "dm", "settings": {"ipc": 2, "iterations": 5}, "fraction": 0.1, "size": 3, "target": 0,
                       "client_size": 300, "doorping": True,
                       "doorping_settings": {"update_every": 2, "trigger_steps": 5, "proxy_steps": 5}},
             canary={"kind": "mislabel", "count": 100, "client_size": 200, "score": "loss"})


MIN_NON_MEMBERS_AT_1PCT = 500  # the 1% FPR threshold then rests on >= 5 false positives


def low_fpr_verdict(best: dict[str, Any], attacks_tried: int) -> str:
    """Whether the strongest of ``attacks_tried`` attacks shows leakage at 1% FPR, honestly.

    Picking the best of several attacks is multiple testing: its TPR interval is widened
    Bonferroni-style (alpha 0.05 / attacks). With few non-members the 1% FPR threshold rests on
    a handful of false positives and no verdict is given.
    """
    if best["non_members"] < MIN_NON_MEMBERS_AT_1PCT:
        return (f"inconclusive at 1% FPR (the threshold rests on {best['non_members'] // 100} non-member(s); "
                f"needs >= {MIN_NON_MEMBERS_AT_1PCT} non-members)")
    k = int(round(best["tpr_at_1pct_fpr"] * best["members"]))
    lo, _ = clopper_pearson(k, best["members"], 0.05 / max(attacks_tried, 1))
    if lo > 0.01:
        return (f"leaks at low FPR (the Bonferroni-corrected interval over {attacks_tried} attacks "
                "excludes the 1% chance level)")
    return "no evidence of leakage at 1% FPR (the corrected interval includes chance)"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The verdict in numbers: strongest attack per target at 1% FPR, backdoor ASR/CTA, epsilon bounds."""
    lines = []
    by_target: dict[str, list[dict]] = defaultdict(list)
    for a in report["membership_inference"]["attacks"]:
        by_target[a["target"]].append(a)
    for target, rows in by_target.items():
        best = max(rows, key=lambda a: (a["tpr_at_1pct_fpr"], a["auc"]))
        lo, hi = best["tpr_at_1pct_ci"]
        verdict = low_fpr_verdict(best, len(rows))
        lines.append(f"{target}: strongest attack {best['attack']}, AUC {best['auc']:.3f}, TPR@1%FPR "
                     f"{best['tpr_at_1pct_fpr']:.3f} [{lo:.3f}, {hi:.3f}] over {best['members']} members / "
                     f"{best['non_members']} non-members: {verdict}.")
        if best["non_members"] < 1000:
            lines.append(f"{target}: with {best['non_members']} non-members TPR@0.1%FPR is not resolvable "
                         f"(needs >= 1000, better 10^4).")
    rows = report["backdoor"].get("rows", [])
    if rows and "asr" in rows[0]:
        floor = clean_floor(rows)
        for r in rows:
            if r["name"] != "clean":
                lines.append(f"backdoor {r['name']} (poison {r['fraction']:.0%}): ASR {r['asr']:.3f}, CTA {r['cta']:.3f}"
                             + (f" (clean run: ASR floor {floor:.3f})" if floor is not None else "") + ".")
    for r in report["dp_audit"].get("canary_rows", []):
        claimed = r["claimed_epsilon"]
        verdict = ("" if claimed == "none" else
                   " — consistent with the accountant" if r["empirical_epsilon_lb"] <= claimed else
                   " — EXCEEDS the accountant's epsilon: the DP claim or its implementation is wrong")
        lines.append(f"{r['target']}: canary audit ({r['canaries']}, {r['included']} inserted, {r['runs']} run(s)) "
                     f"proves epsilon >= {r['empirical_epsilon_lb']:.3f} at {r['confidence']:.0%} confidence "
                     f"(delta {r['delta']:g}); accountant epsilon {claimed if claimed == 'none' else f'{claimed:.3f}'}"
                     f"{verdict}.")
    for r in report["dp_audit"].get("rows", []):
        lb = r.get("empirical_epsilon_lb", r.get("indicative_epsilon_lb"))
        lines.append(f"{r['target']}: accountant epsilon {r['claimed_epsilon']}, empirical lower bound {lb:.3f} "
                     f"({r['attack']}, {r['trials']} trials).")
    return lines or ["nothing was audited"]


def figures_for(results: list[AttackResult], backdoor_rows: list[dict], eps_rows: list[dict] | None = None,
                exposed: list | None = None) -> dict[str, list[str]]:
    """ROC per target, thumbnails of the most exposed members, ASR/CTA bars, accuracy vs epsilon."""
    by_target: dict[str, list[AttackResult]] = defaultdict(list)
    for r in results:
        by_target[r.target].append(r)
    figs = {"Membership inference": [roc_figure(rs, t) for t, rs in by_target.items()]}
    for rep in exposed or []:
        if rep.exposed is not None:
            figs["Membership inference"].append(thumbnails_figure(
                rep.exposed.images, rep.exposed_scores, rep.exposed.info,
                f"{rep.target}: most exposed members ({rep.exposed_attack} score)"))
    if backdoor_rows and "asr" in backdoor_rows[0]:
        figs["Backdoor"] = [bars_figure(backdoor_rows, "backdoor: ASR and CTA")]
    if eps_rows and has_epsilon_sweep(eps_rows):
        figs["DP audit"] = [accuracy_epsilon_figure(eps_rows)]
    return figs


def read_privacy_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of ``simulations/bench_privacy.py``'s ``results.json`` (or ``rows.jsonl``), for the plot."""
    path = Path(path)
    text = path.read_text()
    rows = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
            else json.loads(text)["rows"])
    return [{"row": r["row"], "method": r.get("method", r["row"]), "epsilon": r["epsilon"],
             "target_epsilon": r.get("target_epsilon"), "accuracy": float(r["accuracy"])} for r in rows]


def run_audit(source: str | Path, out: str | Path, quick: bool = False, num_partitions: int | None = None,
              max_clients: int = 10, progress: bool = True,
              privacy_results: str | Path | None = None) -> dict[str, Any]:
    """Audit ``source``, write ``report.json`` and ``report.html`` under ``out``; returns the JSON report.

    ``privacy_results`` (a ``bench_privacy`` results.json / rows.jsonl) adds its rows to the
    accuracy-vs-epsilon plot of the DP audit section."""
    source, out = Path(source), Path(out)
    exposed: list = []
    if source.is_dir():
        cfg = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {}
        data = load_dataset(cfg.get("dataset", "mnist10k"))
        raw = audit_store(source, data.test, num_partitions, max_clients)
        results = raw.pop("results")
    elif source.suffix == ".json":
        cfg_obj = CentralConfig.from_dict(json.loads(source.read_text()))
        if quick:
            cfg_obj = replace(cfg_obj, **QUICK)
        data = load_dataset(cfg_obj.dataset)
        raw = run_central(cfg_obj, data, progress)
        exposed = raw.pop("membership")
        results = [r for rep in exposed for r in rep.results]
        raw["config"] = cfg_obj.__dict__ | {"targets": list(cfg_obj.targets)}
    else:
        raise ValueError(f"{source}: expected a run-store directory or an audit config .json")
    report = {"source": str(source), **raw}
    dp = report.setdefault("dp_audit", {})
    if privacy_results is not None:
        dp["accuracy_vs_epsilon"] = dp.get("accuracy_vs_epsilon", []) + read_privacy_results(privacy_results)
    report["summary"] = {"lines": summary_lines(report)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    figs = figures_for(results, report["backdoor"].get("rows", []), dp.get("accuracy_vs_epsilon"), exposed)
    (out / "report.html").write_text(render_html(report, figs))
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m attacks.audit", description=__doc__.splitlines()[0])
    p.add_argument("source", help="run store directory (runs/<time>-<name>) or audit config .json")
    p.add_argument("--out", required=True, help="directory for report.json and report.html")
    p.add_argument("--quick", action="store_true", help="tiny central scenario (smoke test)")
    p.add_argument("--num-partitions", type=int, default=None,
                   help="partitions of the stored run (default: number of clients in the store)")
    p.add_argument("--max-clients", type=int, default=10, help="audit at most this many stored clients")
    p.add_argument("--privacy-results", default=None,
                   help="simulations/bench_privacy.py results.json (or rows.jsonl): accuracy-vs-epsilon plot")
    args = p.parse_args(argv)
    report = run_audit(args.source, args.out, args.quick, args.num_partitions, args.max_clients,
                       privacy_results=args.privacy_results)
    print("\n".join(report["summary"]["lines"]))
    print(f"wrote {Path(args.out) / 'report.html'} and report.json")


if __name__ == "__main__":
    main()
