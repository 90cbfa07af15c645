"""Membership-test metrics: ROC, AUC, TPR at low FPR, balanced accuracy, and DP lower bounds.

Convention everywhere: a *higher* score means "more likely a member". Members are the
positives. Written with numpy + scipy's Beta quantile only (scipy comes with Opacus), so
scikit-learn is not a dependency; ``tests/test_attacks_metrics.py`` checks the ROC/AUC
against a brute-force pairwise count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta


def _as_scores(x: np.ndarray | list[float], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return a


def roc_curve(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``: predict member when ``score >= threshold``.

    One point per distinct score (ties move together, so the area equals the Mann-Whitney
    statistic with ties counted half), from (0, 0) at threshold +inf to (1, 1).
    """
    s_in, s_out = _as_scores(scores_in, "scores_in"), _as_scores(scores_out, "scores_out")
    scores = np.concatenate([s_in, s_out])
    is_in = np.concatenate([np.ones(s_in.size), np.zeros(s_out.size)])
    order = np.argsort(-scores, kind="stable")
    scores, is_in = scores[order], is_in[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]
    tp = np.cumsum(is_in)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    tpr = np.r_[0.0, tp / s_in.size]
    fpr = np.r_[0.0, fp / s_out.size]
    return fpr, tpr, np.r_[np.inf, scores[last_of_tie]]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve (trapezoids)."""
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The highest TPR among thresholds whose FPR is at most ``target`` (Carlini et al. 2022)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def balanced_accuracy(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """``max_t 1 - (FPR + FNR) / 2`` over the curve's thresholds."""
    return float(np.max(1.0 - (fpr + (1.0 - tpr)) / 2.0))


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided ``1 - alpha`` interval for a binomial proportion ``k / n``."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def epsilon_lower_bound(tp: int, fn: int, fp: int, tn: int, delta: float = 1e-5,
                        alpha: float = 0.05) -> float:
    """Empirical epsilon lower bound from one fixed-threshold membership test.

    (eps, delta)-DP forces TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta, so with
    Clopper-Pearson upper bounds on FPR and FNR (Jagielski, Ullman & Oprea, NeurIPS 2020;
    Nasr et al., S&P 2021)::

        eps_LB = max(ln[(1 - delta - FNR_hi) / FPR_hi], ln[(1 - delta - FPR_hi) / FNR_hi])

    holds with confidence ``1 - alpha``. Returns 0 when nothing can be proven.
    """
    if min(tp, fn, fp, tn) < 0 or tp + fn < 1 or fp + tn < 1:
        raise ValueError(f"bad confusion counts tp={tp} fn={fn} fp={fp} tn={tn}")
    fpr_hi = clopper_pearson(fp, fp + tn, alpha)[1]
    fnr_hi = clopper_pearson(fn, tp + fn, alpha)[1]
    best = 0.0
    for num, den in ((1 - delta - fnr_hi, fpr_hi), (1 - delta - fpr_hi, fnr_hi)):
        if num > 0 and den > 0:
            best = max(best, math.log(num / den))
    return best


def epsilon_lower_bound_from_scores(scores_in: np.ndarray, scores_out: np.ndarray, delta: float = 1e-5,
                                    alpha: float = 0.05, seed: int = 0) -> float:
    """Pick the threshold on one random half of the trials, bound epsilon on the other half.

    Choosing the threshold on the same trials that are counted would overstate the bound, so
    the two halves stay apart, as the auditing papers require.
    """
    rng = np.random.default_rng(seed)
    s_in, s_out = rng.permutation(_as_scores(scores_in, "scores_in")), rng.permutation(
        _as_scores(scores_out, "scores_out"))
    if min(s_in.size, s_out.size) < 4:
        raise ValueError("need at least 4 member and 4 non-member trials")
    (a_in, b_in), (a_out, b_out) = np.array_split(s_in, 2), np.array_split(s_out, 2)
    candidates = np.unique(np.concatenate([a_in, a_out]))
    best = np.argmax(_bounds_at(a_in, a_out, candidates, delta, alpha))
    return float(_bounds_at(b_in, b_out, candidates[best:best + 1], delta, alpha)[0])


def _upper(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Vectorised Clopper-Pearson upper bounds (1 where k = n)."""
    k = np.asarray(k, dtype=np.float64)
    hi = beta.ppf(1 - alpha / 2, k + 1, np.maximum(n - k, 1))
    return np.where(k >= n, 1.0, hi)


def _bounds_at(x_in: np.ndarray, x_out: np.ndarray, thresholds: np.ndarray, delta: float,
               alpha: float) -> np.ndarray:
    """:func:`epsilon_lower_bound` at every threshold at once (predict member when score >= t)."""
    tp = x_in.size - np.searchsorted(np.sort(x_in), thresholds, side="left")
    fp = x_out.size - np.searchsorted(np.sort(x_out), thresholds, side="left")
    fpr_hi, fnr_hi = _upper(fp, x_out.size, alpha), _upper(x_in.size - tp, x_in.size, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.clip(1 - delta - fnr_hi, 0, None) / fpr_hi)
        b = np.log(np.clip(1 - delta - fpr_hi, 0, None) / fnr_hi)
    return np.nan_to_num(np.maximum(np.maximum(a, b), 0.0), nan=0.0, neginf=0.0, posinf=0.0)


@dataclass(frozen=True)
class MIAMetrics:
    """The numbers a report table needs for one attack on one target."""

    auc: float
    balanced_accuracy: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    tpr_at_0_fpr: float
    tpr_at_1pct_ci: tuple[float, float]
    members: int
    non_members: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(scores_in: np.ndarray, scores_out: np.ndarray, alpha: float = 0.05) -> MIAMetrics:
    """AUC, balanced accuracy, TPR at 1 / 0.1 / 0 % FPR (with a Clopper-Pearson interval at 1%)."""
    fpr, tpr, _ = roc_curve(scores_in, scores_out)
    n_in, n_out = np.asarray(scores_in).size, np.asarray(scores_out).size
    t1 = tpr_at_fpr(fpr, tpr, 0.01)
    return MIAMetrics(auc=auc(fpr, tpr), balanced_accuracy=balanced_accuracy(fpr, tpr),
                      tpr_at_1pct_fpr=t1, tpr_at_01pct_fpr=tpr_at_fpr(fpr, tpr, 0.001),
                      tpr_at_0_fpr=tpr_at_fpr(fpr, tpr, 0.0),
                      tpr_at_1pct_ci=clopper_pearson(int(round(t1 * n_in)), n_in, alpha),
                      members=n_in, non_members=n_out)
