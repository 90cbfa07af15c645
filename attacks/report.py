"""The audit report: plots as base64 PNGs, one self-contained HTML page, and a summary in numbers.

Sections, always in this order and always present (an empty one says why it is empty):
Membership inference, Backdoor, DP audit, Summary.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
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
        elif section == "DP audit":
            if body.get("canary_rows"):
                parts.append("<h3>Canary audit: empirical lower bound vs accountant epsilon</h3>")
                parts.append(_table(body["canary_rows"], CANARY_COLUMNS))
            if body.get("rows"):
                parts.append("<h3>From the membership attacks</h3>")
                parts.append(_table(body["rows"], list(body["rows"][0].keys())))
        elif section == "Summary":
            parts.append("<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in body.get("lines", [])) + "</ul>")
        for png in figures.get(section, []):
            parts.append(f"<img src='data:image/png;base64,{png}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
