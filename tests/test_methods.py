"""Behaviour of individual methods (DM, DC, KIP), the registry, and KIP-rho validation; the contract
every registered method keeps is in test_method_contract.py."""

import numpy as np
import pytest
import torch

from distill.losses import class_means, gradient_match_distance
from distill.methods import distill, make_config
from distill.task import coerce_settings
from distill.methods.gm import class_gradient_distance
from distill.networks import seeded_network

from .conftest import SMALL_NET

# Quick settings for the behaviour tests below. The contract every registered method keeps
# (shapes, labels, determinism, KIP-rho) is in test_method_contract.py, parametrised by the registry.
QUICK = {"dm": {"batch_real": 32}, "dc": {"batch_real": 32, "outer_loop": 1, "inner_loop": 1},
         "kip": {"batch_real": 40, "lr_img": 0.1}}


def _cfg(method, **kw):
    base = dict(ipc=2, iterations=2, arch_kwargs=SMALL_NET, **QUICK[method])
    base.update(kw)
    return make_config(method, **base)


def test_dm_loss_decreases_and_images_move(small_train):
    losses = []
    cfg = _cfg("dm", iterations=30, init="noise", ipc=1)
    syn = distill(small_train, cfg, callback=lambda it, loss: losses.append(loss))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    start = distill(small_train, _cfg("dm", iterations=0, init="noise", ipc=1))
    assert (syn.images - start.images).abs().mean() > 0.01


def _matching_loss(syn, real, seeds=(11, 12, 13)):
    total = 0.0
    for s in seeds:
        net = seeded_network("convnet", 1, 10, (28, 28), seed=s, **SMALL_NET)
        params = list(net.parameters())
        for c in range(10):
            real_c = real.images[real.labels == c][:60]
            syn_c = syn.images[syn.labels == c]
            total += class_gradient_distance(net, params, real_c, syn_c, c, None, torch.Generator()).item()
    return total


def test_dc_matching_loss_decreases(small_train):
    start = distill(small_train, _cfg("dc", iterations=0, init="noise", ipc=1))
    syn = distill(small_train, _cfg("dc", iterations=25, init="noise", ipc=1, lr_img=1.0))
    assert _matching_loss(syn, small_train) < 0.9 * _matching_loss(start, small_train)


def test_classes_are_capped_at_what_the_client_holds(small_train):
    labels = small_train.labels
    idx = torch.cat([torch.nonzero(labels == 0).flatten()[:1], torch.nonzero(labels == 1).flatten()[:30]])
    syn = distill(small_train.subset(idx), _cfg("dm", ipc=5))
    assert syn.class_counts().tolist() == [1, 5] + [0] * 8


def test_registry_errors_name_the_known_values():
    with pytest.raises(ValueError, match="known: .*dm"):
        make_config("nope")
    with pytest.raises(ValueError, match="no settings"):
        make_config("dm", lr_net=0.1)
    with pytest.raises(ValueError, match="ipc"):
        make_config("dm", ipc=0)
    typed = coerce_settings("dsa", {"lr-img": "0.5", "outer_loop": "3"})  # distill.task: over the defaults
    assert (typed["lr_img"], typed["outer_loop"], typed["batch_real"]) == (0.5, 3, 256)
    assert make_config("dsa").dsa and not make_config("dc").dsa


def test_loss_functions():
    g = [torch.randn(4, 3, 3, 3), torch.randn(4)]
    assert float(gradient_match_distance(g, g)) == pytest.approx(0.0, abs=1e-4)
    assert float(gradient_match_distance(g, [-g[0], g[1]])) == pytest.approx(8.0, abs=1e-3)
    means = class_means(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 0, 2]), 3)
    assert means.flatten().tolist() == [2.0, 0.0, 5.0]


def test_rho_is_validated():
    with pytest.raises(ValueError, match="rho"):
        make_config("dm", rho=1.0)


@pytest.mark.parametrize("method", ["dm", "kip"])
def test_time_limit_stops_early_and_records_iterations_run(method, small_train):
    # a budget that ends during the first iteration: exactly one runs, and the set says so
    out = distill(small_train, _cfg(method, iterations=50, time_limit_s=1e-9))
    assert out.meta.iterations == 1
    assert distill(small_train, _cfg(method, iterations=2)).meta.iterations == 2
    with pytest.raises(ValueError, match="time_limit_s"):
        make_config(method, time_limit_s=0)


def test_time_limit_is_refused_under_dp():
    with pytest.raises(ValueError, match="time_limit_s is not allowed under DP"):
        make_config("dp-dm", time_limit_s=10.0)


def test_the_dp_methods_are_registered_without_importing_privacy():
    """Lazy entries: a fresh interpreter lists and builds a DP method; privacy is imported on first use."""
    import subprocess
    import sys
    code = ("import sys; from distill.methods import available_methods, make_config; "
            "assert {'dp-dm', 'dpsgd-gm', 'dp-mtt'} <= set(available_methods()); "
            "assert 'privacy' not in sys.modules; "
            "cfg = make_config('dp-dm', ipc=1, iterations=2); "
            "assert type(cfg).__module__ == 'privacy.dp_dm' and 'privacy' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


def test_registering_a_name_twice_raises_unless_forced():
    from distill.methods import _REGISTRY, register
    saved = dict(_REGISTRY)
    try:
        with pytest.raises(ValueError, match="registered already"):
            register("dm", "distill.methods.dm:DMConfig", "distill.methods.dm:distill")
        register("dm", "distill.methods.dm:DMConfig", "distill.methods.dm:distill", force=True)
        assert type(make_config("dm", ipc=1)).__name__ == "DMConfig"
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def test_an_unknown_method_fails_at_the_server_before_any_client_is_asked():
    from server.settings import RunSettings
    with pytest.raises(ValueError, match=r"unknown method 'dmm'; known: \[.*'dm'"):
        RunSettings.from_run_config({"method": "dmm"})
