"""The server-side audit: the game breaks public-seed noise, respects secret noise, and its
statistics (ceiling, confidence, calibration apart from counting) say what they claim."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import beta

from attacks.server_audit import (Decision, PublicKnowledge, Trials, audit_noisy_sums, audit_non_dp_dm,
                                  choose_test, count, cp_lower, cp_upper, dm_auditor, dm_game,
                                  epsilon_bound, epsilon_ceiling, trials_for_ceiling)


def test_public_seed_noise_is_broken_up_to_the_ceiling():
    r = audit_noisy_sums(1.0, secret_noise=False, calibration=100, counted=700, seed=1)
    assert r.test == "seed replay" and r.tpr == 1.0 and r.fpr == 0.0
    assert r.epsilon_lb >= 4.0 > r.accountant_epsilon  # the claimed eps 1 is refuted
    assert r.ceiling >= 4.0 and r.epsilon_lb == pytest.approx(r.ceiling)  # limited by trials only


@pytest.mark.parametrize("target", [1.0, 4.0])
def test_secret_noise_stays_below_the_accountant_with_room_to_spare(target):
    r = audit_noisy_sums(target, secret_noise=True, calibration=1000, counted=2000, seed=2)
    assert r.ceiling > target, "too few trials: the audit could not have shown the claimed epsilon"
    assert r.epsilon_lb < r.accountant_epsilon == target
    assert r.exact_gaussian_epsilon is not None and r.exact_gaussian_epsilon <= target
    if target == 4.0:  # the audit has power: well above 0 (seen 0.6-1.6 over seeds)
        assert r.epsilon_lb > 0.25


def test_ceiling_never_lies_below_any_bound_of_the_same_counts():
    for pos, neg, alpha in [(7, 9, 0.05), (50, 40, 0.05), (300, 333, 0.01)]:
        tp, fp = np.meshgrid(np.arange(pos + 1), np.arange(neg + 1))
        bounds = epsilon_bound(tp.ravel(), pos, fp.ravel(), neg, alpha)
        ceiling = epsilon_ceiling(pos, neg, alpha)
        assert bounds.max() == pytest.approx(ceiling) and (bounds <= ceiling + 1e-12).all()
        assert float(epsilon_bound(pos, pos, 1, neg, alpha)) < ceiling  # one false positive costs


def test_trials_for_ceiling_is_the_fewest_that_exceed():
    for eps in (1.0, 4.0, 8.0):
        n = trials_for_ceiling(eps)
        assert epsilon_ceiling(n, n) > eps >= epsilon_ceiling(n - 1, n - 1)
    assert 3 * np.exp(8) < trials_for_ceiling(8.0) < 5 * np.exp(8)  # about ln(n / 3.7)


def _trials(in_scores, out_scores) -> Trials:
    bits = np.r_[np.ones(len(in_scores), bool), np.zeros(len(out_scores), bool)]
    return Trials(bits, {"s": np.r_[in_scores, out_scores].astype(float)})


def test_confidence_is_what_the_two_limits_together_give():
    counted = _trials(np.ones(40), np.r_[np.ones(3), np.zeros(57)])
    for alpha in (0.05, 0.1):
        r = count(counted, Decision("s", 0.5), "x", 10, alpha=alpha)
        assert r.confidence == pytest.approx(1 - alpha)
        assert r.tpr_low == pytest.approx(beta.ppf(alpha / 2, 40, 1))  # each limit at alpha / 2
        assert r.fpr_high == pytest.approx(beta.ppf(1 - alpha / 2, 4, 57))


def test_both_limits_hold_together_at_least_as_often_as_reported():
    """Coverage, simulated: the event the bound rests on (TPR >= TPR_lo and FPR <= FPR_hi)."""
    rng = np.random.default_rng(0)
    alpha, n, sims, tpr, fpr = 0.1, 60, 40_000, 0.7, 0.2
    tp, fp = rng.binomial(n, tpr, sims), rng.binomial(n, fpr, sims)
    held = (cp_lower(tp, n, alpha / 2) <= tpr) & (cp_upper(fp, n, alpha / 2) >= fpr)
    assert held.mean() >= 1 - alpha - 0.005
    one_sided_at_alpha = (cp_lower(tp, n, alpha) <= tpr) & (cp_upper(fp, n, alpha) >= fpr)
    assert one_sided_at_alpha.mean() < held.mean()  # the split matters: alpha per limit gives less


def test_threshold_is_fixed_on_calibration_and_never_refitted_on_counted_trials():
    calibration = _trials(np.full(30, 10.0), np.full(30, 0.0))  # separated at 5
    counted = _trials(np.full(200, 1.0), np.full(200, 0.0))      # separated at 0.5, all below 5
    test = choose_test(calibration)
    assert test.threshold == pytest.approx(5.0)
    r = count(counted, test, "x", 60)
    assert r.true_positives == 0 and r.epsilon_lb == 0.0  # a refit would have claimed ~4


def test_bound_refuses_a_side_without_trials():
    with pytest.raises(ValueError, match="positive and negative"):
        epsilon_bound(0, 0, 0, 10)
    with pytest.raises(ValueError, match="both coin outcomes"):
        choose_test(_trials(np.ones(5), np.array([])))


def test_non_dp_dm_replay_is_zero_when_out_and_separates():
    game = dm_game(per_class=5, iterations=1, arch_kwargs={"width": 8, "depth": 1})
    audit = dm_auditor(game)
    public = PublicKnowledge(run_seed=3, partition_id=1, round=2)
    assert audit(game.upload(False, public), public)["distance to replay"] == 0.0
    assert audit(game.upload(True, public), public)["distance to replay"] > 0.0
    r = audit_non_dp_dm(6, 14, game=game, seed=4)
    assert r.tpr == 1.0 and r.fpr == 0.0 and r.epsilon_lb == pytest.approx(r.ceiling)
    assert r.ceiling > 0
    assert r.accountant_epsilon is None
