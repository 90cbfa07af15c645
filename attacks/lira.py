"""LiRA, the likelihood-ratio attack (Carlini, Chien, Nasr, Song, Terzis & Tramer, S&P 2022).

Each shadow re-runs the target's whole pipeline on a random half of the audit pool, so every
pool image is IN about half of the shadows and OUT of the rest. For each image and query the
scaled logit is modelled as Gaussian under IN and under OUT:

- online: score = mean over queries of log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out);
- offline (OUT shadows only): score = mean over queries of log Pr[Z < phi], Z ~ N(mu_out, s_out).

Means are per-example medians; with few shadows one pooled ("fixed") variance per side is
more stable than per-example ones (the paper's observation; also seen here at 16 shadows).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm

from distill.data import LabeledImages

from .membership import AttackResult, split_pool
from .pipelines import Pipeline
from .signals import DEFAULT_SHIFTS, query_logits, scaled_logit
from distill.progress import progress as progress_bar


@dataclass
class ShadowBank:
    """``masks`` bool [S, N] (pool image n was in shadow s) and ``signals`` float64 [S, N, Q];
    ``population`` float64 [S, Z, Q]: signals on population points no shadow trained on (RMIA's z)."""

    masks: np.ndarray
    signals: np.ndarray
    population: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.masks.shape != self.signals.shape[:2]:
            raise ValueError(f"masks {self.masks.shape} do not match signals {self.signals.shape}")
        if self.population is not None and self.population.shape[0] != self.masks.shape[0]:
            raise ValueError(f"population signals {self.population.shape} vs {self.masks.shape[0]} shadows")


def signals_of(net: torch.nn.Module, pool: LabeledImages,
               shifts: tuple[tuple[int, int], ...] = DEFAULT_SHIFTS) -> np.ndarray:
    """Scaled logits ``[N, Q]`` of every pool image under every query."""
    return scaled_logit(query_logits(net, pool.images, shifts), pool.labels).numpy()


def train_shadows(pipeline: Pipeline, pool: LabeledImages, n_shadows: int, seed: int = 0,
                  shifts: tuple[tuple[int, int], ...] = DEFAULT_SHIFTS, progress: bool = False,
                  population: LabeledImages | None = None) -> ShadowBank:
    """Run ``pipeline`` on ``n_shadows`` random halves of ``pool``; keep the masks and signals
    (and the signals on ``population``, which no shadow trains on, for RMIA)."""
    if n_shadows < 2:
        raise ValueError(f"LiRA needs at least 2 shadows, got {n_shadows}")
    masks, signals, pop = [], [], []
    for s in progress_bar(range(n_shadows), "shadows", progress, leave=False):
        shadow_seed = int(np.random.SeedSequence([seed, s]).generate_state(1)[0] % (2**31))
        mask = split_pool(len(pool), shadow_seed)
        out = pipeline(pool.subset(np.flatnonzero(mask)), shadow_seed)
        masks.append(mask)
        signals.append(signals_of(out.model, pool, shifts))
        if population is not None:
            pop.append(signals_of(out.model, population, shifts))
    return ShadowBank(np.stack(masks), np.stack(signals), np.stack(pop) if pop else None)


def _side_stats(bank: ShadowBank, side: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-example medians ``[N, Q]`` (global median where an example has no shadow on this side),
    per-example stds, and the pooled std of residuals."""
    sel = bank.masks if side else ~bank.masks
    x = np.where(sel[:, :, None], bank.signals, np.nan)
    have = sel.any(axis=0)
    fallback = np.nanmedian(x, axis=(0, 1)) if have.any() else np.zeros(x.shape[2])
    with warnings.catch_warnings():  # all-NaN columns (an example never on this side) are expected
        warnings.simplefilter("ignore", RuntimeWarning)
        mu = np.where(have[:, None], np.nanmedian(x, axis=0), fallback[None, :])
        sd = np.nanstd(x, axis=0)
    resid = (x - mu[None]).ravel()
    pooled = float(np.nanstd(resid)) if np.isfinite(resid).sum() > 1 else 1.0
    return mu, np.where(np.isfinite(sd) & (sd > 0), sd, pooled), max(pooled, 1e-6)


def lira_scores(target_signals: np.ndarray, bank: ShadowBank, online: bool = True,
                fixed_variance: bool = True) -> np.ndarray:
    """Per-example LiRA scores ``[N]`` for the target's signals ``[N, Q]``."""
    if target_signals.shape != bank.signals.shape[1:]:
        raise ValueError(f"target signals {target_signals.shape} vs shadows {bank.signals.shape[1:]}")
    mu_out, sd_out, pooled_out = _side_stats(bank, False)
    s_out = pooled_out if fixed_variance else sd_out + 1e-6
    if not online:
        return norm.logcdf(target_signals, mu_out, s_out).mean(axis=1)
    mu_in, sd_in, pooled_in = _side_stats(bank, True)
    s_in = pooled_in if fixed_variance else sd_in + 1e-6
    ratio = norm.logpdf(target_signals, mu_in, s_in) - norm.logpdf(target_signals, mu_out, s_out)
    return ratio.mean(axis=1)


def lira_attack(target: torch.nn.Module, pool: LabeledImages, member_mask: np.ndarray, bank: ShadowBank,
                target_name: str = "", shifts: tuple[tuple[int, int], ...] = DEFAULT_SHIFTS,
                fixed_variance: bool = True) -> list[AttackResult]:
    """Online and offline LiRA on ``target``; ``member_mask`` marks the pool images it saw."""
    sig = signals_of(target, pool, shifts)
    out = []
    for online in (True, False):
        s = lira_scores(sig, bank, online=online, fixed_variance=fixed_variance)
        out.append(AttackResult("lira-online" if online else "lira-offline", target_name,
                                s[member_mask], s[~member_mask], {"shadows": int(bank.masks.shape[0])}))
    return out
