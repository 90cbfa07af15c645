"""Trigger stamping is exact; poisoning relabels what it stamps; ASR/CTA behave; DOORPING's trigger moves."""

import numpy as np
import pytest
import torch

from attacks.backdoor import Trigger, attack_success_rate, clean_test_accuracy, poison
from attacks.doorping import SUPPORTED, DoorpingConfig, doorping_distill
from distill.methods import distill, make_config
from distill.methods.base import RealSampler
from distill.networks import seeded_network
from distill.train import TrainConfig, train_network

from .conftest import SMALL_NET
from .test_method_contract import FAST


@pytest.mark.parametrize("corner", ["bottom-right", "top-left"])
def test_stamp_changes_only_the_patch_to_the_given_value(mnist, corner):
    x = mnist.test.images[:5]
    t = Trigger.solid(mnist.info, size=3, value=1.0, margin=1, corner=corner)
    y = t.stamp(x)
    changed = (y != x).any(dim=(0, 1))
    rows, cols = (slice(24, 27), slice(24, 27)) if corner == "bottom-right" else (slice(1, 4), slice(1, 4))
    expect = torch.zeros(28, 28, dtype=torch.bool)
    expect[rows, cols] = True
    assert not (changed & ~expect).any()  # nothing outside the patch moved
    white = (1.0 - 0.1307) / 0.3081
    assert torch.allclose(y[:, :, rows, cols], torch.full_like(y[:, :, rows, cols], white))
    assert torch.equal(x, mnist.test.images[:5])  # the input is not modified


def test_poison_stamps_and_relabels_exactly_the_chosen_fraction(small_train):
    t = Trigger.solid(small_train.info, size=2)
    data, idx = poison(small_train, t, fraction=0.1, target=0, seed=0)
    assert len(idx) == 60 and (small_train.labels[idx] != 0).all()
    assert (data.labels[idx] == 0).all()
    rest = np.setdiff1d(np.arange(len(small_train)), idx)
    assert torch.equal(data.images[rest], small_train.images[rest]) and torch.equal(data.labels[rest], small_train.labels[rest])
    assert torch.equal(data.images[idx], t.stamp(small_train.images[idx]))
    with pytest.raises(ValueError):
        poison(small_train, t, fraction=1.5, target=0)


def test_asr_high_on_a_model_trained_on_poisoned_data_and_low_on_a_clean_one(small_train, mnist):
    t = Trigger.solid(small_train.info, size=4)
    cfg = TrainConfig(arch="mlp", arch_kwargs={"width": 64}, epochs=30, lr=0.05, batch_size=64, dsa=False)
    test = mnist.test.subset(np.arange(500))
    asr, cta = {}, {}
    for name, frac in (("clean", 0.0), ("poisoned", 0.2)):
        data, _ = poison(small_train, t, fraction=frac, target=0, seed=0)
        net = train_network(seeded_network("mlp", 1, 10, (28, 28), seed=0, width=64), data.images, data.labels, cfg)
        asr[name], cta[name] = attack_success_rate(net, test, t, 0), clean_test_accuracy(net, test)
    assert asr["poisoned"] > 0.8 and asr["clean"] < 0.2, asr
    assert cta["clean"] > 0.7 and cta["poisoned"] > 0.6, cta


def test_doorping_trigger_changes_during_distillation_and_real_data_carry_the_latest(small_train):
    method = make_config("dm", ipc=1, iterations=6, arch_kwargs=SMALL_NET, batch_real=32)
    cfg = DoorpingConfig(target=0, fraction=0.05, size=3, update_every=2, trigger_steps=10, proxy_steps=5)
    syn, trigger, updater = doorping_distill(small_train, method, cfg)
    assert len(updater.history) == 4  # the start + an update after iterations 2, 4, 6
    for before, after in zip(updater.history, updater.history[1:]):
        assert not torch.equal(before, after)
    assert torch.equal(trigger.pattern, updater.history[-1])
    info = small_train.info
    lo, hi = (0 - info.mean[0]) / info.std[0], (1 - info.mean[0]) / info.std[0]
    assert trigger.pattern.min() >= lo - 1e-6 and trigger.pattern.max() <= hi + 1e-6
    poisoned = updater.data.images[updater.poisoned]
    assert torch.equal(poisoned, trigger.stamp(poisoned))
    assert len(syn) == 10 and torch.isfinite(syn.images).all()


def test_doorping_warm_up_moves_the_trigger_before_distillation_starts(small_train):
    """With warm-up rounds the poisoned real images carry an optimised trigger before the first
    iteration, so a real-initialised set starts from it; the history counts warm-up updates too."""
    method = make_config("dm", ipc=1, iterations=2, arch_kwargs=SMALL_NET, batch_real=32)
    cfg = DoorpingConfig(target=0, fraction=0.05, size=3, update_every=2, trigger_steps=10, proxy_steps=5,
                         warmup_rounds=3)
    _, trigger, updater = doorping_distill(small_train, method, cfg)
    assert len(updater.history) == 1 + 3 + 1  # start, 3 warm-up rounds, one update after iteration 2
    assert not torch.equal(updater.history[0], updater.history[3])
    assert torch.equal(trigger.pattern, updater.history[-1])
    with pytest.raises(ValueError):
        DoorpingConfig(warmup_rounds=-1)


def test_doorping_white_start_begins_from_the_naive_trigger_and_stays_in_range(small_train):
    method = make_config("dm", ipc=1, iterations=2, arch_kwargs=SMALL_NET, batch_real=32)
    cfg = DoorpingConfig(target=0, fraction=0.05, size=3, update_every=1, trigger_steps=10, proxy_steps=5,
                         start="white")
    _, trigger, updater = doorping_distill(small_train, method, cfg)
    assert torch.equal(updater.history[0], Trigger.solid(small_train.info, size=3).pattern)
    info = small_train.info
    lo, hi = (0 - info.mean[0]) / info.std[0], (1 - info.mean[0]) / info.std[0]
    assert trigger.pattern.min() >= lo - 1e-6 and trigger.pattern.max() <= hi + 1e-6
    with pytest.raises(ValueError, match="start"):
        DoorpingConfig(start="black")


