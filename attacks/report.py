"""The audit report: plots as base64 PNGs, one self-contained HTML page, a CSV of its tables, and the verdicts.

Sections, always in this order and always present (an empty one says why it is empty):
Summary (the verdict lines, as the console prints them, and a legend of the attacks),
Membership inference, Backdoor, DP audit; then the configuration, collapsed.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .membership import AttackResult  # noqa: E402

SECTIONS = ("Summary", "Membership inference", "Backdoor", "DP audit")


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def roc_figure(results: Iterable[AttackResult], title: str) -> str:
    """ROC curves on log-log axes with the diagonal (Carlini et al. 2022's way of showing low FPR)."""
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    floor = 1.0
    for r in results:
        fpr, tpr = r.roc()
        floor = min(floor, 1.0 / max(r.metrics.non_members, 1))
        ax.plot(fpr, tpr, label=f"{r.attack} (AUC {r.metrics.auc:.2f})")
    ax.plot([1e-4, 1], [1e-4, 1], "k--", lw=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(max(floor / 2, 1e-4), 1), ylim=(max(floor / 2, 1e-4), 1),
           xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def bars_figure(rows: list[dict[str, Any]], title: str) -> str:
    """ASR and CTA side by side per scenario."""
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * max(len(rows), 1), 3.4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["asr"] for r in rows], 0.4, label="ASR")
    ax.bar([x + 0.2 for x in xs], [r["cta"] for r in rows], 0.4, label="CTA")
    ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=20, fontsize=8)
    ax.set(ylim=(0, 1), title=title)
    ax.legend(fontsize=8)
    return _png(fig)


def _finite_eps(v: Any) -> float:
    """An epsilon as a float; "inf" / "none" / missing are +inf (no DP)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.inf


def has_epsilon_sweep(rows: list[dict[str, Any]]) -> bool:
    """Worth a plot: at least two distinct finite epsilons."""
    return len({_finite_eps(r.get("epsilon")) for r in rows} - {math.inf}) >= 2


def accuracy_epsilon_figure(rows: list[dict[str, Any]], title: str = "accuracy vs epsilon") -> str:
    """Test accuracy against the accountant's epsilon, one line per family (``method`` or ``row``);
    no-DP rows sit at a marked "inf" position right of the largest finite epsilon. Reads
    ``simulations/bench_privacy.py`` rows (``row``, ``method``, ``epsilon``, ``accuracy``) as is."""
    finite = sorted({_finite_eps(r.get("epsilon")) for r in rows} - {math.inf})
    x_inf = 2 * finite[-1] if finite else 1.0
    families: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        fam = str(r.get("method", r.get("row", "")))
        fam = {"dm": "dp-dm", "dsa": "dpsgd-gm"}.get(fam, fam)  # bench_privacy's no-DP rows of each family
        e = _finite_eps(r.get("epsilon"))
        families.setdefault(fam, []).append((x_inf if math.isinf(e) else e, 100 * float(r["accuracy"])))
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for fam, pts in families.items():
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=fam)
    ax.set_xscale("log", base=2)
    ticks = [*finite, x_inf] if finite else [x_inf]
    ax.set_xticks(ticks, [f"{e:.3g}" for e in finite] + ["inf"], fontsize=7)
    ax.set(xlabel="epsilon spent (accountant, delta 1e-5)", ylabel="test accuracy (%)", title=title)
    ax.legend(fontsize=7)
    return _png(fig)


def thumbnails_figure(images: Any, scores: list[float], info: Any, title: str) -> str:
    """The most exposed members (highest membership score) as a row of thumbnails, score above each."""
    import torch

    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    px = (images.detach().cpu() * std + mean).clamp(0, 1)
    n = px.shape[0]
    fig, axes = plt.subplots(1, max(n, 1), figsize=(1.1 * max(n, 1), 1.5), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.axis("off")
        if i < n:
            img = px[i].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None)
            ax.set_title(f"{scores[i]:.3g}", fontsize=7)
    fig.suptitle(title, fontsize=8)
    return _png(fig)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)) and all(isinstance(x, float) for x in v):
            return "[" + ", ".join(f"{x:.3f}" for x in v) + "]"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


MIA_COLUMNS = ["target", "attack", "auc", "balanced_accuracy", "tpr_at_1pct_fpr", "tpr_at_1pct_ci",
               "fpr_at_1pct_heldout", "tpr_at_1pct_p_value", "tpr_at_01pct_fpr", "tpr_at_0_fpr", "members",
               "non_members", "calibration_non_members"]


CANARY_COLUMNS = ["target", "canaries", "included", "runs", "score", "guesses", "correct",
                  "epsilon_lb_one_run", "ceiling_one_run", "confidence_one_run",
                  "epsilon_lb_clopper_pearson", "ceiling_clopper_pearson", "confidence_clopper_pearson",
                  "cp_independent", "empirical_epsilon_lb", "ceiling", "confidence", "quoted", "claimed_epsilon",
                  "delta"]


ATTACK_LEGEND = {  # one sentence per attack: what it measures
    "loss": "loss: the target model's loss on a record; members tend to have lower loss.",
    "confidence": "confidence: the target model's softmax probability of the true label; members tend to score higher.",
    "distance-pixel": "distance-pixel: pixel distance from a record to the nearest synthetic image of its class; "
                      "a distilled set that copies its members sits close to them.",
    "distance-feature": "distance-feature: the same nearest-synthetic distance, measured in a network's feature space.",
    "lira-online": "lira-online: LiRA's likelihood ratio of the record's scaled logit under shadow models trained "
                   "with (IN) and without (OUT) it (Carlini et al. 2022).",
    "lira-offline": "lira-offline: LiRA with OUT shadows only: how far the record's scaled logit lies above its "
                    "OUT distribution.",
    "rmia-online": "rmia-online: RMIA's pairwise likelihood ratio of the record against population points, "
                   "with all reference models (Zarifzadeh et al. 2024).",
    "rmia-offline": "rmia-offline: RMIA with OUT reference models only, Pr(x) rescaled by the tuned factor a.",
    "naive": "naive (backdoor): a fraction of the client's images stamped with a fixed trigger and relabelled; "
             "ASR = triggered test images sent to the target class, CTA = clean test accuracy.",
    "doorping": "doorping (backdoor): the trigger optimised during distillation (Liu et al. NDSS 2023); "
                "ASR and CTA as for naive.",
    "clean": "clean (backdoor): no poisoning; its ASR is the floor the attacks are read against.",
    "patch brightness": "patch brightness (backdoor, run store): mean bottom-right patch brightness per class; "
                        "a naive trigger shows as one class far brighter than the rest.",
    "canary audit": "canary audit (DP): canaries inserted at random and scored; a lower bound on epsilon with "
                    "its ceiling, to set against the accountant's epsilon.",
    "empirical epsilon": "empirical epsilon (DP): a lower bound on epsilon from a membership attack's "
                         "TPR/FPR trade-off.",
}


def verdict_lines(report: dict[str, Any]) -> list[str]:
    """The one-line verdicts (``report["summary"]["lines"]``, from ``attacks.audit.summary_lines``):
    what ``python -m attacks.audit`` prints and what report.html opens with."""
    return list(report.get("summary", {}).get("lines") or ["nothing was audited"])


def legend_lines(report: dict[str, Any]) -> list[str]:
    """One sentence per attack that appears in ``report``, in :data:`ATTACK_LEGEND`'s order."""
    present = {a.get("attack") for a in report.get("membership_inference", {}).get("attacks", [])}
    backdoor = report.get("backdoor", {}).get("rows", [])
    present |= {r.get("name") for r in backdoor}
    if backdoor and "brightest_patch_class" in backdoor[0]:
        present.add("patch brightness")
    dp = report.get("dp_audit", {})
    if dp.get("canary_rows"):
        present.add("canary audit")
    if dp.get("rows"):
        present.add("empirical epsilon")
    return [text for name, text in ATTACK_LEGEND.items() if name in present]


