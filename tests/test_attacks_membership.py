"""Membership attacks beat chance on a leaky target and sit at chance on one that never saw the members."""

import numpy as np
import pytest
import torch

from attacks.experiment import run_membership
from attacks.membership import AttackResult, audit_pool, distance_attack, split_pool
from attacks.pipelines import TrainOnReal
from attacks.rmia import probabilities, rmia_scores
from attacks.signals import scaled_logit
from distill.synthetic import SetMetadata, SyntheticSet
from distill.train import TrainConfig

# An MLP overfit on 100 images: leaks, and trains in a fraction of a second.
LEAKY = TrainConfig(arch="mlp", arch_kwargs={"width": 64}, epochs=60, lr=0.05, batch_size=50, dsa=False)


@pytest.fixture(scope="module")
def pool(mnist):
    return audit_pool(mnist.train, 200, seed=0)


@pytest.fixture(scope="module")
def leaky(pool, mnist):
    return run_membership(TrainOnReal(LEAKY), pool, mnist.test, n_shadows=8, seed=0)


def test_scaled_logit_is_stable_and_matches_the_softmax_form():
    z = torch.tensor([[2.0, 0.5, -1.0], [300.0, -300.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    phi = scaled_logit(z, y)
    p = torch.softmax(z[0], 0)
    assert phi[0].item() == pytest.approx(float(torch.log(p[0]) - torch.log(p[1] + p[2])))
    assert phi[1].item() == pytest.approx(300.0) and torch.isfinite(phi).all()


def test_split_pool_is_balanced_and_seeded():
    m = split_pool(101, 3)
    assert m.sum() == 50 and np.array_equal(m, split_pool(101, 3)) and not np.array_equal(m, split_pool(101, 4))


def test_attacks_beat_chance_on_a_leaky_target(leaky):
    r = leaky.by_attack()
    assert set(r) == {"loss", "confidence", "lira-online", "lira-offline", "rmia-online", "rmia-offline"}
    for name in r:
        assert r[name].metrics.auc > 0.7, (name, r[name].metrics)
    assert r["lira-online"].metrics.members == r["lira-online"].metrics.non_members == 100


def test_attacks_sit_at_chance_on_a_target_that_never_saw_the_members(mnist):
    # 200 vs 200: the AUC's null std is ~0.029, so 0.12 is a 4-sigma band.
    big_pool = audit_pool(mnist.train, 400, seed=2)
    other = audit_pool(mnist.test, 100, seed=1)  # disjoint from the pool (test split)
    rep = run_membership(TrainOnReal(LEAKY), big_pool, mnist.test, n_shadows=4, seed=0, target_data=other)
    for name, res in rep.by_attack().items():
        assert abs(res.metrics.auc - 0.5) < 0.12, (name, res.metrics)


def test_same_seed_same_scores(pool, mnist, leaky):
    again = run_membership(TrainOnReal(LEAKY), pool, mnist.test, n_shadows=8, seed=0)
    for a, b in zip(leaky.results, again.results):
        np.testing.assert_array_equal(a.scores_in, b.scores_in)


def test_distance_attack_finds_copied_members(small_train):
    members, non = small_train.subset(np.arange(0, 300)), small_train.subset(np.arange(300, 600))
    meta = SetMetadata(dataset=small_train.info, method="copy", ipc=3)
    copied = members.subset(np.arange(0, 300, 10))  # 30 members copied verbatim, as real init does
    syn = SyntheticSet(copied.images.clone(), copied.labels.clone(), meta)
    res = distance_attack(syn, members, non, "copy")
    assert isinstance(res, AttackResult)
    assert res.metrics.tpr_at_0_fpr >= 0.1  # the 30 copies sit at distance 0: found with no false positive


def test_rmia_beats_chance_with_two_references(pool, mnist, leaky):
    # RMIA needs no per-example variance: two references already give a working attack
    # (AUC 0.78 with 8 references here; chance band for 100 vs 100 is about +-0.12).
    r = leaky.by_attack()
    assert r["rmia-online"].extra["population"] == 200 and r["rmia-offline"].extra["a"] in np.round(np.linspace(0, 1, 11), 2)
    two = run_membership(TrainOnReal(LEAKY), pool, mnist.test, n_shadows=2, seed=0)
    for name in ("rmia-online", "rmia-offline"):
        assert two.by_attack()[name].metrics.auc > 0.65, (name, two.by_attack()[name].metrics)


def test_rmia_scores_are_the_fraction_of_population_beaten():
    # Target doubles x0's probability, halves x1's; references agree on 0.4 everywhere; z unchanged.
    tx, rx = np.array([0.8, 0.2]), np.full((2, 2), 0.4)
    tz, rz = np.array([0.4, 0.4, 0.4, 0.6]), np.full((2, 4), 0.4)
    s = rmia_scores(tx, rx, np.zeros((2, 2), bool), tz, rz, online=True)
    # within the tie-break term, which stays below 1 / (10 Z)
    assert s[0] == pytest.approx(1.0, abs=0.025) and s[1] == pytest.approx(0.0, abs=0.025)
    assert probabilities(np.zeros((3, 5))) == pytest.approx(np.full(3, 0.5))
