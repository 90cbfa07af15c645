"""Settings every DP method shares, and the privacy plan fixed from them before any data is read.

A DP run's noise, sampling rate and number of queries are fixed in advance from the config
alone (never from results: choosing them from the data would need a privacy filter). That is
what lets a client ask its ledger "would this run exceed my budget?" before it starts, and what
``meta.privacy`` of the uploaded set reports afterwards.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from torch import nn

from distill.methods.base import MatchingConfig

from .accounting import ACCOUNTANTS, Spend, calibrate_sigma, epsilon_of


@dataclass(frozen=True)
class DPConfig(MatchingConfig):
    """Example-level (epsilon, delta)-DP settings, on top of the matching settings.

    ``sigma = 0`` (the default) calibrates the noise so the whole run spends ``epsilon``;
    ``sigma > 0`` uses that noise and reports the epsilon it costs. ``reuse`` synthetic
    updates share each noisy release (free: post-processing). Initialisation is noise: a
    real start would upload private images verbatim. Which classes get synthetic images comes
    from class counts released once with noise ``count_sigma`` (accounted); a class needs a
    noisy count of ``count_threshold`` (< 0: ``3 * count_sigma``).

    Noise and Poisson sampling come from a secret generator (:mod:`privacy.randomness`), so
    ``seed`` reproduces only what does not touch the data. ``insecure_reproducible_noise``
    seeds them from ``seed`` too: for tests only, since whoever knows the seed can then
    subtract the noise (the ClientApp refuses it). ``released_counts`` are class counts a
    node released with noise before (its ledger keeps them): reusing them is free, so the
    run then makes no count release of its own.
    """

    init: str = "noise"
    epsilon: float = 8.0
    delta: float = 1e-5
    sigma: float = 0.0
    clip: float = 1.0
    sample_rate: float = 0.04
    accountant: str = "rdp"
    reuse: int = 1
    count_sigma: float = 10.0
    count_threshold: float = -1.0
    insecure_reproducible_noise: bool = False
    released_counts: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "noise":
            raise ValueError(f"{self.method}: init must be 'noise' under DP, got {self.init!r} "
                             "(starting from private images would release them verbatim)")
        if self.time_limit_s is not None:
            raise ValueError(f"{self.method}: time_limit_s is not allowed under DP (the spend is fixed "
                             "from the config in advance; set iterations instead)")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; known: {list(ACCOUNTANTS)}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.sigma < 0 or not math.isfinite(self.sigma):
            raise ValueError(f"sigma must be finite and >= 0, got {self.sigma}")
        if self.sigma == 0 and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon must be finite and > 0 when sigma is 0, got {self.epsilon} "
                             "(for no privacy use the non-private method)")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"clip must be finite and > 0, got {self.clip}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.reuse < 1:
            raise ValueError(f"reuse must be >= 1, got {self.reuse}")
        if not (self.count_sigma > 0 and math.isfinite(self.count_sigma)):
            raise ValueError(f"count_sigma must be finite and > 0, got {self.count_sigma}")
        if self.arch_kwargs.get("norm") == "batchnorm":
            raise ValueError(f"{self.method}: BatchNorm couples the examples of a batch, so one example's "
                             "clipped contribution no longer bounds the release; use instancenorm or groupnorm")
        if self.released_counts is not None:
            object.__setattr__(self, "released_counts", tuple(float(c) for c in self.released_counts))
            if not all(math.isfinite(c) for c in self.released_counts):
                raise ValueError(f"released_counts must be finite, got {self.released_counts}")

    @property
    def min_count(self) -> float:
        """Noisy count a class needs to get synthetic images (absent classes pass with p < 0.2%)."""
        return 3 * self.count_sigma if self.count_threshold < 0 else self.count_threshold

    @property
    def queries(self) -> int:
        """Noisy releases over subsampled data (accountant steps) the run makes."""
        return self.iterations

    def fixed_spends(self) -> tuple[Spend, ...]:
        """Releases with a noise level of their own: the class counts, over all the data, once
        (nothing when counts released before are reused)."""
        return () if self.released_counts is not None else (Spend(self.count_sigma, 1.0, 1),)


def refuse_coupling_layers(net: nn.Module, method: str) -> nn.Module:
    """``net``, or ``ValueError`` if a layer mixes the examples of a batch.

    The accountant assumes each example moves a release by at most ``clip``; BatchNorm
    normalises every example with statistics of the whole batch, so one example would move
    every other example's embedding or gradient too.
    """
    coupled = [name or type(net).__name__ for name, m in net.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if coupled:
        raise ValueError(f"{method}: BatchNorm layers {coupled[:5]} couple the examples of a batch and break the "
                         "per-example sensitivity the accountant assumes; use instance or group norm")
    return net


@dataclass(frozen=True)
class PrivacyPlan:
    """The noise and spending of one DP run, known before it starts."""

    sigma: float
    spends: tuple[Spend, ...]
    epsilon: float
    delta: float
    accountant: str
    sample_rate: float
    steps: int
    clip: float
    rho: float
    mode: str  # "target-epsilon" (sigma calibrated) or "sigma" (epsilon reported)

    def meta(self, **extra: float | str) -> dict[str, float | str]:
        """Flat scalars for ``SetMetadata.privacy`` and the reply's metrics."""
        return {"epsilon": self.epsilon, "delta": self.delta, "sigma": self.sigma,
                "sample_rate": self.sample_rate, "steps": self.steps, "accountant": self.accountant,
                "clip": self.clip, "rho": self.rho, "mode": self.mode,
                "spends": json.dumps([s.to_list() for s in self.spends]), **extra}


def privacy_plan(config: DPConfig) -> PrivacyPlan:
    """Calibrate (or take) sigma and compute the run's epsilon with the configured accountant."""
    fixed = config.fixed_spends()
    steps = config.queries
    if config.sigma > 0:
        sigma, mode = config.sigma, "sigma"
    elif steps > 0:
        sigma = calibrate_sigma(config.epsilon, config.delta, config.sample_rate, steps,
                                config.accountant, fixed)
        mode = "target-epsilon"
    else:
        sigma, mode = 0.0, "target-epsilon"  # no subsampled query: only the fixed releases spend
    spends = (*fixed, Spend(sigma, config.sample_rate, steps)) if steps > 0 else fixed
    return PrivacyPlan(sigma=sigma, spends=tuple(spends),
                       epsilon=epsilon_of(spends, config.delta, config.accountant),
                       delta=config.delta, accountant=config.accountant,
                       sample_rate=config.sample_rate, steps=steps, clip=config.clip,
                       rho=config.rho, mode=mode)


def spends_from_meta(privacy: dict[str, float | str]) -> list[Spend]:
    """The spends recorded in a set's ``meta.privacy`` (to charge a ledger after the fact)."""
    return [Spend(float(s), float(q), int(n)) for s, q, n in json.loads(str(privacy["spends"]))]
