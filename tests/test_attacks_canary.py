"""DP audit with canaries: published one-run figures, and the lower bound never above a true epsilon.

An exact Gaussian mechanism (its epsilon known in closed form) and a real DP-DM pipeline must
both stay below the accountant; a leaky non-private pipeline and a lying accountant must be
caught, so the check can fail. Every bound has a ceiling it can never pass, and the quoted
bound holds at the confidence the row states.
"""

import math

import numpy as np
import pytest
from scipy.stats import norm

from attacks.canary import (CanaryAudit, canary_audit, clopper_pearson_ceiling, gaussian_audit, gaussian_epsilon,
                            make_canaries, one_run_ceiling, one_run_epsilon_lower_bound, one_run_guesses)
from attacks.metrics import epsilon_lower_bound, epsilon_lower_bound_from_scores
from attacks.pipelines import TrainOnReal, make_pipeline
from distill.train import TrainConfig

LEAKY = TrainConfig(arch="mlp", arch_kwargs={"width": 64}, epochs=60, lr=0.05, batch_size=50, dsa=False)


def test_one_run_bound_matches_steinke_et_al_examples():
    # ATTACK_NOTES (Steinke, Nasr & Jagielski 2023): m = 1000, r = 100, delta 1e-5, 95 %.
    assert one_run_epsilon_lower_bound(1000, 100, 90, 1e-5) == pytest.approx(1.63, abs=0.01)
    assert one_run_epsilon_lower_bound(1000, 100, 100, 1e-5) == pytest.approx(3.47, abs=0.01)
    assert one_run_epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # coin flipping proves nothing


def test_gaussian_epsilon_solves_balle_wang():
    for sigma in (0.5, 1.0, 2.0):
        eps = gaussian_epsilon(sigma, 1e-5)
        d = norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma)
        assert d == pytest.approx(1e-5, rel=1e-6)
    assert gaussian_epsilon(1.0, 1e-5) > gaussian_epsilon(2.0, 1e-5)


def test_guesses_count_top_in_and_bottom_out():
    scores = np.arange(10.0)
    included = scores >= 5
    assert one_run_guesses(scores, included, 0.4) == (4, 4)
    assert one_run_guesses(scores, ~included, 0.4) == (4, 0)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0])
@pytest.mark.parametrize("seed", range(4))
def test_gaussian_mechanism_audit_never_exceeds_its_true_epsilon(sigma, seed):
    a = gaussian_audit(5000, sigma, seed)
    assert a.cp_independent
    assert a.epsilon_lb_one_run <= a.claimed_epsilon and a.epsilon_lb_cp <= a.claimed_epsilon
    assert a.epsilon_lb <= a.claimed_epsilon


def test_gaussian_audit_has_power_and_catches_a_lying_accountant():
    # sigma = 1: true eps 4.38; the one-run bound sat at 1.68-1.87 over seeds 0-2, so a claim of
    # 1.0 must be refuted, and the bound must show real power (> 1).
    for seed in range(3):
        honest = gaussian_audit(5000, 1.0, seed)
        assert 1.0 < honest.epsilon_lb <= honest.claimed_epsilon
        liar = gaussian_audit(5000, 1.0, seed, claimed_epsilon=1.0)
        assert liar.epsilon_lb > liar.claimed_epsilon


def test_leaky_pipeline_gives_a_clearly_positive_bound(mnist):
    client, source = mnist.train.subset(np.arange(100)), mnist.train.subset(np.arange(100, 1100))
    canaries = make_canaries("mislabel", source, 100, seed=0)
    a = canary_audit(TrainOnReal(LEAKY), client, canaries, seed=0)
    assert a.claimed_epsilon is None and a.to_row()["claimed_epsilon"] == "none"
    # An overfit MLP memorises its mislabelled canaries: 20/20 guesses were right (bound 1.82).
    assert a.epsilon_lb_one_run > 1.0, a.to_row()


def test_dp_dm_canary_audit_stays_below_the_accountant(mnist):
    from distill.methods import make_config

    train = TrainConfig(arch="mlp", arch_kwargs={"width": 32}, epochs=30, lr=0.05, batch_size=50, dsa=False)
    method = make_config("dp-dm", ipc=1, iterations=10, sigma=2.0, sample_rate=0.2, count_sigma=8.0,
                         arch_kwargs={"width": 8, "depth": 1})
    pipe = make_pipeline("distill", train, method)
    client, source = mnist.train.subset(np.arange(500)), mnist.train.subset(np.arange(500, 1500))
    canaries = make_canaries("mislabel", source, 100, seed=0)
    for score in ("loss", "distance"):
        a = canary_audit(pipe, client, canaries, score=score, seed=0)
        assert a.claimed_epsilon is not None and math.isfinite(a.claimed_epsilon)
        assert a.delta == 1e-5
        assert a.epsilon_lb_one_run <= a.claimed_epsilon and a.epsilon_lb_cp <= a.claimed_epsilon, a.to_row()


