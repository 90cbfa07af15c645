"""The contract every registered distillation method keeps, run over the registry itself.

The tests are parametrised by ``available_methods()`` (the DP methods of ``privacy/`` included),
never by a hand-kept list, so a newly registered method joins them at once. ``FAST`` only says
how to make each method's run tiny; a method without an entry there fails
``test_every_registered_method_has_fast_settings`` and every contract test of its own.
"""

from __future__ import annotations

import math

import pytest
import torch

from distill.task import coerce_settings
from distill.methods import (MethodConfig, available_methods, config_fields, distill,
                             make_config)
from distill.methods.base import generator, init_synthetic
from distill.synthetic import SyntheticSet

TINY_NET = {"width": 8, "depth": 1}
COMMON = dict(ipc=2, iterations=2, arch_kwargs=TINY_NET)
# Trajectory methods: one expert, two epochs, a two-step unroll.
_EXPERTS = dict(num_experts=1, expert_train_epochs=2, expert_epochs=1, max_start_epoch=0, syn_steps=2,
                expert_batch=64, dsa=False)
# DP methods: a fixed sigma (no calibration), and counts far above the threshold for the classes held.
_DP = dict(sigma=1.0, sample_rate=0.25, count_sigma=2.0, count_threshold=10.0)

# Per-method settings for a run of well under a second on one core; nothing here chooses which
# methods are tested (the registry does).
FAST: dict[str, dict] = {
    "dm": {"batch_real": 16},
    "dc": {"batch_real": 16, "outer_loop": 1, "inner_loop": 1},
    "dsa": {"batch_real": 16, "outer_loop": 1, "inner_loop": 1},
    "kip": {"batch_real": 24},
    "rfad": {"batch_real": 24, "n_models": 1},
    "frepo": {"batch_real": 24, "pool_size": 1, "max_online_steps": 2},
    "bptt": {"batch_real": 24, "inner_steps": 2, "truncate": 1},
    "cafe": {"batch_real": 24, "outer_loop": 1, "inner_loop": 1},
    "mtt": _EXPERTS,
    "dp-dm": {**_DP, "batch_real": 16},
    "dpsgd-gm": {**_DP, "outer_loop": 1, "inner_loop": 1, "chunk": 64},
    "dp-mtt": {**_DP, **_EXPERTS, "sample_rate": 0.5},
}

METHODS = available_methods()
# Methods whose noise comes from a secret generator unless the insecure test switch is on.
SECRET_NOISE = [m for m in METHODS if "insecure_reproducible_noise" in config_fields(m)]
PRESENT = [0, 1, 2, 3, 4, 5]  # the classes the contract's client holds; 6..9 are absent


@pytest.fixture(scope="module")
def held(small_train):
    """20 real images of each class in PRESENT, none of the others."""
    idx = torch.cat([small_train.class_indices()[c][:20] for c in PRESENT])
    return small_train.subset(idx)


@pytest.fixture
def config(tmp_path_factory):
    """``config(name, **changes)``: the method's tiny config; a fresh expert cache per call (so
    two runs train their experts afresh), and reproducible noise for DP methods (tests only)."""

    def build(name: str, **changes) -> MethodConfig:
        if name not in FAST:
            pytest.fail(f"method {name!r} is registered but has no entry in FAST ({__file__})")
        settings = {**COMMON, **FAST[name]}
        fields = config_fields(name)
        if "expert_cache" in fields:
            settings["expert_cache"] = str(tmp_path_factory.mktemp("experts"))
        if "insecure_reproducible_noise" in fields:
            settings["insecure_reproducible_noise"] = True
        return make_config(name, **{**settings, **changes})

    return build


def test_the_registry_lists_the_dp_methods_and_every_method_has_fast_settings():
    assert {"dp-dm", "dpsgd-gm", "dp-mtt"} <= set(METHODS) and {"dm", "mtt", "kip"} <= set(METHODS)
    missing, stale = sorted(set(METHODS) - set(FAST)), sorted(set(FAST) - set(METHODS))
    assert not missing, f"registered methods without FAST settings: {missing}"
    assert not stale, f"FAST settings for methods no longer registered: {stale}"


@pytest.mark.parametrize("name", METHODS)
def test_config_builds_by_name_and_refuses_unknown_settings(name, config):
    cfg = config(name)
    assert isinstance(cfg, MethodConfig) and cfg.method == name and cfg.ipc == 2
    with pytest.raises(ValueError, match="not_a_setting"):
        make_config(name, not_a_setting=1)
    with pytest.raises(ValueError, match="not-a-setting"):
        coerce_settings(name, {"not-a-setting": "1"})
    with pytest.raises(ValueError, match="ipc"):
        make_config(name, ipc=0)


@pytest.mark.parametrize("name", METHODS)
def test_distill_returns_a_finite_set_for_the_classes_held(name, held, config):
    before = held.images.clone()
    losses: list[tuple[int, float]] = []
    syn = distill(held, config(name), callback=lambda it, loss: losses.append((it, loss)))
    assert isinstance(syn, SyntheticSet)
    assert syn.images.shape == (2 * len(PRESENT), 1, 28, 28)  # pixels: ipc images per class held
    assert syn.hard_labels().tolist() == sorted(PRESENT * 2)  # none for the absent classes
    assert torch.isfinite(syn.images).all() and torch.isfinite(syn.labels.float()).all()
    if syn.soft_labels:  # learned labels stay distributions
        assert syn.labels.shape == (len(syn), 10)
        assert torch.allclose(syn.labels.sum(1), torch.ones(len(syn))) and (syn.labels >= 0).all()
    assert syn.lr is None or (math.isfinite(syn.lr) and syn.lr > 0)
    m = syn.meta
    assert (m.method, m.ipc, m.seed, m.iterations, m.dataset) == (name, 2, 0, 2, held.info)
    # the callback hears every outer iteration, with a finite loss
    assert [it for it, _ in losses] == [0, 1] and all(math.isfinite(loss) for _, loss in losses)
    assert torch.equal(held.images, before)  # the real data is left alone


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_set_other_seed_other_set(name, held, config):
    a, b = distill(held, config(name)), distill(held, config(name))  # each with experts trained afresh
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.lr == b.lr and a.meta == b.meta
    c = distill(held, config(name, seed=1))
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("name", SECRET_NOISE)
def test_dp_noise_is_secret_without_the_insecure_switch(name, held, config):
    """Two runs with one public seed differ: no seed replays the noise (each run with its own
    expert cache: a node reusing its own cached DP buffer is meant to get the same experts)."""
    a = distill(held, config(name, insecure_reproducible_noise=False))
    b = distill(held, config(name, insecure_reproducible_noise=False))
    assert not torch.equal(a.images, b.images)


@pytest.mark.parametrize("name", METHODS)
def test_kip_rho_frozen_pixels_stay_bit_identical(name, held, config):
    """Frozen pixels survive momentum (and anything else) because they are reparameterised."""
    rho = dict(rho=0.5, init="noise", **({"lr_img": 5.0} if "lr_img" in config_fields(name) else {}))
    start = distill(held, config(name, iterations=0, **rho))
    end = distill(held, config(name, iterations=3, **rho))
    mask = init_synthetic(held, config(name, **rho), generator(0)).param.mask.cpu()
    assert 0.45 < float(mask.float().mean()) < 0.55
    assert torch.equal(end.images[mask], start.images[mask])  # bit-identical
    assert not torch.equal(end.images[~mask], start.images[~mask])  # the rest moved
    assert end.meta.privacy["rho"] == 0.5
