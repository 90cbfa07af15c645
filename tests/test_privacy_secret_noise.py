"""The public-seed attack, on the noise function alone.

With the old public-seed noise, a distinguisher that knows the seed tells neighbouring datasets
apart every time. With secret noise it does no better than chance, within a stated interval,
over repeated trials.

The release is one :func:`privacy.noise.noisy_class_sums` at sigma 50: any distinguisher's
accuracy is then at most e^eps / (1 + e^eps) + delta = 0.524 (classical Gaussian-mechanism
bound, eps = sqrt(2 ln(1.25 / delta)) / sigma = 0.097 at delta 1e-5), so "chance" and "broken"
are far apart.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from privacy.noise import noisy_class_sums
from privacy.randomness import noise_generator

SIGMA = 50.0
CLIP = 1.0
DELTA = 1e-5
CLASSES = 4
# A 99% interval would fail one run in a hundred by design; at 1 - 1e-5 the chance interval is
# [0.478, 0.522] for 10 000 trials, still clear of the DP bound 0.524 and of 1.0.
CHANCE_LEVEL = 1e-5


def _setup(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D (20 random embeddings, 8 dims, some longer than CLIP) and a canary of norm CLIP in class 0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 8, generator=gen) * 0.5
    y = torch.randint(0, CLASSES, (20,), generator=gen)
    u = torch.randn(8, generator=gen)
    return x, y, CLIP * u / u.norm()


def _release(x, y, canary, include: bool, public_seed: int, secret: bool) -> torch.Tensor:
    if include:
        x, y = torch.cat([x, canary[None]]), torch.cat([y, torch.tensor([0])])
    gen = noise_generator(public_seed, insecure_reproducible_noise=not secret)
    return noisy_class_sums(x, y, CLASSES, CLIP, SIGMA, gen)


def _seed_replay_guess(release: torch.Tensor, x, y, canary, public_seed: int) -> bool:
    """The server's attack: rerun the release on D with the public seed, subtract, project on the
    canary; "in" when the remainder is closer to the canary than to nothing."""
    gen = noise_generator(public_seed, insecure_reproducible_noise=True)
    replay = noisy_class_sums(x, y, CLASSES, CLIP, SIGMA, gen)
    return float((release - replay)[0] @ canary) / CLIP**2 > 0.5


def _accuracy(trials: int, secret: bool, seed: int) -> float:
    x, y, canary = _setup()
    coins = np.random.default_rng(seed).random(trials) < 0.5
    right = 0
    for t, b in enumerate(coins):
        public_seed = 1000 + t  # every trial a new, public, seed
        release = _release(x, y, canary, bool(b), public_seed, secret)
        right += _seed_replay_guess(release, x, y, canary, public_seed) == bool(b)
    return right / trials


def _chance_interval(n: int, level: float) -> tuple[float, float]:
    """Exact central binomial interval of Binomial(n, 1/2) / n: outside it with probability <= level."""
    k = np.arange(n + 1)
    logpmf = np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in k]) - n * math.log(2)
    cdf = np.cumsum(np.exp(logpmf))
    lo = int(np.argmax(cdf > level / 2))             # P[X < lo] <= level / 2
    hi = int(np.argmax(1 - cdf <= level / 2))        # P[X > hi] <= level / 2
    return lo / n, hi / n


def _dp_accuracy_bound(sigma: float, delta: float) -> float:
    eps = math.sqrt(2 * math.log(1.25 / delta)) / sigma  # Dwork & Roth, Thm A.1 (eps < 1)
    assert eps < 1
    return math.exp(eps) / (1 + math.exp(eps)) + delta


def test_public_seed_noise_is_replayed_every_time():
    assert _accuracy(400, secret=False, seed=0) == 1.0  # 400 of 400 right
    assert 1.0 > _dp_accuracy_bound(SIGMA, DELTA)  # the release's DP claim is void


def test_secret_noise_leaves_the_seed_replay_at_chance():
    n = 10_000
    acc = _accuracy(n, secret=True, seed=1)
    lo, hi = _chance_interval(n, CHANCE_LEVEL)
    assert 0.47 < lo < 0.5 < hi < 0.53  # the stated interval: [0.478, 0.522]
    assert lo <= acc <= hi, f"secret noise: accuracy {acc} outside chance interval [{lo}, {hi}]"
    assert acc < _dp_accuracy_bound(SIGMA, DELTA)


def test_secret_generators_differ_even_with_the_same_public_seed():
    a = torch.randn(64, generator=noise_generator(7))
    b = torch.randn(64, generator=noise_generator(7))
    assert not torch.equal(a, b)
    assert (a - b).abs().max() > 0.1


def test_insecure_generators_replay_each_other_exactly():
    a = torch.randn(64, generator=noise_generator(7, insecure_reproducible_noise=True))
    b = torch.randn(64, generator=noise_generator(7, insecure_reproducible_noise=True))
    c = torch.randn(64, generator=noise_generator(8, insecure_reproducible_noise=True))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_insecure_release_minus_replay_is_exactly_the_canary_or_nothing():
    """What makes the old behaviour fatal: the remainder is the canary (IN) or exactly zero (OUT)."""
    x, y, canary = _setup()
    replay = noisy_class_sums(x, y, CLASSES, CLIP, SIGMA, noise_generator(3, insecure_reproducible_noise=True))
    out = _release(x, y, canary, False, 3, secret=False) - replay
    inn = _release(x, y, canary, True, 3, secret=False) - replay
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.allclose(inn[0], canary, atol=1e-3) and torch.equal(inn[1:], torch.zeros_like(inn[1:]))
