"""The DP-SGD baseline: spends what Opacus says, at the target, reproducibly."""

import torch

from privacy.accounting import Spend, epsilon_of
from privacy.dpsgd_baseline import DPSGDConfig, train_dpsgd

from .conftest import SMALL_NET


def test_dpsgd_baseline_spends_target_epsilon_reproducibly_only_with_insecure_noise(small_train):
    cfg = DPSGDConfig(epsilon=4.0, epochs=1, batch_size=64, arch_kwargs=SMALL_NET, insecure_reproducible_noise=True)
    a, b = train_dpsgd(small_train, cfg), train_dpsgd(small_train, cfg)
    assert 3.9 < a.epsilon <= 4.0 and a.accountant == "rdp"
    assert a.epsilon == epsilon_of([Spend(a.sigma, a.sample_rate, a.steps)], 1e-5, "rdp")
    assert a.steps == round(1 / a.sample_rate)
    assert all(torch.equal(x, y) for x, y in zip(a.net.state_dict().values(), b.net.state_dict().values()))
    secret = DPSGDConfig(epsilon=4.0, epochs=1, batch_size=64, arch_kwargs=SMALL_NET)
    c, d = train_dpsgd(small_train, secret), train_dpsgd(small_train, secret)
    assert not all(torch.equal(x, y) for x, y in zip(c.net.state_dict().values(), d.net.state_dict().values()))
