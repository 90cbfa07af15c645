"""ROC/AUC against a brute-force pairwise count, TPR@FPR on a built example, epsilon lower bounds."""

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from attacks.metrics import (auc, balanced_accuracy, clopper_pearson, epsilon_lower_bound,
                             epsilon_lower_bound_from_scores, roc_curve, summarize, tpr_at_fpr)


def pairwise_auc(s_in, s_out):
    """P[member score > non-member score] + half the ties, counted pair by pair."""
    s_in, s_out = np.asarray(s_in)[:, None], np.asarray(s_out)[None, :]
    return float(((s_in > s_out) + 0.5 * (s_in == s_out)).mean())


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    s_in = rng.integers(0, 8, size=37).astype(float)  # many ties on purpose
    s_out = rng.integers(0, 6, size=53).astype(float)
    fpr, tpr, thr = roc_curve(s_in, s_out)
    assert auc(fpr, tpr) == pytest.approx(pairwise_auc(s_in, s_out), abs=1e-12)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)


def test_known_cases():
    fpr, tpr, _ = roc_curve([2, 3, 4], [0, 1])
    assert auc(fpr, tpr) == 1.0 and balanced_accuracy(fpr, tpr) == 1.0
    fpr, tpr, _ = roc_curve([0, 1], [2, 3, 4])
    assert auc(fpr, tpr) == 0.0
    fpr, tpr, _ = roc_curve([1.0] * 5, [1.0] * 7)
    assert auc(fpr, tpr) == 0.5 and balanced_accuracy(fpr, tpr) == 0.5


def test_tpr_at_fpr_on_a_constructed_example():
    # 100 non-members at 0..99; members: 30 above every non-member, 20 between the top two.
    s_out = np.arange(100.0)
    s_in = np.r_[np.full(30, 200.0), np.full(20, 98.5), np.zeros(50) - 1]
    fpr, tpr, _ = roc_curve(s_in, s_out)
    assert tpr_at_fpr(fpr, tpr, 0.0) == 0.30
    assert tpr_at_fpr(fpr, tpr, 0.01) == 0.50   # threshold 98.5..99 lets exactly 1 FP through
    assert tpr_at_fpr(fpr, tpr, 0.001) == 0.30  # 0.1% of 100 is below one false positive
    m = summarize(s_in, s_out)
    assert m.tpr_at_1pct_fpr == 0.5 and m.members == 100 and m.non_members == 100
    lo, hi = m.tpr_at_1pct_ci
    assert lo < 0.5 < hi


def test_clopper_pearson_edges_and_golden_value():
    assert clopper_pearson(0, 10)[0] == 0.0 and clopper_pearson(10, 10)[1] == 1.0
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.18709, abs=1e-4) and hi == pytest.approx(0.81291, abs=1e-4)
    with pytest.raises(ValueError):
        clopper_pearson(11, 10)


def test_epsilon_lower_bound_golden_value_from_the_notes():
    # ATTACK_NOTES.md: TP 200/1000, FP 2/1000, delta 1e-5, alpha 0.05 -> 3.19
    assert epsilon_lower_bound(200, 800, 2, 998) == pytest.approx(3.19, abs=0.01)
    assert epsilon_lower_bound(500, 500, 500, 500) == 0.0
    # A perfect attack over n trials per side proves only about ln(n / 3.7).
    assert epsilon_lower_bound(1000, 0, 0, 1000) == pytest.approx(math.log(1000 / 3.7), abs=0.05)


def gaussian_epsilon(sigma, delta):
    """Exact epsilon of the Gaussian mechanism with sensitivity 1 (Balle & Wang, ICML 2018)."""
    mu = 1.0 / sigma

    def excess(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(excess, 0.0, 100.0)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("seed", range(3))
def test_empirical_epsilon_never_exceeds_the_exact_epsilon_of_a_gaussian_mechanism(sigma, seed):
    """Simulate the mechanism exactly: a member's score is 1 + N(0, sigma^2), a non-member's N(0, sigma^2)."""
    delta, n = 1e-5, 20_000
    rng = np.random.default_rng(seed)
    s_in, s_out = 1.0 + sigma * rng.standard_normal(n), sigma * rng.standard_normal(n)
    lb = epsilon_lower_bound_from_scores(s_in, s_out, delta=delta, seed=seed)
    true_eps = gaussian_epsilon(sigma, delta)
    assert 0.0 <= lb <= true_eps
    if sigma <= 1.0:  # a leaky mechanism: the audit proves a clearly positive epsilon
        assert lb > 1.0


def test_no_leak_proves_nothing():
    rng = np.random.default_rng(0)
    s = rng.standard_normal(4000)
    assert epsilon_lower_bound_from_scores(s[:2000], s[2000:], seed=0) < 0.3


def test_vectorised_bounds_equal_the_scalar_formula():
    from attacks.metrics import _bounds_at
    rng = np.random.default_rng(1)
    s_in, s_out = 1 + rng.standard_normal(300), rng.standard_normal(200)
    for t in (-1.0, 0.5, 1.7, 2.5, 10.0):
        tp, fp = int((s_in >= t).sum()), int((s_out >= t).sum())
        want = epsilon_lower_bound(tp, 300 - tp, fp, 200 - fp)
        assert _bounds_at(s_in, s_out, np.array([t]), 1e-5, 0.05)[0] == pytest.approx(want, abs=1e-9)
