"""Behaviour of the meta-learning family: KIP, RFAD, FRePo (KRR) and BPTT (unrolled training)."""

import numpy as np
import pytest
import torch

from distill.methods import distill, make_config

from .conftest import SMALL_NET

SHORT = {
    "kip": {"batch_real": 50, "lr_img": 0.05},
    "kip-ntk": {"batch_real": 30, "lr_img": 0.05, "kernel": "ntk"},
    "rfad": {"batch_real": 50, "lr_img": 0.05, "n_models": 2},
    "frepo": {"batch_real": 50, "lr_img": 0.05, "pool_size": 3, "max_online_steps": 10},
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


@pytest.mark.parametrize("name", ["kip", "frepo", "rfad"])
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


@pytest.mark.parametrize("method,bad", [("kip", {"kernel": "rbf"}), ("rfad", {"loss": "hinge"}),
                                        ("frepo", {"pool_size": 0}), ("kip", {"reg": -1.0})])
def test_settings_are_validated(method, bad):
    with pytest.raises(ValueError):
        make_config(method, **bad)
