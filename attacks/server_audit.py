"""DP audit played from the server's side: a distinguishing game with the server's knowledge.

The guarantee is for the data holder *against the server* (docs: DESIGN.md, "Trust model"), so
the auditor here knows everything the server knows (the run seed, the partition id, the round
and the upload's ``meta.seed``, bundled as :class:`PublicKnowledge`) and, as in worst-case DP
auditing, the rest of the client's data. The game, on neighbouring datasets D and D' = D +
canary, repeated over independent trials:

1. flip a fair coin b; run the mechanism on D' if b else on D, under a fresh public seed;
2. hand the auditor the release and the public knowledge; it returns one score per test it
   knows (higher = "the canary was in");
3. on a *calibration* set of trials pick the test and threshold; on a separate *counted* set
   count TP / FP and turn them into a lower bound on epsilon with Clopper-Pearson limits
   (Jagielski, Ullman & Oprea 2020; Nasr et al. 2021)::

       eps_lb = max(ln[(TPR_lo - delta) / FPR_hi], ln[(1 - FPR_hi - delta) / (1 - TPR_lo)])

   ``TPR_lo`` and ``FPR_hi`` are one-sided limits that each fail with probability at most
   ``alpha / 2``; both halves of the max hold on the same event, so the bound holds with
   confidence ``1 - alpha`` (union bound), which is what each result reports.

A bound is only as large as the trials allow: :func:`epsilon_ceiling` is what the same counts
would give with perfect separation, and every result carries it beside the bound.

Mechanisms (each the project's own code): one DP-DM release (:func:`privacy.noise.noisy_class_sums`)
with public-seed noise (the old, weak behaviour) or secret noise, and a whole non-private DM
distillation (:func:`distill.methods.distill`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from scipy.stats import beta

from distill.data import LabeledImages, load_dataset
from distill.methods import distill
from distill.task import config_from_settings
from distill.partition import client_seed
from privacy.accounting import calibrate_sigma
from privacy.noise import clip_rows, noisy_class_sums
from privacy.randomness import noise_generator

from .canary import gaussian_epsilon

ALPHA = 0.05
DELTA = 1e-5


# --- statistics -------------------------------------------------------------------------------

def cp_lower(k: np.ndarray | int, n: int, level: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower limit: below the true rate with probability <= ``level``."""
    k = np.asarray(k, dtype=np.float64)
    return np.where(k <= 0, 0.0, beta.ppf(level, np.maximum(k, 1), n - k + 1))


