"""Behaviour of the meta-learning family: KIP, RFAD, FRePo (KRR) and BPTT (unrolled training)."""

import numpy as np
import pytest
import torch

from distill.methods import distill, make_config
from distill.methods.bptt import unrolled_loss

from .conftest import SMALL_NET

SHORT = {
    "kip": {"batch_real": 50, "lr_img": 0.05},
    "kip-ntk": {"batch_real": 30, "lr_img": 0.05, "kernel": "ntk"},
    "rfad": {"batch_real": 50, "lr_img": 0.05, "n_models": 2},
    "frepo": {"batch_real": 50, "lr_img": 0.05, "pool_size": 3, "max_online_steps": 10},
    "bptt": {"batch_real": 50, "lr_img": 0.05, "inner_steps": 4, "truncate": 2},
}


def _run(name, iterations=25, **kw):
    method = name.split("-")[0]
    settings = dict(ipc=1, iterations=iterations, init="noise", arch_kwargs=SMALL_NET, **SHORT[name])
    settings.update(kw)
    losses = []
    return distill(_run.data, make_config(method, **settings), callback=lambda i, loss: losses.append(loss)), losses


@pytest.fixture(autouse=True)
def _data(small_train):
    _run.data = small_train


@pytest.mark.parametrize("name", sorted(SHORT))
def test_loss_decreases(name):
    _, losses = _run(name)
    assert len(losses) == 25 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])


@pytest.mark.parametrize("name", ["kip", "frepo", "rfad", "bptt"])
def test_learned_labels_change_and_stay_distributions(name):
    syn, _ = _run(name, iterations=15, learn_labels=True, lr_labels=0.05)
    start, _ = _run(name, iterations=0, learn_labels=True)
    assert syn.soft_labels and syn.labels.dtype == torch.float32
    assert torch.allclose(syn.labels.sum(1), torch.ones(len(syn)), atol=1e-5) and (syn.labels >= 0).all()
    assert (syn.labels - start.labels).abs().max() > 1e-3
    assert syn.hard_labels().tolist() == list(range(10))


def test_hard_labels_when_not_learned():
    syn, _ = _run("kip", iterations=2, learn_labels=False)
    assert not syn.soft_labels and syn.labels.tolist() == list(range(10))


def test_rfad_platt_and_mse_losses():
    syn, losses = _run("rfad", iterations=3)
    assert syn.meta.extra["loss"] == "platt" and syn.meta.extra["platt_temperature"] > 0
    _, mse = _run("rfad", iterations=3, loss="mse")
    assert mse[0] < losses[0]  # squared error of centred one-hot targets vs cross-entropy near log(10)


def test_frepo_pool_networks_are_reborn():
    from distill.methods.frepo import ModelPool

    cfg = make_config("frepo", ipc=1, pool_size=2, max_online_steps=2, arch_kwargs=SMALL_NET)
    pool = ModelPool(cfg, _run.data)
    assert pool.ages == [0, 1]
    x, y = _run.data.images[:4], _run.data.labels[:4]
    first = pool.nets[1]
    pool.train_step(1, x, y)
    assert pool.nets[1] is not first and pool.ages[1] == 0 and pool.births == 3


def _tiny_unroll():
    g = torch.Generator().manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    syn_x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    real_x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    return net, params, syn_x, torch.tensor([0, 1, 2]), real_x, torch.tensor([0, 1, 2, 0, 1, 2]), lr


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_bptt_meta_gradient_matches_finite_differences(momentum):
    net, params, syn_x, syn_y, real_x, real_y, lr = _tiny_unroll()
    soft_y = torch.softmax(torch.randn(3, 3, dtype=torch.float64), 1).requires_grad_(True)

    def outer(x, eta, y):
        return unrolled_loss(net, params, x, y, real_x, real_y, eta, steps=4, momentum=momentum)

    assert torch.autograd.gradcheck(outer, (syn_x, lr, soft_y))
    before = {k: v.clone() for k, v in params.items()}
    outer(syn_x, lr, syn_y).backward()
    assert all(torch.equal(before[k], params[k]) for k in params)  # the network's start is untouched


def test_bptt_truncation_cuts_the_graph_but_not_the_forward():
    net, params, syn_x, syn_y, real_x, real_y, lr = _tiny_unroll()
    full = unrolled_loss(net, params, syn_x, syn_y, real_x, real_y, lr, steps=5, truncate=0)
    same = unrolled_loss(net, params, syn_x, syn_y, real_x, real_y, lr, steps=5, truncate=5)
    cut = unrolled_loss(net, params, syn_x, syn_y, real_x, real_y, lr, steps=5, truncate=1)
    assert torch.allclose(full, same) and torch.allclose(full, cut)  # same trained network
    g_full = torch.autograd.grad(full, syn_x)[0]
    assert torch.allclose(g_full, torch.autograd.grad(same, syn_x)[0])
    assert not torch.allclose(g_full, torch.autograd.grad(cut, syn_x)[0])  # truncated: biased


def test_bptt_learns_and_ships_its_learning_rate():
    syn, _ = _run("bptt", iterations=5, lr_lr=0.1)
    assert syn.lr is not None and syn.lr != pytest.approx(0.05) and syn.meta.extra["inner_steps"] == 4
    fixed, _ = _run("bptt", iterations=2, learn_lr=False)
    assert fixed.lr == pytest.approx(0.05)


@pytest.mark.parametrize("method,bad", [("kip", {"kernel": "rbf"}), ("rfad", {"loss": "hinge"}),
                                        ("bptt", {"inner_momentum": 1.0}), ("bptt", {"inner_steps": 0}),
                                        ("frepo", {"pool_size": 0}), ("kip", {"reg": -1.0})])
def test_settings_are_validated(method, bad):
    with pytest.raises(ValueError):
        make_config(method, **bad)
