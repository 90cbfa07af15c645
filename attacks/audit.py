"""``python -m attacks.audit <run store dir | audit config .json> --out DIR``: report.json, report.html, report.csv.

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
from .metrics import calibration_size
from .report import (accuracy_epsilon_figure, bars_figure, has_epsilon_sweep, render_html, roc_figure,
                     thumbnails_figure, verdict_lines, write_csv)
from .store_audit import audit_store

QUICK = dict(pool_size=100, shadows=4,
             train={"arch": "mlp", "arch_kwargs": {"width": 64}, "epochs": 30, "lr": 0.05, "batch_size": 50, "dsa": False},
             targets=({"kind": "real"}, {"kind": "distill", "method": "dm", "settings": {"ipc": 2, "iterations": 5}}),
             backdoor={"method": "dm", "settings": {"ipc": 2, "iterations": 5}, "fraction": 0.1, "size": 3, "target": 0,
                       "client_size": 300, "doorping": True,
                       "doorping_settings": {"update_every": 2, "trigger_steps": 5, "proxy_steps": 5}},
             canary={"kind": "mislabel", "count": 100, "client_size": 200, "score": "loss"})


MIN_NON_MEMBERS_AT_1PCT = 500  # the 1% FPR threshold then rests on >= 2 calibration false positives
VERDICT_ALPHA = 0.05  # family-wise false-alarm rate of "leaks at low FPR", over all attacks on a target
MIA_NOTE = ("TPR at 1% and 0.1% FPR are held out: the threshold is set on a seeded random part of the "
            "non-members (calibration_non_members) and the FPR is counted on the rest (fpr_at_1pct_heldout); "
            "with no signal the TPR then averages the nominal FPR. The low-FPR verdict tests, per attack, members "
            "against held-out non-members above that threshold (one-sided Fisher exact test, tpr_at_1pct_p_value) "
            f"and corrects for trying several attacks on a target (Bonferroni: p <= {VERDICT_ALPHA:g} / attacks), so "
            f"a target without leakage is called leaky with probability at most {VERDICT_ALPHA:g}. "
            "TPR at 0% FPR is in-sample (members above every non-member).")


def low_fpr_verdict(rows: list[dict[str, Any]], alpha: float = VERDICT_ALPHA) -> str:
    """Whether any of the attacks on one target shows leakage at 1% FPR, at false-alarm rate ``alpha``.

    Each row's ``tpr_at_1pct_p_value`` compares members with non-members that did not set the
    threshold, so it is valid for one attack; "some attack leaks" is a multiple comparison, so
    the smallest p-value must clear ``alpha / len(rows)`` (Bonferroni). With few non-members the
    1% threshold rests on a handful of calibration points and no verdict is given.
    """
    if not rows:
        raise ValueError("low_fpr_verdict needs at least one attack row")
    fewest = min(r["non_members"] for r in rows)
    if fewest < MIN_NON_MEMBERS_AT_1PCT:
        return (f"inconclusive at 1% FPR (only {fewest} non-members; needs >= {MIN_NON_MEMBERS_AT_1PCT} so that the "
                "held-out threshold rests on several calibration false positives)")
    best = min(rows, key=lambda r: r["tpr_at_1pct_p_value"])
    p, m = best["tpr_at_1pct_p_value"], len(rows)
    how = f"one-sided Fisher test against held-out non-members, Bonferroni over {m} attack(s)"
    if p <= alpha / m:
        return f"leaks at low FPR ({best.get('attack', '?')}: p = {p:.2g} <= {alpha:g}/{m}; {how})"
    return f"no evidence of leakage at 1% FPR (smallest p = {p:.2g} > {alpha:g}/{m}; {how})"


def canary_line(r: dict[str, Any]) -> str:
    """One canary row as "lower bound X (ceiling Y, confidence Z) vs accountant epsilon W" and what it shows.

    A bound at or below the accountant is only informative when the ceiling (the most these
    canaries and guesses could ever prove) exceeds the claim; otherwise 0 is all it could say.
    """
    claimed, lb, ceiling = r["claimed_epsilon"], r["empirical_epsilon_lb"], r["ceiling"]
    if claimed == "none":
        verdict = ""
    elif lb > claimed:
        verdict = " — EXCEEDS the accountant's epsilon: the DP claim or its implementation is wrong"
    elif ceiling <= claimed:
        verdict = (" — shows nothing about the accountant: even a perfect attack could not prove more than the "
                   "ceiling with these canaries and guesses")
    else:
        verdict = " — consistent with the accountant"
    return (f"{r['target']}: canary audit ({r['canaries']}, {r['included']} inserted, {r['runs']} run(s), "
            f"{r['guesses']} guesses) lower bound {lb:.3f} (ceiling {ceiling:.3f}, confidence {r['confidence']:.0%}) "
            f"vs accountant epsilon {claimed if claimed == 'none' else f'{claimed:.3f}'} (delta {r['delta']:g})"
            f"{verdict}.")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The verdict in numbers: strongest attack per target at 1% FPR, backdoor ASR/CTA, epsilon bounds.

    Stored as ``report["summary"]["lines"]``; the console and the top of report.html both show
    them through :func:`attacks.report.verdict_lines`."""
    lines = []
    by_target: dict[str, list[dict]] = defaultdict(list)
    for a in report["membership_inference"]["attacks"]:
        by_target[a["target"]].append(a)
    for target, rows in by_target.items():
        best = max(rows, key=lambda a: (a["tpr_at_1pct_fpr"], a["auc"]))
        lo, hi = best["tpr_at_1pct_ci"]
        lines.append(f"{target}: strongest attack {best['attack']}, AUC {best['auc']:.3f}, TPR@1%FPR "
                     f"{best['tpr_at_1pct_fpr']:.3f} [{lo:.3f}, {hi:.3f}] over {best['members']} members / "
                     f"{best['non_members']} non-members (threshold set on {best['calibration_non_members']} of them, "
                     f"FPR {best['fpr_at_1pct_heldout']:.3f} on the rest): {low_fpr_verdict(rows)}.")
        if calibration_size(best["non_members"], 0.001) == 0:
            lines.append(f"{target}: with {best['non_members']} non-members TPR@0.1%FPR is not resolvable "
                         f"(held out, it needs >= 2000: 999 to set the threshold; better 10^4).")
    rows = report["backdoor"].get("rows", [])
    if rows and "asr" in rows[0]:
        floor = clean_floor(rows)
        for r in rows:
            if r["name"] != "clean":
                lines.append(f"backdoor {r['name']} (poison {r['fraction']:.0%}): ASR {r['asr']:.3f}, CTA {r['cta']:.3f}"
                             + (f" (clean run: ASR floor {floor:.3f})" if floor is not None else "") + ".")
    lines += [canary_line(r) for r in report["dp_audit"].get("canary_rows", [])]
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
    """Audit ``source``, write ``report.json``, ``report.html`` and ``report.csv`` (the HTML's table rows)
    under ``out``; returns the JSON report.

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
    mia = report.setdefault("membership_inference", {})
    mia["notes"] = [*mia.get("notes", []), MIA_NOTE]
    dp = report.setdefault("dp_audit", {})
    if privacy_results is not None:
        dp["accuracy_vs_epsilon"] = dp.get("accuracy_vs_epsilon", []) + read_privacy_results(privacy_results)
    report["summary"] = {"lines": summary_lines(report)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    figs = figures_for(results, report["backdoor"].get("rows", []), dp.get("accuracy_vs_epsilon"), exposed)
    (out / "report.html").write_text(render_html(report, figs))
    write_csv(report, out / "report.csv")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m attacks.audit", description=__doc__.splitlines()[0])
    p.add_argument("source", help="run store directory (runs/<time>-<name>) or audit config .json")
    p.add_argument("--out", required=True, help="directory for report.json, report.html and report.csv")
    p.add_argument("--quick", action="store_true", help="tiny central scenario (smoke test)")
    p.add_argument("--num-partitions", type=int, default=None,
                   help="partitions of the stored run (default: number of clients in the store)")
    p.add_argument("--max-clients", type=int, default=10, help="audit at most this many stored clients")
    p.add_argument("--privacy-results", default=None,
                   help="simulations/bench_privacy.py results.json (or rows.jsonl): accuracy-vs-epsilon plot")
    args = p.parse_args(argv)
    report = run_audit(args.source, args.out, args.quick, args.num_partitions, args.max_clients,
                       privacy_results=args.privacy_results)
    print("\n".join(verdict_lines(report)))
    print(f"wrote {Path(args.out) / 'report.html'}, report.csv and report.json")


if __name__ == "__main__":
    main()
