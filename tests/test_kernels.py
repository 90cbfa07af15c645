"""Kernel math: KRR closed forms, random-feature NNGP convergence, empirical NTK."""

import math

import pytest
import torch
from torch import nn

from distill.kernels import (empirical_ntk_features, krr_predict, krr_predict_features, one_hot_targets,
                             random_network_features, relu_nngp_kernel, ridge)


def _problem(n_s=6, n_t=4, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_s, d, generator=g, dtype=torch.float64), torch.randn(n_t, d, generator=g, dtype=torch.float64),
            torch.randn(n_s, k, generator=g, dtype=torch.float64))


def test_krr_matches_a_direct_solve():
    xs, xt, ys = _problem()
    k_ss, k_ts = xs @ xs.T + 1.0, xt @ xs.T + 1.0
    lam = 0.1 * k_ss.diagonal().mean()
    alpha = torch.linalg.inv(k_ss + lam * torch.eye(6, dtype=torch.float64)) @ ys  # textbook form
    assert torch.allclose(krr_predict(k_ts, k_ss, ys, reg=0.1), k_ts @ alpha, atol=1e-10)
    assert float(ridge(k_ss, 0.1)) == pytest.approx(float(lam))


def test_primal_and_dual_forms_agree():
    """More support rows than features takes the primal (linear-in-|S|) path: same predictions."""
    xs, xt, ys = _problem(n_s=12, d=4)
    dual = krr_predict(xt @ xs.T, xs @ xs.T, ys, reg=1e-2)
    primal = krr_predict_features(xt, xs, ys, reg=1e-2)
    assert torch.allclose(primal, dual, atol=1e-8)
    xs, xt, ys = _problem(n_s=3, d=8)
    assert torch.allclose(krr_predict_features(xt, xs, ys, reg=1e-2), krr_predict(xt @ xs.T, xs @ xs.T, ys, 1e-2))


def test_krr_interpolates_its_support_without_ridge():
    xs, _, ys = _problem(n_s=4, d=6)
    assert torch.allclose(krr_predict_features(xs, xs, ys, reg=0.0), ys, atol=1e-8)


def _relu_layer(d: int, width: int, seed: int) -> nn.Module:
    layer = nn.Linear(d, width, bias=False).double()
    with torch.no_grad():
        layer.weight.normal_(0.0, math.sqrt(2.0 / d), generator=torch.Generator().manual_seed(seed))
    return nn.Sequential(layer, nn.ReLU())


def test_nngp_random_features_converge_to_the_arccos_kernel():
    """phi(x).phi(y) with features relu(Wx)/sqrt(width) -> the closed-form NNGP as width grows."""
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = relu_nngp_kernel(x, x)
    errors = []
    for width in (16, 256, 4096):
        nets = [_relu_layer(5, width, seed=s) for s in range(4)]
        with torch.no_grad():
            phi = random_network_features(nets, x)
        errors.append(float((phi @ phi.T - exact).abs().max() / exact.abs().max()))
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.05


def test_empirical_ntk_of_a_linear_model_is_the_input_gram_plus_one():
    lin = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    phi = empirical_ntk_features(lin, x)  # d(w0.x + b0)/d(W, b) = (x in row 0, 1)
    assert phi.shape == (4, 5 * 3 + 3)
    assert torch.allclose(phi @ phi.T, x @ x.T + 1.0)


def test_empirical_ntk_is_differentiable_in_the_inputs():
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: empirical_ntk_features(net, v).sum(1), (x,))


def test_one_hot_targets_are_centred():
    t = one_hot_targets(torch.tensor([0, 2]), 4)
    assert torch.allclose(t.sum(1), torch.zeros(2)) and t[1, 2] == pytest.approx(0.75)
