"""DP experts for MTT: the buffer is the only release, accounted over every step of every expert."""

import json

import pytest
import torch

import privacy
from distill.experts import ExpertConfig, train_experts
from distill.methods import distill, make_config
from privacy import epsilon_of, privacy_plan, spends_from_meta
from privacy.dp_experts import dp_sgd_trainer

from .conftest import SMALL_NET

FAST = dict(ipc=1, iterations=3, arch_kwargs=SMALL_NET, num_experts=2, expert_train_epochs=2, expert_epochs=1,
            max_start_epoch=0, syn_steps=3, dsa=False, sample_rate=0.25, count_sigma=2.0, count_threshold=10.0)


def _cfg(tmp_path, **kw):
    return make_config("dp-mtt", **{**FAST, "expert_cache": str(tmp_path), **kw})


def test_registered_and_refuses_real_init(tmp_path):
    assert "dp-mtt" in privacy.DP_METHODS
    with pytest.raises(ValueError, match="init must be 'noise'"):
        _cfg(tmp_path, init="real")


def test_accounts_every_step_of_every_expert_and_matches_opacus(small_train, tmp_path):
    cfg = _cfg(tmp_path, epsilon=4.0)
    plan = privacy_plan(cfg)
    assert cfg.queries == 2 * 2 * 4  # experts x epochs x ceil(1 / sample_rate)
    syn = distill(small_train, cfg)
    p = syn.meta.privacy
    assert p["steps"] == 16 and p["sigma"] == plan.sigma
    assert 3.9 < p["epsilon"] <= 4.0 and p["epsilon"] == epsilon_of(spends_from_meta(p), 1e-5, "rdp")
    assert json.loads(p["spends"]) == [[2.0, 1.0, 1], [plan.sigma, 0.25, 16]]
    from opacus.accountants import RDPAccountant  # stepped by hand, independent of privacy/

    acc = RDPAccountant()
    acc.step(noise_multiplier=2.0, sample_rate=1.0)
    for _ in range(16):
        acc.step(noise_multiplier=plan.sigma, sample_rate=0.25)
    assert p["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    # nothing private is uploaded: every synthetic image differs from every real one
    flat_real = small_train.images.flatten(1)
    assert torch.cdist(syn.images.flatten(1), flat_real).min() > 1e-3
    # the DP buffer is cached under a tag that names its noise, apart from plain SGD experts
    names = [f.name for f in tmp_path.glob("*.npz")]
    assert len(names) == 1 and "-dp-secret-rdp-s" in names[0]


def test_reproducible_only_with_the_insecure_switch(small_train, tmp_path):
    a = distill(small_train, _cfg(tmp_path / "a", sigma=2.0, insecure_reproducible_noise=True))
    b = distill(small_train, _cfg(tmp_path / "b", sigma=2.0, insecure_reproducible_noise=True))  # trained afresh
    assert torch.equal(a.images, b.images) and a.meta.privacy == b.meta.privacy
    c = distill(small_train, _cfg(tmp_path / "c", sigma=2.0))
    d = distill(small_train, _cfg(tmp_path / "d", sigma=2.0))  # secret noise: no seed replays it
    assert not torch.equal(c.images, d.images)


def test_dp_trainer_moves_the_expert_and_checkpoints_every_epoch(small_train):
    cfg = make_config("dp-mtt", **{**FAST, "sigma": 1.0})
    experts = ExpertConfig(arch_kwargs=SMALL_NET, num_experts=1, epochs=2, dsa=False)
    trainer = dp_sgd_trainer(cfg, 1.0, torch.Generator().manual_seed(0), expected=0.25 * len(small_train))
    buffer = train_experts(small_train, experts, trainer=trainer)
    traj = buffer.trajectories[0]
    assert traj.shape[0] == 3 and not torch.equal(traj[0], traj[1]) and not torch.equal(traj[1], traj[2])
    assert buffer.meta["trainer"][0] == {"sigma": 1.0, "sample_rate": 0.25, "clip": 1.0, "steps": 8}


def test_time_limit_refused(tmp_path):
    with pytest.raises(ValueError, match="time_limit_s is not allowed under DP"):
        _cfg(tmp_path, time_limit_s=5.0)