@pytest.mark.parametrize("method_name", SUPPORTED)
def test_every_supported_method_samples_the_tensor_doorping_restamps(small_train, monkeypatch, method_name):
    """DOORPING re-stamps the poisoned real images in place; a method only learns the latest trigger
    if its real-batch sampler holds that very tensor rather than a copy."""
    held = []
    original = RealSampler.__init__

    def recording_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        held.append(self.images)

    monkeypatch.setattr(RealSampler, "__init__", recording_init)
    method = make_config(method_name, ipc=1, iterations=2, arch_kwargs=SMALL_NET, **FAST[method_name])
    cfg = DoorpingConfig(target=0, fraction=0.05, size=3, update_every=1, trigger_steps=2, proxy_steps=1)
    syn, trigger, updater = doorping_distill(small_train, method, cfg)
    assert held and all(t is updater.data.images for t in held)
    assert len(updater.history) == 3 and torch.isfinite(syn.images).all()


@pytest.mark.parametrize("method_name", SUPPORTED)
def test_initial_sources_replay_each_methods_real_initialisation(small_train, method_name):
    """DOORPING finds its carriers by replaying the initial draws; that holds only if every method
    initialises first from ``generator(seed)``: with no iterations, the set is those real images."""
    from distill.methods.base import initial_sources

    method = make_config(method_name, ipc=3, iterations=0, seed=5, arch_kwargs=SMALL_NET, **FAST[method_name])
    syn = distill(small_train, method)
    sources = initial_sources(small_train, method)
    assert torch.equal(syn.images, small_train.images[sources])
    assert torch.equal(syn.hard_labels(), small_train.labels[sources])
    with pytest.raises(ValueError, match="init"):
        initial_sources(small_train, make_config(method_name, init="noise"))


def test_doorping_restamps_the_final_trigger_on_exactly_the_carriers(small_train):
    from attacks.doorping import carrier_rows

    method = make_config("dm", ipc=10, iterations=4, arch_kwargs=SMALL_NET, batch_real=32)
    base = dict(target=0, fraction=0.2, size=3, update_every=2, trigger_steps=5, proxy_steps=3)
    stale, _, _ = doorping_distill(small_train, method, DoorpingConfig(**base, restamp=False))
    syn, trigger, updater = doorping_distill(small_train, method, DoorpingConfig(**base))
    rows = carrier_rows(updater.data, updater.poisoned.numpy(), method)
    assert len(rows) and (syn.hard_labels()[rows] == 0).all()  # carriers are relabelled poisoned images
    assert torch.equal(syn.images[rows], trigger.stamp(stale.images[rows]))  # exactly the final patch
    assert not torch.equal(stale.images[rows], syn.images[rows])  # the run without it kept stale patches
    rest = np.setdiff1d(np.arange(len(syn)), rows)
    assert torch.equal(syn.images[rest], stale.images[rest])  # nothing else differs
    noise = make_config("dm", ipc=10, iterations=1, init="noise", arch_kwargs=SMALL_NET)
    assert len(carrier_rows(updater.data, updater.poisoned.numpy(), noise)) == 0


def test_doorping_extra_terms_change_the_trigger_and_contrast_moves_it_off_the_clean_corner(small_train):
    method = make_config("dm", ipc=1, iterations=2, arch_kwargs=SMALL_NET, batch_real=32)
    base = dict(target=0, fraction=0.05, size=3, update_every=1, trigger_steps=10, proxy_steps=5)
    paper = doorping_distill(small_train, method, DoorpingConfig(**base, target_weight=0.0, contrast_weight=0.0))[1]
    target = doorping_distill(small_train, method, DoorpingConfig(**base, target_weight=1.0, contrast_weight=0.0))[1]
    contrast = doorping_distill(small_train, method, DoorpingConfig(**base, target_weight=0.0, contrast_weight=10.0))[1]
    assert not torch.equal(paper.pattern, target.pattern)
    rows, cols = paper.region(28, 28)
    corner = small_train.images[:, :, rows, cols].mean(0)
    assert (contrast.pattern - corner).square().mean() > (paper.pattern - corner).square().mean() + 1.0
    with pytest.raises(ValueError, match="contrast_weight"):
        DoorpingConfig(contrast_weight=-1.0)
    with pytest.raises(ValueError, match="target_weight"):
        DoorpingConfig(target_weight=-1.0)


def test_carrier_set_holds_exactly_the_asked_triggered_non_target_images(small_train):
    from attacks.capacity import carrier_set

    t = Trigger.solid(small_train.info, size=3)
    s = carrier_set(small_train, t, ipc=5, carriers=3, target=0, seed=1)
    assert len(s) == 50 and (torch.bincount(s.labels, minlength=10) == 5).all()
    rows, cols = t.region(28, 28)
    stamped = (s.images[:, :, rows, cols] == t.pattern).flatten(1).all(1)
    carriers = s.images[stamped]
    assert stamped.sum() == 3 and (s.labels[stamped] == 0).all()
    # each carrier is a non-target real image, stamped and relabelled
    src = small_train.images[small_train.labels != 0]
    assert all(any(torch.equal(t.stamp(src[j:j + 1])[0], c) for j in range(len(src))) for c in carriers)
    with pytest.raises(ValueError, match="carriers"):
        carrier_set(small_train, t, ipc=5, carriers=6, target=0)
