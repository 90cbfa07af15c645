"""MTT's expert buffer (format, cache, trainer hook) and loop; CAFE's losses and features."""

import dataclasses

import numpy as np
import pytest
import torch

from distill.experts import (CACHE_ENV, ExpertBuffer, ExpertConfig, ParamLayout, cache_dir, cache_path,
                             load_or_train_experts, sgd_trainer, train_experts)
from distill.methods import distill, make_config
from distill.methods.cafe import cafe_loss, discrimination_loss
from distill.methods.mtt import distill_from_experts, normalized_distance
from distill.networks import seeded_network

from .conftest import SMALL_NET

TINY = ExpertConfig(arch_kwargs=SMALL_NET, num_experts=2, epochs=2, dsa=False)
MTT = dict(ipc=1, arch_kwargs=SMALL_NET, num_experts=1, expert_train_epochs=2, expert_epochs=1,
           max_start_epoch=0, syn_steps=4, dsa=False, init="noise")


@pytest.fixture(scope="module")
def tiny_data(small_train):
    idx = torch.cat([i[:20] for i in small_train.class_indices()])
    return small_train.subset(idx)


@pytest.fixture(scope="module")
def buffer(tiny_data):
    return train_experts(tiny_data, TINY)


def test_buffer_round_trips_bit_exactly(buffer, tmp_path):
    assert buffer.trajectories.shape == (2, 3, buffer.layout.size)
    assert not torch.equal(buffer.trajectories[0, 0], buffer.trajectories[1, 0])  # experts differ
    back = ExpertBuffer.load(buffer.save(tmp_path / "b.npz"))
    assert torch.equal(back.trajectories, buffer.trajectories)
    assert back.layout == buffer.layout and back.meta == buffer.meta
    assert not list(tmp_path.glob("*.tmp*"))  # the temp file was renamed into place


def test_buffer_refuses_pickled_and_foreign_content(buffer, tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, trajectories=buffer.trajectories.numpy(), meta_json=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="refused"):
        ExpertBuffer.load(path)
    np.savez(path, trajectories=buffer.trajectories.numpy(), meta_json=np.asarray("{}"), extra=np.zeros(1))
    with pytest.raises(ValueError, match="expected keys"):
        ExpertBuffer.load(path)
    with pytest.raises(ValueError, match="float32"):
        ExpertBuffer(buffer.trajectories.double(), buffer.layout, {})


def test_cache_hit_reuses_the_buffer_without_training(tiny_data, tmp_path):
    calls = []

    def counting(net, data, config, gen, checkpoint):
        calls.append(1)
        return {**sgd_trainer(net, data, config, gen, checkpoint), "epsilon": 1.5}

    first = load_or_train_experts(tiny_data, TINY, trainer=counting, tag="counting", directory=tmp_path)
    again = load_or_train_experts(tiny_data, TINY, trainer=counting, tag="counting", directory=tmp_path)
    assert len(calls) == TINY.num_experts  # the second call trained nothing
    assert torch.equal(first.trajectories, again.trajectories)
    assert again.meta["trainer"] == [{"epsilon": 1.5}] * 2  # a DP trainer's figures travel with the buffer
    # the key covers the data, the settings and the trainer's tag
    assert cache_path(tiny_data, TINY, "counting", tmp_path) != cache_path(tiny_data, TINY, "sgd", tmp_path)
    other = dataclasses.replace(TINY, lr=0.02)
    assert cache_path(tiny_data, TINY, "sgd", tmp_path) != cache_path(tiny_data, other, "sgd", tmp_path)
    assert cache_path(tiny_data.subset(torch.arange(10)), TINY, "sgd", tmp_path) != cache_path(tiny_data, TINY, "sgd", tmp_path)
    with pytest.raises(ValueError, match="own cache tag"):
        load_or_train_experts(tiny_data, TINY, trainer=counting, directory=tmp_path)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert str(cache_dir()).endswith(".cache/fedistill/experts")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "cfg") == tmp_path / "cfg"  # the config field wins


