"""ROC/AUC against a brute-force pairwise count, TPR@FPR on a built example, held-out TPR@1%FPR and
its verdict under no signal, epsilon lower bounds."""

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from attacks.audit import VERDICT_ALPHA, low_fpr_verdict
from attacks.metrics import (auc, balanced_accuracy, calibration_size, clopper_pearson, epsilon_lower_bound,
                             epsilon_lower_bound_from_scores, heldout_tpr_at_fpr, roc_curve, summarize,
                             tpr_at_fpr)


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
    # Held out, half of 100 non-members cannot set a 1% threshold: reported as unresolvable (0).
    m = summarize(s_in, s_out)
    assert m.tpr_at_1pct_fpr == 0.0 and m.calibration_non_members == 0 and m.tpr_at_1pct_p_value == 1.0
    assert m.tpr_at_0_fpr == 0.30 and m.members == 100 and m.non_members == 100


def test_calibration_size_makes_the_expected_fpr_exact():
    assert calibration_size(500, 0.01) == 199 and calibration_size(1000, 0.01) == 499  # k = 2 and 5
    assert calibration_size(700, 0.01) == 299
    assert calibration_size(197, 0.01) == 0 and calibration_size(198, 0.01) == 99
    assert calibration_size(1998, 0.001) == 999 and calibration_size(1996, 0.001) == 0
    with pytest.raises(ValueError):
        calibration_size(500, 0.0)


def test_heldout_threshold_ignores_the_non_members_it_counts():
    rng = np.random.default_rng(3)
    s_in, s_out = rng.standard_normal(400), rng.standard_normal(600)
    h = heldout_tpr_at_fpr(s_in, s_out, 0.01, seed=5)
    assert h.calibration_non_members == 299 and h.evaluation_non_members == 301 and h.members == 400
    evaluation = np.random.default_rng(5).permutation(600)[299:]  # the split the function draws
    raised = s_out.copy()
    raised[evaluation] += 100.0  # every held-out non-member now passes any threshold
    h2 = heldout_tpr_at_fpr(s_in, raised, 0.01, seed=5)
    assert h2.threshold == h.threshold and h2.tp == h.tp
    assert h2.fp == 301 and h2.fpr == 1.0 and h2.p_value == pytest.approx(1.0)


def test_heldout_threshold_with_tied_calibration_scores_keeps_at_most_k_above():
    s_out = np.r_[np.zeros(490), np.full(10, 5.0)]  # calibration 199 of them; k = 2 but ties at 5
    h = heldout_tpr_at_fpr(np.full(50, 5.0), s_out, 0.01, seed=0)
    assert h.threshold > 5.0 and h.tp == 0  # the top tie alone holds more than k, so none pass


def test_no_signal_heldout_tpr_averages_the_nominal_fpr_and_the_verdict_keeps_its_level():
    """Members and non-members i.i.d.: the in-sample estimate and its binomial verdict called 8.6 %
    of single attacks and 19.7 % of best-of-six "leaks" (mean TPR 0.0105); the held-out ones must not."""
    rng = np.random.default_rng(2024)
    trials, attacks = 1000, 6
    tprs, alarms_one, alarms_six = [], 0, 0
    for t in range(trials):
        n = int(rng.integers(500, 1001))
        rows = []
        for a in range(attacks):
            s = rng.standard_normal(2 * n)
            h = heldout_tpr_at_fpr(s[:n], s[n:], 0.01, seed=t)
            tprs.append(h.tpr)
            rows.append({"attack": f"a{a}", "non_members": n, "tpr_at_1pct_p_value": h.p_value})
        alarms_one += low_fpr_verdict(rows[:1]).startswith("leaks")
        alarms_six += low_fpr_verdict(rows).startswith("leaks")
    # (a) unbiased: E[TPR] = k / (n_cal + 1) = 0.01 exactly; 6000 draws give a standard error ~1e-4.
    assert np.mean(tprs) == pytest.approx(0.01, abs=4e-4)
    # (b) the nominal family-wise level is 5 %; the binomial error of 1000 trials is ~0.7 points.
    assert VERDICT_ALPHA == 0.05
    assert alarms_one / trials <= VERDICT_ALPHA and alarms_six / trials <= VERDICT_ALPHA


def test_a_real_signal_is_still_detected_after_the_correction():
    rng = np.random.default_rng(7)
    for seed in range(3):
        s_in, s_out = 1.5 + rng.standard_normal(800), rng.standard_normal(800)  # true TPR@1%FPR 0.20
        m = summarize(s_in, s_out, seed=seed)
        assert 0.05 < m.tpr_at_1pct_fpr < 0.4 and m.tpr_at_1pct_ci[0] > 0.03  # 399 points set the threshold
        rows = [m.to_dict() | {"attack": "strong"}] + [{"attack": f"null{i}", "non_members": 800,
                                                        "tpr_at_1pct_p_value": 0.5} for i in range(5)]
        assert low_fpr_verdict(rows).startswith("leaks at low FPR (strong")


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
