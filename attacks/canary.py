"""DP auditing with canaries: an empirical epsilon lower bound to set beside the accountant's.

Protocol: ``m`` canaries (mislabelled real images, the worst case of Zhao & Zhang, ICLR 2025,
or out-of-distribution noise images) are each added to a client's data independently with
probability 1/2; the DP pipeline runs; every canary is scored (minus the trained model's loss
on it, or minus its distance to the synthetic set), higher meaning "was included". Two bounds:

- **one-run** (Steinke, Nasr & Jagielski, NeurIPS 2023, "Privacy Auditing with One (1) Training
  Run"): guess IN for the top ``k+`` scores and OUT for the bottom ``k-`` (a fraction fixed in
  advance), count ``v`` correct of ``r`` guesses; under (eps, delta)-DP the count is dominated by
  Binomial(r, e^eps / (1 + e^eps)) plus a delta term, so any eps with a p-value below ``alpha``
  is refuted. Valid with all canaries in one run, so it is the headline figure.
- **Clopper-Pearson** (Jagielski, Ullman & Oprea 2020; Nasr et al. 2021) through
  :func:`attacks.metrics.epsilon_lower_bound_from_scores` (threshold picked on one half of the
  canaries, counted on the other). Its intervals assume independent trials, which holds when
  each run carries one canary (``runs == canaries``) or for independent simulated mechanisms;
  with many canaries per run it is reported but flagged ``cp_independent = False``.

Each bound alone is a statement at confidence ``1 - alpha``. The quoted bound is the one-run
bound alone, or, when the Clopper-Pearson trials are independent, the larger of the two with
each computed at ``alpha / 2`` (Bonferroni), so that it too holds at ``1 - alpha`` (the maximum
of two ``1 - alpha`` bounds would only hold at ``1 - 2 alpha``). Every bound comes with its
*ceiling*, the largest value the audit could output with its canaries and guesses (every guess
right, perfect separation): a bound of 0 says nothing about an accountant's epsilon above the
ceiling. Tests check the bounds on a real DP pipeline and on an exact Gaussian mechanism, and
that a leaky pipeline gives a clearly positive bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.stats import binom, norm

from distill.data import LabeledImages

from .membership import nearest_synthetic_distance
from .metrics import epsilon_lower_bound, epsilon_lower_bound_from_scores
from .pipelines import Pipeline
from .signals import cross_entropy, logits

CANARY_KINDS = ("mislabel", "ood")
SCORES = ("loss", "distance")


# --- canaries ---------------------------------------------------------------------------------

def mislabelled_canaries(source: LabeledImages, count: int, seed: int) -> LabeledImages:
    """``count`` real images from ``source``, each relabelled to a different class chosen at random."""
    if not 1 <= count <= len(source):
        raise ValueError(f"need 1 <= count <= {len(source)}, got {count}")
    rng = np.random.default_rng(seed)
    picked = source.subset(np.sort(rng.permutation(len(source))[:count]))
    k = source.info.num_classes
    shift = torch.as_tensor(rng.integers(1, k, size=count), dtype=torch.long)
    return LabeledImages(picked.images.clone(), (picked.labels + shift) % k, picked.info)


def ood_canaries(info, count: int, seed: int) -> LabeledImages:
    """``count`` uniform-noise images (pixels in [0, 1], normalised like the data) with random labels."""
    gen = torch.Generator().manual_seed(seed)
    px = torch.rand(count, *info.image_shape, generator=gen)
    mean, std = torch.tensor(info.mean).view(1, -1, 1, 1), torch.tensor(info.std).view(1, -1, 1, 1)
    labels = torch.randint(0, info.num_classes, (count,), generator=gen)
    return LabeledImages(((px - mean) / std).float(), labels, info)


def make_canaries(kind: str, source: LabeledImages, count: int, seed: int) -> LabeledImages:
    if kind == "mislabel":
        return mislabelled_canaries(source, count, seed)
    if kind == "ood":
        return ood_canaries(source.info, count, seed)
    raise ValueError(f"unknown canary kind {kind!r}; known: {list(CANARY_KINDS)}")


def inclusion_mask(count: int, seed: int) -> np.ndarray:
    """Each canary in with probability 1/2, independently (not a balanced split: the one-run
    analysis needs independent inclusions)."""
    return np.random.default_rng(seed).random(count) < 0.5


def concat(a: LabeledImages, b: LabeledImages) -> LabeledImages:
    return LabeledImages(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), a.info)


# --- bounds -----------------------------------------------------------------------------------

def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= v of r guesses correct] if the mechanism were (eps, delta)-DP (Steinke et al. 2023, Thm 5.2).

    The pure part is the Binomial tail at ``q = e^eps / (1 + e^eps)``; the delta part is
    ``2 m delta * max_i P[v - i <= Binom(r, q) < v] / i``, their bound on what the delta
    events can add.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v} r={r} m={m}")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    worst = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * worst, 1.0)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float, alpha: float = 0.05) -> float:
    """The largest eps that ``v`` correct of ``r`` guesses refute at level ``alpha`` (0 if none)."""
    if r == 0 or one_run_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    hi = 1.0
    while one_run_p_value(m, r, v, hi, delta) < alpha:
        hi *= 2
        if hi > 1e3:
            return math.inf
    lo = 0.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if one_run_p_value(m, r, v, mid, delta) < alpha else (lo, mid)
    return lo


def one_run_ceiling(m: int, r: int, delta: float, alpha: float = 0.05) -> float:
    """The largest one-run bound ``r`` guesses over ``m`` canaries can give: all ``r`` right
    (the bound grows with the number right). With m = 200 and r = 40: 2.55 at 95 %."""
    return one_run_epsilon_lower_bound(m, r, r, delta, alpha)


def clopper_pearson_ceiling(members: int, non_members: int, delta: float, alpha: float = 0.05) -> float:
    """The largest :func:`attacks.metrics.epsilon_lower_bound_from_scores` can give: perfect
    separation on the half it counts (``members // 2`` and ``non_members // 2`` trials)."""
    if min(members, non_members) < 4:
        return 0.0
    return epsilon_lower_bound(members // 2, 0, 0, non_members // 2, delta, alpha)


def one_run_guesses(scores: np.ndarray, included: np.ndarray, guess_fraction: float) -> tuple[int, int]:
    """``(r, v)``: IN for the top ``guess_fraction / 2`` of scores, OUT for the bottom as many."""
    k = int(len(scores) * guess_fraction / 2)
    order = np.argsort(-np.asarray(scores), kind="stable")
    top, bottom = order[:k], order[len(order) - k:] if k else order[:0]
    return 2 * k, int(included[top].sum() + (~included[bottom]).sum())


def gaussian_epsilon(sigma: float, delta: float, sensitivity: float = 1.0) -> float:
    """Exact epsilon of the Gaussian mechanism at ``delta`` (Balle & Wang, ICML 2018, Thm 8):
    ``delta(eps) = Phi(D/2s - eps s/D) - e^eps Phi(-D/2s - eps s/D)``, solved for eps."""
    s, d = sigma, sensitivity

    def gap(eps: float) -> float:
        a = norm.cdf(d / (2 * s) - eps * s / d)
        b = math.exp(eps + norm.logcdf(-d / (2 * s) - eps * s / d))
        return a - b - delta

    return 0.0 if gap(0.0) <= 0 else float(brentq(gap, 0.0, 500.0, xtol=1e-10))


def simulate_gaussian_mechanism(m: int, sigma: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, included)`` of an exact Gaussian mechanism releasing ``b_i + N(0, sigma^2)`` per
    canary: each inclusion bit has sensitivity 1 and its own independent noise, so the audit's
    trials are independent and :func:`gaussian_epsilon` is its true epsilon."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    return included + sigma * rng.standard_normal(m), included


# --- the audit --------------------------------------------------------------------------------

@dataclass
class CanaryAudit:
    """Scores of every canary (higher = "included"), the bounds, and the accountant's claim."""

    target: str
    kind: str
    score: str
    scores: np.ndarray
    included: np.ndarray
    runs: int
    claimed_epsilon: float | None
    delta: float
    alpha: float
    guess_fraction: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def guesses(self) -> tuple[int, int]:
        return one_run_guesses(self.scores, self.included, self.guess_fraction)

    @property
    def cp_independent(self) -> bool:
        return self.runs >= len(self.scores) or bool(self.extra.get("independent_trials", False))

    @property
    def alpha_each(self) -> float:
        """Level of each bound inside the quoted one: Bonferroni halves alpha when two are combined."""
        return self.alpha / 2 if self.cp_independent else self.alpha

    def _one_run(self, alpha: float) -> float:
        r, v = self.guesses
        return one_run_epsilon_lower_bound(len(self.scores), r, v, self.delta, alpha)

    def _cp(self, alpha: float) -> float:
        s, m = self.scores, self.included
        if min(m.sum(), (~m).sum()) < 4:
            return 0.0
        return epsilon_lower_bound_from_scores(s[m], s[~m], delta=self.delta, alpha=alpha)

    def _one_run_ceiling(self, alpha: float) -> float:
        return one_run_ceiling(len(self.scores), self.guesses[0], self.delta, alpha)

    def _cp_ceiling(self, alpha: float) -> float:
        n_in = int(self.included.sum())
        return clopper_pearson_ceiling(n_in, len(self.scores) - n_in, self.delta, alpha)

    @property
    def epsilon_lb_one_run(self) -> float:
        """One-run bound alone, at confidence ``1 - alpha``."""
        return self._one_run(self.alpha)

    @property
    def epsilon_lb_cp(self) -> float:
        """Clopper-Pearson bound alone, at confidence ``1 - alpha`` (valid only if ``cp_independent``)."""
        return self._cp(self.alpha)

    @property
    def epsilon_lb(self) -> float:
        """The bound to quote, at confidence ``1 - alpha``: one-run alone, or the larger of both at
        ``alpha / 2`` each when the Clopper-Pearson trials are independent."""
        if not self.cp_independent:
            return self.epsilon_lb_one_run
        return max(self._one_run(self.alpha_each), self._cp(self.alpha_each))

    @property
    def ceiling(self) -> float:
        """The largest value :attr:`epsilon_lb` could take with these canaries and guesses."""
        if not self.cp_independent:
            return self._one_run_ceiling(self.alpha)
        return max(self._one_run_ceiling(self.alpha_each), self._cp_ceiling(self.alpha_each))

    def to_row(self) -> dict[str, Any]:
        r, v = self.guesses
        quoted = ("max(one-run, Clopper-Pearson), each at alpha/2 (Bonferroni)" if self.cp_independent
                  else "one-run alone (Clopper-Pearson trials not independent)")
        return {"target": self.target, "canaries": f"{self.kind} x {len(self.scores)}",
                "included": int(self.included.sum()), "runs": self.runs, "score": self.score,
                "guesses": r, "correct": v,
                "epsilon_lb_one_run": self.epsilon_lb_one_run, "ceiling_one_run": self._one_run_ceiling(self.alpha),
                "confidence_one_run": 1 - self.alpha,
                "epsilon_lb_clopper_pearson": self.epsilon_lb_cp,
                "ceiling_clopper_pearson": self._cp_ceiling(self.alpha),
                "confidence_clopper_pearson": 1 - self.alpha, "cp_independent": self.cp_independent,
                "empirical_epsilon_lb": self.epsilon_lb, "ceiling": self.ceiling, "confidence": 1 - self.alpha,
                "quoted": quoted, "claimed_epsilon": "none" if self.claimed_epsilon is None else self.claimed_epsilon,
                "delta": self.delta, **self.extra}


def score_canaries(out, canaries: LabeledImages, score: str) -> np.ndarray:
    """Minus the trained model's loss on each canary, or minus its distance to the synthetic set."""
    if score == "loss":
        return -cross_entropy(logits(out.model, canaries.images), canaries.labels).numpy()
    if score == "distance":
        if out.synthetic is None:
            raise ValueError("score='distance' needs a pipeline that returns a synthetic set")
        d = -nearest_synthetic_distance(out.synthetic, canaries)
        finite = d[np.isfinite(d)]
        return np.where(np.isfinite(d), d, (finite.min() - 1.0) if finite.size else 0.0)
    raise ValueError(f"unknown canary score {score!r}; known: {list(SCORES)}")


def canary_audit(pipeline: Pipeline, client: LabeledImages, canaries: LabeledImages, *, kind: str = "mislabel",
                 score: str = "loss", seed: int = 0, runs: int = 1, delta: float | None = None,
                 alpha: float = 0.05, guess_fraction: float = 0.2) -> CanaryAudit:
    """Insert each canary with probability 1/2, run ``pipeline`` ``runs`` times (the canaries split
    evenly between runs, each run on the whole client set), score every canary, bound epsilon.

    ``delta`` defaults to the synthetic set's own (else 1e-5); the claimed epsilon is the set's
    ``meta.privacy["epsilon"]`` (the largest over runs), None for a non-DP pipeline.
    """
    if not 1 <= runs <= len(canaries):
        raise ValueError(f"runs must be in [1, {len(canaries)}], got {runs}")
    if not 0 < guess_fraction <= 1:
        raise ValueError(f"guess_fraction must be in (0, 1], got {guess_fraction}")
    included = inclusion_mask(len(canaries), seed)
    scores = np.zeros(len(canaries))
    claimed: float | None = None
    set_delta: float | None = None
    for run, idx in enumerate(np.array_split(np.arange(len(canaries)), runs)):
        run_seed = int(np.random.SeedSequence([seed, 7, run]).generate_state(1)[0] % (2**31))
        data = concat(client, canaries.subset(idx[included[idx]]))
        out = pipeline(data, run_seed)
        scores[idx] = score_canaries(out, canaries.subset(idx), score)
        priv = out.synthetic.meta.privacy if out.synthetic is not None else {}
        if "epsilon" in priv:
            claimed = max(claimed or 0.0, float(priv["epsilon"]))
            set_delta = float(priv.get("delta", 1e-5))
    name = getattr(pipeline, "name", "target") or "target"
    return CanaryAudit(name, kind, score, scores, included, runs, claimed,
                       delta if delta is not None else (set_delta or 1e-5), alpha, guess_fraction)


def gaussian_audit(m: int, sigma: float, seed: int, delta: float = 1e-5, alpha: float = 0.05,
                   guess_fraction: float = 0.2, claimed_epsilon: float | None = None) -> CanaryAudit:
    """The canary audit of :func:`simulate_gaussian_mechanism`; the claim defaults to the true epsilon."""
    scores, included = simulate_gaussian_mechanism(m, sigma, seed)
    claim = gaussian_epsilon(sigma, delta) if claimed_epsilon is None else claimed_epsilon
    return CanaryAudit(f"gaussian sigma={sigma:g}", "simulated", "release", scores, included, 1, claim,
                       delta, alpha, guess_fraction, {"independent_trials": True})