def test_normalized_distance_is_zero_on_target_and_one_at_start():
    start, target = torch.randn(50), torch.randn(50)
    assert float(normalized_distance(target, start, target)) == 0.0
    assert float(normalized_distance(start, start, target)) == pytest.approx(1.0)
    halfway = (start + target) / 2
    assert float(normalized_distance(halfway, start, target)) == pytest.approx(0.25)


def test_mtt_loss_decreases_and_lr_is_learned(tiny_data, buffer):
    losses = []
    cfg = make_config("mtt", iterations=20, lr_img=1000.0, lr_lr=0.05, **MTT)
    small = ExpertBuffer(buffer.trajectories[:1], buffer.layout, buffer.meta)
    syn = distill_from_experts(tiny_data, cfg, small, callback=lambda i, loss: losses.append(loss))
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert syn.lr is not None and syn.lr > 0 and abs(syn.lr - cfg.student_lr) > 1e-4
    assert syn.meta.extra["syn_steps"] == 4


def test_mtt_uses_and_checks_the_cache(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    cfg = make_config("mtt", iterations=1, **MTT)
    distill(tiny_data, cfg)
    assert len(list(tmp_path.glob("mnist10k-convnet-sgd-*.npz"))) == 1
    with pytest.raises(ValueError, match="expert_train_epochs"):
        make_config("mtt", max_start_epoch=9, expert_epochs=2, expert_train_epochs=10)
    wrong = ExpertBuffer(torch.zeros(1, 3, 5), ParamLayout((("w", (5,)),)), {})
    with pytest.raises(ValueError, match="layout"):
        distill_from_experts(tiny_data, cfg, wrong)


def test_block_outputs_end_at_the_embedding():
    net = seeded_network("convnet", 1, 10, (28, 28), seed=0, width=8, depth=3)
    x = torch.randn(2, 1, 28, 28)
    blocks = net.block_outputs(x)
    assert [tuple(b.shape) for b in blocks] == [(2, 8, 14, 14), (2, 8, 7, 7), (2, 8, 3, 3)]
    assert torch.equal(blocks[-1].flatten(1), net.embed(x))
    mlp = seeded_network("mlp", 1, 10, (28, 28), seed=0)
    assert torch.equal(mlp.block_outputs(x)[-1].flatten(1), mlp.embed(x))


def test_discrimination_loss_prefers_separated_centres():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels, present = torch.tensor([0, 2]), torch.tensor([0, 2])
    good = torch.tensor([[3.0, 0.0], [9.0, 9.0], [0.0, 3.0]])  # row 1 (absent class) is ignored
    bad = torch.tensor([[0.0, 3.0], [9.0, 9.0], [3.0, 0.0]])
    assert discrimination_loss(feats, labels, good, present) < 0.1 < discrimination_loss(feats, labels, bad, present)


def _cafe_objective(syn, real, seeds=(21, 22)):
    x = torch.cat([real.images[real.labels == c][:30] for c in range(10)])
    y = torch.arange(10).repeat_interleave(30)
    total = 0.0
    for s in seeds:
        net = seeded_network("convnet", 1, 10, (28, 28), seed=s, **SMALL_NET)
        total += cafe_loss(net, syn.images, syn.labels, x, y, 10, 0.1, None, torch.Generator()).item()
    return total


def test_cafe_loss_decreases(small_train):
    settings = dict(ipc=1, init="noise", arch_kwargs=SMALL_NET, batch_real=100, outer_loop=2, inner_loop=1)
    start = distill(small_train, make_config("cafe", iterations=0, **settings))
    syn = distill(small_train, make_config("cafe", iterations=15, lr_img=10.0, **settings))
    assert _cafe_objective(syn, small_train) < 0.5 * _cafe_objective(start, small_train)
