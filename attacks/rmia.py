"""RMIA (Zarifzadeh, Liu, Shokri & Zhang, ICML 2024, "Low-Cost High-Power Membership Inference Attacks").

A pairwise likelihood ratio: x is a member if the target raises its probability, relative to
reference models, more than it raises that of population points z it never trained on::

    LR(x, z) = [Pr(x | theta) / Pr(x)] / [Pr(z | theta) / Pr(z)],   score(x) = Pr_z[LR(x, z) >= gamma]

with ``Pr(x | theta)`` the softmax probability of the true label (mean over queries) and
``Pr(x)`` its mean over reference models. Online, the references hold x in about half of
them. Offline (references OUT only), ``Pr(x) ~ ((1 + a) Pr_OUT(x) + (1 - a)) / 2`` (their
linear approximation of the missing IN half); ``a`` is tuned by attacking one reference with
the others, as the paper does. There is no per-example variance to estimate, so it keeps its
power with 1-4 references where LiRA degrades (ATTACK_NOTES: AUC 0.63 with 2 references).

The references are the LiRA shadows (:class:`attacks.lira.ShadowBank`, whose scaled logits
``phi`` give ``p_y = sigmoid(phi)`` exactly), plus their signals on the population points.
Ties in the fraction (there are only ``Z`` values) are broken by ``LR(x)`` itself, the limit
of many z; the ordering, hence the ROC, is that of ``Pr(x|theta) / Pr(x)``, with ``gamma``
only setting how many z each x beats.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit

from distill.data import LabeledImages

from .lira import ShadowBank, signals_of
from .membership import AttackResult
from .metrics import auc, roc_curve
from .signals import DEFAULT_SHIFTS

DEFAULT_A = 0.3  # the paper's common offline default when it cannot be tuned
A_GRID = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))


def probabilities(signals: np.ndarray) -> np.ndarray:
    """``p_y`` averaged over queries (last axis) from scaled logits ``phi = log p_y - log(1 - p_y)``."""
    return expit(signals).mean(axis=-1)


def _marginal(ref_p: np.ndarray, masks: np.ndarray | None, online: bool, a: float) -> np.ndarray:
    """``Pr(x)`` per example from reference probabilities ``[S, N]``; ``masks`` [S, N] marks IN refs."""
    if online or masks is None:
        p = ref_p.mean(axis=0)
        return p if online else ((1 + a) * p + (1 - a)) / 2
    out = ~masks
    n_out = out.sum(axis=0)
    fallback = ref_p[out].mean() if out.any() else ref_p.mean()
    p_out = np.where(n_out > 0, (ref_p * out).sum(axis=0) / np.maximum(n_out, 1), fallback)
    return ((1 + a) * p_out + (1 - a)) / 2


def rmia_scores(target_x: np.ndarray, ref_x: np.ndarray, masks: np.ndarray, target_z: np.ndarray,
                ref_z: np.ndarray, online: bool = True, a: float = DEFAULT_A, gamma: float = 1.0) -> np.ndarray:
    """Per-example RMIA scores ``[N]`` from probabilities: target ``[N]``, references ``[S, N]``
    (``masks`` [S, N] True where the reference trained on x), population ``[Z]`` / ``[S, Z]``."""
    eps = 1e-30
    lr_x = target_x / np.maximum(_marginal(ref_x, masks, online, a), eps)
    lr_z = target_z / np.maximum(_marginal(ref_z, None, online, a), eps)  # no reference holds z
    beaten = np.searchsorted(np.sort(lr_z), lr_x / gamma, side="right") / lr_z.size
    rank = np.argsort(np.argsort(lr_x, kind="stable"), kind="stable") / (10.0 * max(lr_x.size, 1) * lr_z.size)
    return beaten + rank  # the tie-break term is below 1/Z: it never reorders different fractions


def tune_a(bank: ShadowBank, grid: tuple[float, ...] = A_GRID) -> float:
    """The offline ``a`` that best attacks each reference with the others (mean AUC); needs >= 3 refs."""
    s = bank.masks.shape[0]
    if s < 3:
        return DEFAULT_A
    px = probabilities(bank.signals)  # [S, N]
    best, best_auc = DEFAULT_A, -1.0
    for a in grid:
        aucs = []
        for j in range(s):
            others = np.arange(s) != j
            lr = px[j] / np.maximum(_marginal(px[others], bank.masks[others], False, a), 1e-30)
            m = bank.masks[j]
            aucs.append(auc(*roc_curve(lr[m], lr[~m])[:2]))
        if np.mean(aucs) > best_auc:
            best, best_auc = float(a), float(np.mean(aucs))
    return best


def rmia_attack(target: torch.nn.Module, pool: LabeledImages, member_mask: np.ndarray, bank: ShadowBank,
                population: LabeledImages, target_name: str = "",
                shifts: tuple[tuple[int, int], ...] = DEFAULT_SHIFTS, a: float | None = None,
                gamma: float = 1.0) -> list[AttackResult]:
    """Online and offline RMIA on ``target``; ``bank.population`` must hold the references'
    signals on ``population`` (pass it to :func:`attacks.lira.train_shadows`)."""
    if bank.population is None or bank.population.shape[1] != len(population):
        raise ValueError("the shadow bank has no signals on this population (train_shadows(population=...))")
    tx = probabilities(signals_of(target, pool, shifts))
    tz = probabilities(signals_of(target, population, shifts))
    rx, rz = probabilities(bank.signals), probabilities(bank.population)
    a = tune_a(bank) if a is None else a
    out = []
    for online in (True, False):
        s = rmia_scores(tx, rx, bank.masks, tz, rz, online=online, a=a, gamma=gamma)
        extra = {"shadows": int(bank.masks.shape[0]), "population": len(population)}
        if not online:
            extra["a"] = a
        out.append(AttackResult("rmia-online" if online else "rmia-offline", target_name,
                                s[member_mask], s[~member_mask], extra))
    return out