def cp_upper(k: np.ndarray | int, n: int, level: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper limit: above the true rate with probability <= ``level``."""
    k = np.asarray(k, dtype=np.float64)
    return np.where(k >= n, 1.0, beta.ppf(1 - level, k + 1, np.maximum(n - k, 1)))


def epsilon_from_limits(tpr_low: np.ndarray, fpr_high: np.ndarray, delta: float) -> np.ndarray:
    """The larger of the two DP inequalities' bounds (TPR and TNR sides), floored at 0."""
    tpr_low, fpr_high = np.asarray(tpr_low, float), np.asarray(fpr_high, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.clip(tpr_low - delta, 0, None) / fpr_high)
        b = np.log(np.clip(1 - fpr_high - delta, 0, None) / (1 - tpr_low))
    return np.nan_to_num(np.maximum(np.maximum(a, b), 0.0), nan=0.0, posinf=0.0, neginf=0.0)


def epsilon_bound(tp: np.ndarray | int, positives: int, fp: np.ndarray | int, negatives: int,
                  alpha: float = ALPHA, delta: float = DELTA) -> np.ndarray:
    """Lower bound on epsilon at confidence ``1 - alpha``: each limit at ``alpha / 2``."""
    if positives < 1 or negatives < 1:
        raise ValueError(f"need >= 1 positive and negative trial, got {positives}, {negatives}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return epsilon_from_limits(cp_lower(tp, positives, alpha / 2), cp_upper(fp, negatives, alpha / 2), delta)


def epsilon_ceiling(positives: int, negatives: int, alpha: float = ALPHA, delta: float = DELTA) -> float:
    """The bound these counts give with perfect separation: no audit of them can show more."""
    return float(epsilon_bound(positives, positives, 0, negatives, alpha, delta))


def trials_for_ceiling(epsilon: float, alpha: float = ALPHA, delta: float = DELTA) -> int:
    """Fewest trials per side (balanced) whose ceiling exceeds ``epsilon`` (about 3.7 e^eps at 95%)."""
    hi = 2
    while epsilon_ceiling(hi, hi, alpha, delta) <= epsilon:
        hi *= 2
        if hi > 2**40:
            raise ValueError(f"no trial count reaches a ceiling of {epsilon} at delta {delta}")
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if epsilon_ceiling(mid, mid, alpha, delta) > epsilon else (mid, hi)
    return hi


# --- the game ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PublicKnowledge:
    """What the server knows about one upload; the client's seed derives from it (and is ``meta.seed``)."""

    run_seed: int
    partition_id: int
    round: int

    @property
    def seed(self) -> int:
        return client_seed(self.run_seed, self.partition_id, self.round)


Mechanism = Callable[[bool, PublicKnowledge], torch.Tensor]  # (canary in?, public) -> release
Auditor = Callable[[torch.Tensor, PublicKnowledge], dict[str, float]]  # -> score per test


@dataclass
class Trials:
    """The coin of every trial and each test's score (higher = "canary in")."""

    bits: np.ndarray
    scores: dict[str, np.ndarray]


def play(mechanism: Mechanism, auditor: Auditor, trials: int, rng: np.random.Generator,
         run_seed: int = 0, partition_id: int = 0, first_round: int = 1) -> Trials:
    """``trials`` independent rounds of the game; each trial has its own round, hence public seed."""
    bits = rng.random(trials) < 0.5
    rows: list[dict[str, float]] = []
    for t, b in enumerate(bits):
        public = PublicKnowledge(run_seed, partition_id, first_round + t)
        rows.append(auditor(mechanism(bool(b), public), public))
    names = sorted(rows[0]) if rows else []
    return Trials(bits, {n: np.array([r[n] for r in rows], dtype=np.float64) for n in names})


@dataclass(frozen=True)
class Decision:
    """A decision rule fixed before the counted trials: "canary in" when ``score >= threshold``."""

    score: str
    threshold: float


def _candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """Midpoints between distinct scores (and beyond both ends): a threshold from the middle of a
    gap, so counted scores that differ from the calibration ones by rounding still fall the same side."""
    u = np.unique(scores)
    return np.r_[u[0] - 1.0, (u[:-1] + u[1:]) / 2, u[-1] + 1.0]


def choose_test(calibration: Trials, alpha: float = ALPHA, delta: float = DELTA) -> Decision:
    """The test and threshold with the best bound on the calibration trials (ties: best balanced accuracy)."""
    bits = calibration.bits
    pos, neg = int(bits.sum()), int((~bits).sum())
    if pos < 1 or neg < 1:
        raise ValueError(f"calibration needs both coin outcomes, got {pos} IN and {neg} OUT")
    best: tuple[float, float, str, float] | None = None
    for name, s in sorted(calibration.scores.items()):
        th = _candidate_thresholds(s)
        tp = pos - np.searchsorted(np.sort(s[bits]), th, side="left")  # IN scores >= threshold
        fp = neg - np.searchsorted(np.sort(s[~bits]), th, side="left")
        eps = epsilon_bound(tp, pos, fp, neg, alpha, delta)
        acc = (tp / pos + 1 - fp / neg) / 2
        i = int(np.lexsort((acc, eps))[-1])
        if best is None or (eps[i], acc[i]) > best[:2]:
            best = (float(eps[i]), float(acc[i]), name, float(th[i]))
    assert best is not None
    return Decision(best[2], best[3])


@dataclass(frozen=True)
class AuditResult:
    """One mechanism's row: counts, rates, their limits, the bound, its ceiling and confidence."""

    mechanism: str
    calibration_trials: int
    counted_trials: int
    positives: int
    negatives: int
    true_positives: int
    false_positives: int
    test: str
    threshold: float
    tpr: float
    fpr: float
    tpr_low: float
    fpr_high: float
    epsilon_lb: float
    ceiling: float
    confidence: float
    delta: float
    accountant_epsilon: float | None = None
    exact_gaussian_epsilon: float | None = None
    sigma: float | None = None
    seconds: float = 0.0

    def to_row(self) -> dict:
        return asdict(self)


def count(counted: Trials, test: Decision, name: str, calibration_trials: int, alpha: float = ALPHA,
          delta: float = DELTA, **extra) -> AuditResult:
    """Apply the fixed ``test`` to the counted trials and bound epsilon from the counts."""
    bits, s = counted.bits, counted.scores[test.score]
    pos, neg = int(bits.sum()), int((~bits).sum())
    tp, fp = int((s[bits] >= test.threshold).sum()), int((s[~bits] >= test.threshold).sum())
    tpr_level = fpr_level = alpha / 2  # each limit's failure probability
    tpr_low, fpr_high = float(cp_lower(tp, pos, tpr_level)), float(cp_upper(fp, neg, fpr_level))
    return AuditResult(name, calibration_trials, len(bits), pos, neg, tp, fp, test.score, test.threshold,
                       tp / pos, fp / neg, tpr_low, fpr_high,
                       float(epsilon_from_limits(tpr_low, fpr_high, delta)),
                       epsilon_ceiling(pos, neg, alpha, delta), 1 - (tpr_level + fpr_level), delta, **extra)


def run_game(name: str, mechanism: Mechanism, auditor: Auditor, calibration: int, counted: int, *,
             alpha: float = ALPHA, delta: float = DELTA, seed: int = 0, **extra) -> AuditResult:
    """Calibrate on ``calibration`` trials, then count ``counted`` fresh ones (distinct rounds)."""
    if calibration < 2 or counted < 2:
        raise ValueError(f"need >= 2 calibration and counted trials, got {calibration}, {counted}")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    cal = play(mechanism, auditor, calibration, rng, run_seed=seed, first_round=1)
    test = choose_test(cal, alpha, delta)
    fresh = play(mechanism, auditor, counted, rng, run_seed=seed, first_round=calibration + 1)
    result = count(fresh, test, name, calibration, alpha, delta, **extra)
    return AuditResult(**{**result.to_row(), "seconds": time.perf_counter() - start})


# --- mechanism 1: one DP-DM release (noisy class sums of clipped embeddings) ------------------

@dataclass(frozen=True)
class ClassSums:
    """D's embeddings, the canary's (norm ``clip``, in a direction the auditor knows), the release's settings.

    The embedder's seed is public, so a server holding the images can compute these features:
    random feature vectors stand in for them.
    """

    features: torch.Tensor
    labels: torch.Tensor
    canary: torch.Tensor
    canary_label: int
    num_classes: int
    clip: float
    sigma: float

    def data(self, include_canary: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not include_canary:
            return self.features, self.labels
        return (torch.cat([self.features, self.canary[None]]),
                torch.cat([self.labels, torch.tensor([self.canary_label])]))


def class_sums(sigma: float, *, n: int = 100, dim: int = 32, num_classes: int = 10, clip: float = 1.0,
               seed: int = 0) -> ClassSums:
    """A fixed D of ``n`` random features (some longer than ``clip``, so clipping acts) and a canary."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, dim, generator=gen) * (1.5 * clip / math.sqrt(dim))
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    direction = torch.randn(dim, generator=gen)
    return ClassSums(features, labels, clip * direction / direction.norm(), 0, num_classes, clip, sigma)


def class_sums_mechanism(setup: ClassSums, secret_noise: bool) -> Mechanism:
    """The client's release; ``secret_noise=False`` is the old public-seed noise."""
    def release(include_canary: bool, public: PublicKnowledge) -> torch.Tensor:
        x, y = setup.data(include_canary)
        gen = noise_generator(public.seed, insecure_reproducible_noise=not secret_noise)
        return noisy_class_sums(x, y, setup.num_classes, setup.clip, setup.sigma, gen)
    return release


def class_sums_auditor(setup: ClassSums) -> Auditor:
    """Two tests on the canary row's projection on the canary direction (in units of ``clip``).

    ``seed replay``: regenerate the noise from the public seed by running the release on D, and
    subtract it (exact when the noise was public-seeded). ``likelihood ratio``: subtract D's known
    clipped sum only; for a Gaussian mean shift this projection is the Neyman-Pearson test.
    """
    x, y = setup.data(False)
    known_sum = x.new_zeros(setup.num_classes, x.shape[1]).index_add_(0, y, clip_rows(x, setup.clip))
    u = setup.canary / setup.canary.norm()

    def scores(release: torch.Tensor, public: PublicKnowledge) -> dict[str, float]:
        replay = noisy_class_sums(x, y, setup.num_classes, setup.clip, setup.sigma,
                                  noise_generator(public.seed, insecure_reproducible_noise=True))
        k = setup.canary_label
        return {"seed replay": float((release - replay)[k] @ u) / setup.clip,
                "likelihood ratio": float((release - known_sum)[k] @ u) / setup.clip}
    return scores


def audit_noisy_sums(accountant_epsilon: float, secret_noise: bool, calibration: int, counted: int, *,
                     alpha: float = ALPHA, delta: float = DELTA, seed: int = 0) -> AuditResult:
    """One release with sigma calibrated (RDP, q = 1, one step) to ``accountant_epsilon``, audited."""
    sigma = calibrate_sigma(accountant_epsilon, delta=delta, sample_rate=1.0, steps=1, accountant="rdp")
    setup = class_sums(sigma, seed=seed)
    kind = "real (secret noise)" if secret_noise else "weak (public-seed noise)"
    exact = gaussian_epsilon(sigma, delta) if secret_noise else None  # public noise: no guarantee
    return run_game(f"{kind}, accountant eps {accountant_epsilon:g}", class_sums_mechanism(setup, secret_noise),
                    class_sums_auditor(setup), calibration, counted, alpha=alpha, delta=delta, seed=seed,
                    accountant_epsilon=float(accountant_epsilon), exact_gaussian_epsilon=exact, sigma=sigma)


# --- mechanism 2: a whole non-private DM distillation -----------------------------------------

@dataclass(frozen=True)
class DMGame:
    """D (a small MNIST subset), the canary (a mislabelled test image) and DM's public settings."""

    data: LabeledImages
    canary: LabeledImages
    settings: dict

    def dataset(self, include_canary: bool) -> LabeledImages:
        if not include_canary:
            return self.data
        return LabeledImages(torch.cat([self.data.images, self.canary.images]),
                             torch.cat([self.data.labels, self.canary.labels]), self.data.info)

    def upload(self, include_canary: bool, public: PublicKnowledge) -> torch.Tensor:
        config = config_from_settings("dm", {**self.settings, "seed": public.seed})
        return distill(self.dataset(include_canary), config).images


def dm_game(per_class: int = 10, iterations: int = 2, batch_real: int = 16,
            arch_kwargs: dict | None = None) -> DMGame:
    """IPC 1, a few iterations, a small ConvNet: small enough to play a thousand times on a CPU."""
    mnist = load_dataset("mnist10k")
    data = mnist.train.first_per_class(per_class)
    x, y = mnist.test.images[:1], mnist.test.labels[:1]
    canary = LabeledImages(x.clone(), (y + 1) % mnist.info.num_classes, mnist.info)
    settings = {"ipc": 1, "iterations": iterations, "batch_real": batch_real,
                "arch_kwargs": arch_kwargs or {"width": 16, "depth": 2}}
    return DMGame(data, canary, settings)


def dm_auditor(game: DMGame) -> Auditor:
    """Replay the distillation on D with the public seed; the distance to the upload is 0 when OUT."""
    def scores(upload: torch.Tensor, public: PublicKnowledge) -> dict[str, float]:
        return {"distance to replay": float((upload - game.upload(False, public)).norm())}
    return scores


def audit_non_dp_dm(calibration: int, counted: int, *, game: DMGame | None = None, alpha: float = ALPHA,
                    delta: float = DELTA, seed: int = 0) -> AuditResult:
    """The non-private DM upload, audited by replay: no guarantee, so no accountant epsilon."""
    game = game or dm_game()
    return run_game("non-DP DM (IPC 1)", game.upload, dm_auditor(game), calibration, counted,
                    alpha=alpha, delta=delta, seed=seed)
