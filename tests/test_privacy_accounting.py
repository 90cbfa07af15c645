"""Accounting: every epsilon equals Opacus's, composition over rounds, budget refusal, calibration."""

import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from privacy.accounting import BudgetExceeded, PrivacyLedger, Spend, calibrate_sigma, epsilon_of

# Golden values pinned from opacus 1.6.0 (delta 1e-5): (accountant, spends, epsilon).
GOLDEN = [
    ("rdp", [(1.0, 0.01, 1000)], 2.1013652716430564),
    ("rdp", [(4.22, 0.032, 1000)], 0.9984841109098969),
    ("rdp", [(0.95, 0.032, 1000)], 8.034046158756395),
    ("rdp", [(10.0, 1.0, 1), (1.5, 0.04, 500)], 3.267492224264153),
    ("prv", [(1.0, 0.01, 1000)], 1.838371637017295),
    ("prv", [(4.22, 0.032, 1000)], 0.9211578943944487),
    ("prv", [(0.95, 0.032, 1000)], 7.312495628170944),
    ("prv", [(10.0, 1.0, 1), (1.5, 0.04, 500)], 2.988818238684503),
]
OPACUS = {"rdp": RDPAccountant, "prv": PRVAccountant}


@pytest.mark.parametrize("accountant, spends, golden", GOLDEN)
def test_epsilon_is_opacus_epsilon(accountant, spends, golden):
    ours = epsilon_of([Spend(*s) for s in spends], 1e-5, accountant)
    acc = OPACUS[accountant]()
    for sigma, q, steps in spends:  # stepped one by one, as DPOptimizer's hook does
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert ours == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert ours == pytest.approx(golden, rel=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_rounds_persisted_as_json_compose_like_one_accountant(accountant):
    rounds = [[Spend(1.52, 0.04, 200)], [Spend(3.05, 0.04, 200)], [Spend(10.0, 1.0, 1), Spend(1.52, 0.08, 100)]]
    state = PrivacyLedger(accountant, 1e-5).state_dict()
    totals = []
    for spends in rounds:  # each round: restore from JSON text, charge, persist
        ledger = PrivacyLedger.from_state_dict(json.loads(json.dumps(state)))
        totals.append(ledger.charge(spends))
        state = ledger.state_dict()
    everything = [s for r in rounds for s in r]
    assert totals[-1] == epsilon_of(everything, 1e-5, accountant)
    assert totals == sorted(totals) and totals[0] == epsilon_of(rounds[0], 1e-5, accountant)


def test_re_distilling_every_round_spends_again():
    """The notes' client: (sigma 1.523, q 0.04, 200 steps) per round, eps 2.00 -> 9.99 after 20."""
    ledger = PrivacyLedger("rdp", 1e-5)
    got = [ledger.charge([Spend(1.523, 0.04, 200)]) for _ in range(20)]
    assert got[0] == pytest.approx(2.00, abs=0.01) and got[-1] == pytest.approx(9.99, abs=0.01)


def test_budget_refusal_exactly_when_exceeded():
    spend = [Spend(1.523, 0.04, 200)]
    two_rounds = epsilon_of(spend * 2, 1e-5, "rdp")
    ledger = PrivacyLedger("rdp", 1e-5, budget=two_rounds)
    ledger.charge(spend)
    assert ledger.charge(spend) == two_rounds  # exactly at the budget: allowed
    before = ledger.state_dict()
    with pytest.raises(BudgetExceeded, match=r"budget .*declined, nothing spent") as err:
        ledger.charge(spend)
    assert "rdp" in str(err.value) and f"{two_rounds:.4f}" in str(err.value)
    assert ledger.state_dict() == before  # a refusal spends nothing
    tight = PrivacyLedger("rdp", 1e-5, budget=math.nextafter(two_rounds, 0.0), spends=spend)
    with pytest.raises(BudgetExceeded):
        tight.check(spend)


@pytest.mark.parametrize("accountant, target", [("rdp", 1.0), ("rdp", 2.0), ("rdp", 8.0), ("prv", 2.0)])
def test_calibration_hits_target_from_below_and_reverses(accountant, target):
    sigma = calibrate_sigma(target, 1e-5, 0.032, 1000, accountant)
    eps = epsilon_of([Spend(sigma, 0.032, 1000)], 1e-5, accountant)
    assert target - 0.05 < eps <= target
    fixed = (Spend(10.0, 1.0, 1),)
    sigma2 = calibrate_sigma(target, 1e-5, 0.032, 1000, accountant, fixed)
    assert sigma2 > sigma and epsilon_of([*fixed, Spend(sigma2, 0.032, 1000)], 1e-5, accountant) <= target


def test_calibration_matches_notes():
    assert [round(calibrate_sigma(e, 1e-5, 0.032, 1000, "rdp"), 2) for e in (1, 2, 8)] == [4.22, 2.34, 0.95]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="known: .*rdp"):
        PrivacyLedger("gdp")
    with pytest.raises(ValueError, match="sample_rate"):
        Spend(1.0, 0.0, 1)
    with pytest.raises(ValueError, match="fixed releases"):
        calibrate_sigma(0.5, 1e-5, 0.01, 100, "rdp", fixed=(Spend(1.0, 1.0, 1),))
    with pytest.raises(ValueError, match="bad ledger state"):
        PrivacyLedger.from_state_dict({"accountant": "rdp"})