def test_one_canary_per_run_makes_clopper_pearson_valid(mnist):
    client, source = mnist.train.subset(np.arange(50)), mnist.train.subset(np.arange(50, 100))
    canaries = make_canaries("ood", source, 8, seed=1)
    quick = TrainConfig(arch="mlp", arch_kwargs={"width": 16}, epochs=2, lr=0.05, batch_size=50, dsa=False)
    a = canary_audit(TrainOnReal(quick), client, canaries, kind="ood", runs=8, seed=0)
    assert a.cp_independent and a.runs == 8 and a.scores.shape == (8,)
    with pytest.raises(ValueError):
        canary_audit(TrainOnReal(quick), client, canaries, runs=9)


def audit_of(scores, included, independent: bool, alpha: float = 0.05) -> CanaryAudit:
    """A canary audit of given scores: one run, or independent trials (as one canary per run)."""
    return CanaryAudit("t", "simulated", "release", np.asarray(scores, dtype=float), np.asarray(included), 1, 4.0,
                       1e-5, alpha, 0.2, {"independent_trials": True} if independent else {})


def test_ceiling_of_200_canaries_and_40_guesses_is_2_55():
    # The DP-DM audit: 200 canaries, 40 guesses, delta 1e-5, 95 %: nothing above 2.548 is provable.
    assert one_run_ceiling(200, 40, 1e-5, 0.05) == pytest.approx(2.5482, abs=1e-4)
    included = np.random.default_rng(0).random(200) < 0.5
    perfect = audit_of(included + 0.01 * np.arange(200) / 200, included, independent=False)
    row = perfect.to_row()
    assert row["guesses"] == row["correct"] == 40  # every guess right reaches the ceiling exactly
    assert row["empirical_epsilon_lb"] == row["ceiling"] == row["ceiling_one_run"] == pytest.approx(2.5482, abs=1e-4)
    assert row["ceiling"] < row["claimed_epsilon"]  # so "0.00 against epsilon 4" could never have said more


@pytest.mark.parametrize("independent", [False, True])
def test_bounds_never_exceed_their_ceilings(independent):
    assert all(one_run_epsilon_lower_bound(200, 40, v, 1e-5) <= one_run_ceiling(200, 40, 1e-5) for v in range(41))
    rng = np.random.default_rng(1)
    for signal in (0.0, 1.0, 3.0, 50.0) * 2:  # the last draw (signal 50) separates perfectly
        included = rng.random(200) < 0.5
        a = audit_of(signal * included + rng.standard_normal(200), included, independent)
        row = a.to_row()
        assert row["epsilon_lb_one_run"] <= row["ceiling_one_run"]
        assert row["epsilon_lb_clopper_pearson"] <= row["ceiling_clopper_pearson"]
        assert row["empirical_epsilon_lb"] <= row["ceiling"]
    # perfect separation on the counted half reaches the Clopper-Pearson ceiling
    n_in = int(included.sum())
    assert a.epsilon_lb_cp == pytest.approx(clopper_pearson_ceiling(n_in, 200 - n_in, 1e-5), abs=1e-9)
    assert clopper_pearson_ceiling(n_in, 200 - n_in, 1e-5) == epsilon_lower_bound(n_in // 2, 0, 0, (200 - n_in) // 2)


def test_quoted_bound_is_combined_at_the_stated_confidence():
    a = gaussian_audit(2000, 1.0, seed=0)  # independent trials: both bounds are combined
    row, r, v = a.to_row(), *a.guesses
    s, m = a.scores, a.included
    half = [one_run_epsilon_lower_bound(2000, r, v, a.delta, 0.025),
            epsilon_lower_bound_from_scores(s[m], s[~m], delta=a.delta, alpha=0.025)]
    assert row["confidence"] == row["confidence_one_run"] == row["confidence_clopper_pearson"] == 0.95
    assert row["empirical_epsilon_lb"] == max(half)  # each at alpha / 2: the max holds at 1 - alpha
    assert row["empirical_epsilon_lb"] < max(row["epsilon_lb_one_run"], row["epsilon_lb_clopper_pearson"])
    assert row["ceiling"] == max(one_run_ceiling(2000, r, a.delta, 0.025),
                                 clopper_pearson_ceiling(int(m.sum()), int((~m).sum()), a.delta, 0.025))
    assert "alpha/2" in row["quoted"]
    single = audit_of(s, m, independent=False)  # one run: the one-run bound alone, at alpha
    one = single.to_row()
    assert one["empirical_epsilon_lb"] == single.epsilon_lb_one_run and one["confidence"] == 0.95
