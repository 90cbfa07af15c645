"""Kernel math for the kernel-ridge-regression distillers (KIP, RFAD, FRePo), as pure functions.

KIP (Nguyen et al., ICLR 2021 / NeurIPS 2021), RFAD (Loo et al., NeurIPS 2022) and FRePo
(Zhou et al., NeurIPS 2022) all fit a kernel ridge regressor on the synthetic set and score
it on real data; they differ in the kernel. Here: the regressor (in its dual, ``N x N``, and
primal, ``D x D``, forms: the primal one is what makes a random-feature kernel linear in
|S|), feature maps whose inner products are the kernels (random-network features for the
NNGP, parameter gradients for the empirical NTK), and the closed-form NNGP of a one-hidden-
layer ReLU network (the arc-cosine kernel, Cho & Saul 2009) that the random features are
tested against.

>>> x = torch.randn(5, 8, dtype=torch.float64)  # 5 support points, full-rank kernel
>>> y = torch.randn(5, 2, dtype=torch.float64)
>>> torch.allclose(krr_predict(x @ x.T, x @ x.T, y, reg=0.0), y)
True
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .networks import embed_in_chunks


def ridge(k_ss: torch.Tensor, reg: float) -> torch.Tensor:
    """The ridge added to ``k_ss``: ``reg`` times the mean diagonal, so ``reg`` is scale-free."""
    return reg * k_ss.diagonal().mean().clamp_min(1e-12)


def krr_predict(k_ts: torch.Tensor, k_ss: torch.Tensor, y_s: torch.Tensor, reg: float) -> torch.Tensor:
    """Kernel ridge regression: ``K_ts (K_ss + lambda I)^-1 y_s`` (the survey's eq. 8 predictor).

    ``lambda = reg * tr(K_ss) / N`` (KIP's convention). Differentiable in every argument.
    """
    n = k_ss.shape[0]
    eye = torch.eye(n, dtype=torch.float64, device=k_ss.device)
    # solved in float64: a synthetic set of near-duplicate images makes K_ss ill-conditioned
    alpha = torch.linalg.solve(k_ss.double() + ridge(k_ss.double(), reg) * eye, y_s.double())
    return k_ts @ alpha.to(k_ts.dtype)


def krr_predict_features(phi_t: torch.Tensor, phi_s: torch.Tensor, y_s: torch.Tensor,
                         reg: float) -> torch.Tensor:
    """KRR with the kernel ``phi(x) . phi(y)``, in whichever form is cheaper.

    With N support rows and D features the dual form costs O(N^2 D + N^3) and the primal form
    ``phi_t (phi_s^T phi_s + lambda I_D)^-1 phi_s^T y_s`` O(N D^2 + D^3): linear in N, which is
    RFAD's point for large synthetic sets. Both give the same predictions (push-through
    identity); ``lambda`` is the same trace-scaled ridge as :func:`krr_predict`.
    """
    n, d = phi_s.shape
    if n <= d:
        return krr_predict(phi_t @ phi_s.T, phi_s @ phi_s.T, y_s, reg)
    lam = reg * (phi_s * phi_s).sum() / n
    eye = torch.eye(d, dtype=torch.float64, device=phi_s.device)
    gram = (phi_s.T @ phi_s).double() + lam.double().clamp_min(1e-12) * eye
    w = torch.linalg.solve(gram, (phi_s.T @ y_s).double())
    return phi_t @ w.to(phi_t.dtype)


def random_network_features(networks: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Features whose inner product estimates the NNGP kernel of the networks' architecture.

    Each randomly initialised network maps ``x`` to ``embed(x)`` (or ``net(x)`` when it has no
    ``embed``), scaled by ``1/sqrt(width)``; the networks' features are concatenated and scaled
    by ``1/sqrt(M)``, so ``phi(x) . phi(y)`` is the average over networks of the empirical
    conjugate kernel, which converges to the NNGP kernel as width or M grows (RFAD's
    approximation, Loo et al. 2022).
    """
    feats = []
    for net in networks:
        if not hasattr(net, "embed"):
            f = net(x)
        elif torch.is_grad_enabled():
            f = net.embed(x)
        else:  # the real side: chunked, cache-friendly forward passes (same values)
            f = embed_in_chunks(net, x)
        f = torch.flatten(f, 1)
        feats.append(f / math.sqrt(f.shape[1]))
    return torch.cat(feats, 1) / math.sqrt(len(feats))


def empirical_ntk_features(net: nn.Module, x: torch.Tensor, output: int = 0) -> torch.Tensor:
    """Per-sample gradients of logit ``output`` w.r.t. all parameters: ``J(x) J(y)^T`` is the NTK.

    For a wide network at initialisation this empirical NTK approximates the infinite-width
    NTK that KIP uses (one logit suffices: at infinite width every logit has the same kernel).
    Differentiable in ``x`` (double backward through ``torch.func``), and memory grows as
    ``N x P`` for P parameters, so keep the network modest on CPU. ``net`` must not mix
    samples (no batch norm in training mode).
    """
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def logit(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(net, (p, buffers), (xi.unsqueeze(0),))[0, output]

    grads = vmap(grad(logit), in_dims=(None, 0))(params, x)
    return torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], 1)


def relu_nngp_kernel(x: torch.Tensor, y: torch.Tensor, weight_var: float = 2.0) -> torch.Tensor:
    """Closed-form NNGP kernel of one ReLU layer: ``E_w[relu(w.x) relu(w.y)]`` (arc-cosine, order 1).

    With ``w ~ N(0, weight_var / d I)``: ``weight_var / (2 pi d) |x| |y| (sin t + (pi - t) cos t)``
    where ``t`` is the angle between ``x`` and ``y`` (Cho & Saul 2009).
    """
    d = x.shape[1]
    nx, ny = x.norm(dim=1, keepdim=True), y.norm(dim=1, keepdim=True)
    cos = ((x @ y.T) / (nx * ny.T).clamp_min(1e-12)).clamp(-1.0, 1.0)
    t = torch.arccos(cos)
    return weight_var / (2 * math.pi * d) * nx * ny.T * (torch.sin(t) + (math.pi - t) * cos)


def one_hot_targets(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Zero-mean one-hot regression targets (``onehot - 1/K``), KIP's label encoding."""
    return torch.nn.functional.one_hot(labels, num_classes).to(dtype) - 1.0 / num_classes


def krr_squared_error(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """KIP's loss (eq. 8 of the survey): half the squared error to one-hot targets, mean over rows."""
    return 0.5 * ((pred - one_hot_targets(labels, num_classes)) ** 2).sum(1).mean()
