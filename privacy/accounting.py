"""Privacy accounting: a thin layer over Opacus's accountants, never an accountant of our own.

Every Gaussian release of this package is described by a :class:`Spend` ``(sigma, q, steps)``:
``steps`` draws of a Poisson-subsampled Gaussian mechanism with noise multiplier ``sigma`` and
sampling rate ``q`` (``q = 1`` for a release over all the data). A :class:`PrivacyLedger` holds
one client's spends over a whole run (adaptive composition = one Opacus accountant over all the
steps of all rounds), answers "would this round exceed the budget?" before any data is touched,
and persists as plain JSON-able data so a client can carry it from round to round.

>>> ledger = PrivacyLedger(accountant="rdp", delta=1e-5, budget=4.0)
>>> round_spend = [Spend(sigma=1.52, sample_rate=0.04, steps=200)]
>>> round(ledger.charge(round_spend), 2)
2.0
>>> PrivacyLedger.from_state_dict(ledger.state_dict()).epsilon() == ledger.epsilon()
True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Sequence

import numpy as np
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")  # Opacus's GaussianAccountant can underestimate: not offered


@dataclass(frozen=True)
class Spend:
    """``steps`` draws of the subsampled Gaussian mechanism at noise ``sigma`` and rate ``sample_rate``."""

    sigma: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma must be finite and > 0, got {self.sigma}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")

    def to_list(self) -> list[float]:
        return [float(self.sigma), float(self.sample_rate), int(self.steps)]


class BudgetExceeded(ValueError):
    """A release would take a client's total epsilon past its budget; nothing was spent."""


def _check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; known: {list(ACCOUNTANTS)}")
    return name


def _check_delta(delta: float) -> float:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return float(delta)


def _accountant(name: str, spends: Iterable[Spend]) -> IAccountant:
    acc = create_accountant(mechanism=_check_accountant(name))
    history: list[tuple[float, float, int]] = []
    for s in spends:  # merge runs of equal (sigma, q), as Opacus's own ``step`` does
        if s.steps == 0:
            continue
        if history and history[-1][:2] == (s.sigma, s.sample_rate):
            history[-1] = (s.sigma, s.sample_rate, history[-1][2] + s.steps)
        else:
            history.append((s.sigma, s.sample_rate, s.steps))
    acc.history = history
    return acc


def epsilon_of(spends: Sequence[Spend], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of composing ``spends`` at ``delta``, exactly as the named Opacus accountant says.

    >>> round(epsilon_of([Spend(1.0, 0.01, 1000)], 1e-5, "rdp"), 3)
    2.101
    """
    acc = _accountant(accountant, spends)
    if not acc.history:
        return 0.0
    # PRV evaluates log(1 - q), which numpy flags for a q = 1 release; the result is still exact.
    with np.errstate(divide="ignore"):
        return float(acc.get_epsilon(delta=_check_delta(delta)))


def calibrate_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp", fixed: Sequence[Spend] = ()) -> float:
    """The noise multiplier for ``steps`` draws at ``sample_rate`` to spend at most ``target_epsilon``.

    Opacus's ``get_noise_multiplier`` does the search. ``fixed`` are releases of the same run
    with a sigma of their own (e.g. DP-DM's noisy class counts): the target handed to Opacus is
    lowered until the whole run, ``fixed`` included, fits ``target_epsilon``.
    """
    _check_accountant(accountant)
    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return _calibrate(float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant,
                      tuple(fixed))


@lru_cache(maxsize=64)
def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
               fixed: tuple[Spend, ...]) -> float:
    """The search behind :func:`calibrate_sigma`, cached: a client plans a round, then distills it
    (which plans again), and each search can take seconds."""
    target = target_epsilon
    for _ in range(30):
        if target <= 0:
            break
        try:
            with warnings.catch_warnings(), np.errstate(divide="ignore"):
                warnings.simplefilter("ignore", UserWarning)  # RDP's "largest alpha" note
                sigma = float(get_noise_multiplier(target_epsilon=target, target_delta=delta,
                                                   sample_rate=sample_rate, steps=steps,
                                                   accountant=accountant))
        except ValueError:  # Opacus: "The privacy budget is too low."
            break
        total = epsilon_of([*fixed, Spend(sigma, sample_rate, steps)], delta, accountant)
        if total <= target_epsilon:
            return sigma
        target -= (total - target_epsilon) + 1e-3
    raise ValueError(f"cannot reach epsilon {target_epsilon} at delta {delta}: the fixed releases "
                     f"{[s.to_list() for s in fixed]} alone spend "
                     f"{epsilon_of(fixed, delta, accountant):.3f} ({accountant})")


class PrivacyLedger:
    """One client's privacy spending over a run, composed by one Opacus accountant.

    Parameters
    ----------
    accountant : "rdp" or "prv" (Opacus ``RDPAccountant`` / ``PRVAccountant``).
    delta : the delta every epsilon is reported at.
    budget : the most total epsilon the client will spend; ``None`` for no limit.
    """

    def __init__(self, accountant: str = "rdp", delta: float = 1e-5, budget: float | None = None,
                 spends: Sequence[Spend] = ()) -> None:
        self.accountant = _check_accountant(accountant)
        self.delta = _check_delta(delta)
        if budget is not None and not budget > 0:
            raise ValueError(f"budget must be > 0 or None, got {budget}")
        self.budget = None if budget is None or math.isinf(budget) else float(budget)
        self.spends: list[Spend] = list(spends)

    def epsilon(self) -> float:
        """Total epsilon spent so far (at ``self.delta``)."""
        return epsilon_of(self.spends, self.delta, self.accountant)

    def epsilon_after(self, spends: Sequence[Spend]) -> float:
        """Total epsilon if ``spends`` were added: the question to ask before a round."""
        return epsilon_of([*self.spends, *spends], self.delta, self.accountant)

    def check(self, spends: Sequence[Spend]) -> float:
        """Return the total after ``spends``, or raise :class:`BudgetExceeded` saying why."""
        after = self.epsilon_after(spends)
        if self.budget is not None and not after <= self.budget:  # a NaN total is refused too
            raise BudgetExceeded(
                f"privacy budget exceeded: this release {[s.to_list() for s in spends]} "
                f"(sigma, sample_rate, steps) would take epsilon from {self.epsilon():.4f} to "
                f"{after:.4f} > budget {self.budget:g} (delta {self.delta:g}, accountant "
                f"{self.accountant}); declined, nothing spent")
        return after

    def charge(self, spends: Sequence[Spend]) -> float:
        """Check, then record ``spends``; returns the new total.

        Charge *before* touching the data: a run that fails midway has still spent.
        """
        after = self.check(spends)
        self.spends.extend(spends)
        return after

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state (no pickle): accountant, delta, budget, spends."""
        return {"accountant": self.accountant, "delta": self.delta, "budget": self.budget,
                "spends": [s.to_list() for s in self.spends]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PrivacyLedger":
        """Rebuild a ledger from :meth:`state_dict` output, validating every field."""
        try:
            spends = [Spend(float(s), float(q), int(n)) for s, q, n in state["spends"]]
            return cls(str(state["accountant"]), float(state["delta"]),
                       None if state.get("budget") is None else float(state["budget"]), spends)
        except (KeyError, TypeError) as err:
            raise ValueError(f"bad ledger state: {err!r}") from err

    def __repr__(self) -> str:
        return (f"PrivacyLedger(accountant={self.accountant!r}, delta={self.delta:g}, "
                f"budget={self.budget}, epsilon={self.epsilon():.4f}, spends={len(self.spends)})")