def report_tables(report: dict[str, Any]) -> list[tuple[str, str, str, list[dict[str, Any]], list[str]]]:
    """``(section, table id, title, rows, columns)`` of every table in the report: the HTML and the CSV
    (whose ``table`` column holds the id) both read these."""
    tables = []
    mia = report.get("membership_inference", {})
    if mia.get("attacks"):
        tables.append(("Membership inference", "membership_inference", "", mia["attacks"], MIA_COLUMNS))
    rows = report.get("backdoor", {}).get("rows")
    if rows:
        tables.append(("Backdoor", "backdoor", "", rows, list(rows[0].keys())))
    dp = report.get("dp_audit", {})
    if dp.get("canary_rows"):
        tables.append(("DP audit", "dp_canary_audit", "Canary audit: empirical lower bound vs accountant epsilon",
                       dp["canary_rows"], CANARY_COLUMNS))
    if dp.get("rows"):
        tables.append(("DP audit", "dp_membership_attacks", "From the membership attacks", dp["rows"],
                       list(dp["rows"][0].keys())))
    return tables


CSV_TABLE_COLUMN = "table"


def csv_cell(v: Any) -> str:
    """A value as written to report.csv: numbers in full precision, lists as JSON, missing as empty."""
    if v is None:
        return ""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str)
    return str(v)


def write_csv(report: dict[str, Any], path: str | Path) -> None:
    """report.csv: every row of the report's tables, one header row (``table`` + the union of their columns)."""
    tables = report_tables(report)
    columns = [CSV_TABLE_COLUMN]
    for *_, cols in tables:
        columns += [c for c in cols if c not in columns]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for _, table_id, _, rows, cols in tables:
            for r in rows:
                w.writerow([table_id] + [csv_cell(r.get(c)) if c in cols else "" for c in columns[1:]])


def render_html(report: dict[str, Any], figures: dict[str, list[str]]) -> str:
    """One page: the verdict lines and a legend of the attacks first, then every other section of
    :data:`SECTIONS` (tables from :func:`report_tables`, ``figures[section]`` PNGs), the
    configuration last inside a collapsed ``<details>``. Every text is escaped."""
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>fedistill audit</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{margin:4px}</style></head><body>",
             f"<h1>fedistill audit report</h1><p>Source: {esc(str(report.get('source', '')))}</p>"]
    tables = report_tables(report)
    for section in SECTIONS:
        key = section.lower().replace(" ", "_")
        parts.append(f"<h2 id='{key}'>{esc(section)}</h2>")
        if section == "Summary":
            parts.append("<ul class='verdicts'>" + "".join(f"<li>{esc(s)}</li>" for s in verdict_lines(report))
                         + "</ul>")
            legend = legend_lines(report)
            if legend:
                parts.append("<h3>Attacks</h3><ul class='legend'>"
                             + "".join(f"<li>{esc(s)}</li>" for s in legend) + "</ul>")
            continue
        body = report.get(key, {})
        for note in body.get("notes", []):
            parts.append(f"<p>{esc(str(note))}</p>")
        for _, _, title, rows, columns in (t for t in tables if t[0] == section):
            if title:
                parts.append(f"<h3>{esc(title)}</h3>")
            parts.append(_table(rows, columns))
        for png in figures.get(section, []):
            parts.append(f"<img src='data:image/png;base64,{esc(png)}'>")
    parts.append("<details id='configuration'><summary>Configuration</summary><pre>"
                 + esc(json.dumps(report.get("config", {}), indent=1, sort_keys=True, default=str))
                 + "</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)
