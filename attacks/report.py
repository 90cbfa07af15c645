"""The audit report: plots as base64 PNGs, one self-contained HTML page, and a summary in numbers.

Sections, always in this order and always present (an empty one says why it is empty):
Membership inference, Backdoor, DP audit, Summary.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .membership import AttackResult  # noqa: E402

SECTIONS = ("Membership inference", "Backdoor", "DP audit", "Summary")


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
               "tpr_at_01pct_fpr", "tpr_at_0_fpr", "members", "non_members"]


def render_html(report: dict[str, Any], figures: dict[str, list[str]]) -> str:
    """One page: every section of :data:`SECTIONS`, tables from ``report``, ``figures[section]`` PNGs."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>fedistill audit</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{margin:4px}</style></head><body>",
             f"<h1>fedistill audit report</h1><p>Source: {html.escape(str(report.get('source', '')))}</p>",
             "<h2>Configuration</h2><pre>" + html.escape(json.dumps(report.get("config", {}), indent=1,
                                                                    sort_keys=True, default=str)) + "</pre>"]
    for section in SECTIONS:
        key = section.lower().replace(" ", "_")
        parts.append(f"<h2 id='{key}'>{section}</h2>")
        body = report.get(key, {})
        for note in body.get("notes", []):
            parts.append(f"<p>{html.escape(note)}</p>")
        if section == "Membership inference" and body.get("attacks"):
            parts.append(_table(body["attacks"], MIA_COLUMNS))
        elif section == "Backdoor" and body.get("rows"):
            parts.append(_table(body["rows"], list(body["rows"][0].keys())))
        elif section == "DP audit" and body.get("rows"):
            parts.append(_table(body["rows"], list(body["rows"][0].keys())))
        elif section == "Summary":
            parts.append("<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in body.get("lines", [])) + "</ul>")
        for png in figures.get(section, []):
            parts.append(f"<img src='data:image/png;base64,{png}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
