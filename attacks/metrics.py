"""Membership-test metrics: ROC, AUC, TPR at low FPR, balanced accuracy, and DP lower bounds.

TPR at a low FPR is reported held-out: its threshold is set on some non-members and the FPR
is counted on others (:func:`heldout_tpr_at_fpr`); the ROC curve itself is in-sample.

Convention everywhere: a *higher* score means "more likely a member". Members are the
positives. Written with numpy + scipy's Beta quantile only (scipy comes with Opacus), so
scikit-learn is not a dependency; ``tests/test_attacks_metrics.py`` checks the ROC/AUC
against a brute-force pairwise count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta, hypergeom


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
    """The highest TPR among thresholds whose FPR is at most ``target`` (Carlini et al. 2022).

    In-sample: the threshold is picked on the non-members it counts, which biases the TPR up
    when there is little signal; use :func:`heldout_tpr_at_fpr` for a rate to quote or test.
    """
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


def calibration_size(n_out: int, target: float) -> int:
    """How many non-members set the threshold for ``target`` FPR (the rest are kept to count FPR).

    At most half of them, and ``n_cal + 1`` a multiple of ``1 / target``, so that the
    ``k = target * (n_cal + 1)``-th largest calibration score is a threshold whose expected FPR
    on fresh non-members is exactly ``target`` (continuous scores; conformal rank argument).
    0 when half the non-members cannot allow even one false positive.
    """
    if not 0 < target < 1:
        raise ValueError(f"target FPR must be in (0, 1), got {target}")
    k = math.floor(target * (n_out // 2 + 1) + 1e-9)
    return 0 if k < 1 else min(n_out // 2, round(k / target) - 1)


def _calibrated_threshold(calibration: np.ndarray, k: int) -> float:
    """The smallest calibration score ``t`` with at most ``k`` calibration scores ``>= t`` (ties
    may push it above the k-th largest; above the maximum when the top tie alone exceeds k)."""
    a = np.sort(calibration)
    top = np.unique(a[a.size - k:])
    ok = top[(a.size - np.searchsorted(a, top, side="left")) <= k]
    return float(ok[0]) if ok.size else float(np.nextafter(a[-1], np.inf))


def fisher_greater_p_value(tp: int, members: int, fp: int, non_members: int) -> float:
    """One-sided Fisher exact test that members pass a fixed threshold more often than non-members.

    Given a threshold chosen without these scores, both counts are binomial with the same rate
    when there is no signal, whatever that rate is; so the p-value is valid although the
    threshold's true FPR is unknown (a test of the TPR against 1% alone would ignore that).
    """
    if tp + fp == 0:
        return 1.0
    return float(hypergeom.sf(tp - 1, members + non_members, tp + fp, members))


@dataclass(frozen=True)
class HeldOutTPR:
    """TPR at a threshold chosen on calibration non-members, FPR counted on the other non-members."""

    target_fpr: float
    threshold: float
    tp: int
    members: int
    fp: int
    evaluation_non_members: int
    calibration_non_members: int
    p_value: float

    @property
    def tpr(self) -> float:
        return self.tp / self.members

    @property
    def fpr(self) -> float:
        return self.fp / self.evaluation_non_members if self.evaluation_non_members else 0.0


def heldout_tpr_at_fpr(scores_in: np.ndarray, scores_out: np.ndarray, target: float,
                       seed: int = 0) -> HeldOutTPR:
    """TPR at ``target`` FPR without choosing the threshold on the non-members that are counted.

    The in-sample estimate (:func:`tpr_at_fpr`) sets the threshold on the same non-members
    whose false positives it counts, so with no signal it sits above ``target`` and its
    binomial interval is too narrow. Here a seeded random part of the non-members
    (:func:`calibration_size`) sets the threshold, every member is counted (none chose it),
    and the remaining non-members give the FPR and the Fisher p-value of "members pass more
    often". With no signal the TPR's expectation is ``target``.
    """
    s_in, s_out = _as_scores(scores_in, "scores_in"), _as_scores(scores_out, "scores_out")
    n_cal = calibration_size(s_out.size, target)
    if n_cal == 0:  # not resolvable: the rule never says "member"
        return HeldOutTPR(target, math.inf, 0, s_in.size, 0, s_out.size, 0, 1.0)
    perm = np.random.default_rng(seed).permutation(s_out.size)
    cal, ev = s_out[perm[:n_cal]], s_out[perm[n_cal:]]
    t = _calibrated_threshold(cal, round(target * (n_cal + 1)))
    tp, fp = int((s_in >= t).sum()), int((ev >= t).sum())
    return HeldOutTPR(target, t, tp, s_in.size, fp, ev.size, n_cal,
                      fisher_greater_p_value(tp, s_in.size, fp, ev.size))


@dataclass(frozen=True)
class MIAMetrics:
    """The numbers a report table needs for one attack on one target.

    ``tpr_at_1pct_fpr`` and ``tpr_at_01pct_fpr`` are held-out (:func:`heldout_tpr_at_fpr`):
    0 when there are too few non-members to resolve that FPR. ``fpr_at_1pct_heldout`` is the
    FPR the 1% threshold reached on the non-members it never saw, ``tpr_at_1pct_p_value`` the
    Fisher p-value the low-FPR verdict tests. ``tpr_at_0_fpr`` stays in-sample (members above
    every non-member): descriptive, not a rate to test.
    """

    auc: float
    balanced_accuracy: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    tpr_at_0_fpr: float
    tpr_at_1pct_ci: tuple[float, float]
    fpr_at_1pct_heldout: float
    tpr_at_1pct_p_value: float
    calibration_non_members: int
    members: int
    non_members: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(scores_in: np.ndarray, scores_out: np.ndarray, alpha: float = 0.05, seed: int = 0) -> MIAMetrics:
    """AUC, balanced accuracy, held-out TPR at 1 / 0.1 % FPR (Clopper-Pearson interval and Fisher
    p-value at 1%), in-sample TPR at 0 % FPR. ``seed`` fixes the calibration split."""
    fpr, tpr, _ = roc_curve(scores_in, scores_out)
    n_in, n_out = np.asarray(scores_in).size, np.asarray(scores_out).size
    one = heldout_tpr_at_fpr(scores_in, scores_out, 0.01, seed)
    return MIAMetrics(auc=auc(fpr, tpr), balanced_accuracy=balanced_accuracy(fpr, tpr),
                      tpr_at_1pct_fpr=one.tpr,
                      tpr_at_01pct_fpr=heldout_tpr_at_fpr(scores_in, scores_out, 0.001, seed).tpr,
                      tpr_at_0_fpr=tpr_at_fpr(fpr, tpr, 0.0),
                      tpr_at_1pct_ci=clopper_pearson(one.tp, n_in, alpha),
                      fpr_at_1pct_heldout=one.fpr, tpr_at_1pct_p_value=one.p_value,
                      calibration_non_members=one.calibration_non_members, members=n_in, non_members=n_out)
