"""The Gaussian mechanism's pieces: clipping bounds (rows and per-example gradients), noise scale."""

import copy

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule

from distill.networks import seeded_network
from privacy.noise import clip_and_sum_grad_samples, clip_rows, noisy_class_sums, poisson_sample

from .conftest import SMALL_NET


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 20), d=st.integers(1, 50), clip=st.floats(0.01, 10.0), scale=st.floats(1e-3, 1e3),
       seed=st.integers(0, 2**16))
def test_clip_rows_bounds_norm_and_keeps_small_rows(n, d, clip, scale, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    y = clip_rows(x, clip)
    assert (y.norm(dim=1) <= clip * (1 + 1e-9)).all()
    small = x.norm(dim=1) < 0.5 * clip
    assert torch.allclose(y[small], x[small], rtol=1e-5)


def test_per_example_gradients_are_clipped_to_c(small_train):
    """Opacus's per-sample gradients, flat-clipped: each example's contribution has norm <= C."""
    net = seeded_network("convnet", 1, 10, (28, 28), seed=0, **SMALL_NET)
    gsm = GradSampleModule(copy.deepcopy(net), loss_reduction="sum")
    x, y = small_train.images[:12], small_train.labels[:12]
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    samples = [p.grad_sample for p in gsm.parameters()]
    # per-example gradients agree with an explicit loop
    g3 = torch.autograd.grad(F.cross_entropy(net(x[3:4]), y[3:4], reduction="sum"), list(net.parameters()))
    assert all(torch.allclose(s[3], g, atol=1e-5) for s, g in zip(samples, g3))
    clip = 0.1
    for i in range(12):
        one = clip_and_sum_grad_samples([s[i:i + 1] for s in samples], clip)
        assert torch.sqrt(sum((g ** 2).sum() for g in one)) <= clip * (1 + 1e-4)
    total = clip_and_sum_grad_samples(samples, clip)
    assert torch.sqrt(sum((g ** 2).sum() for g in total)) <= 12 * clip * (1 + 1e-4)


def test_noise_std_is_sigma_times_clip():
    gen = torch.Generator().manual_seed(0)
    sigma, clip, k, d = 1.7, 0.3, 10, 5000
    feats = torch.zeros(0, d)  # an empty batch: the release is pure noise
    out = noisy_class_sums(feats, torch.zeros(0, dtype=torch.long), k, clip, sigma, gen)
    # std of 50,000 normals estimates sigma*C within ~0.3% (1 std); allow 1.5%
    assert abs(out.std().item() / (sigma * clip) - 1) < 0.015 and abs(out.mean().item()) < 0.01


def test_noisy_class_sums_sensitivity():
    """Adding one example moves the noise-free release by at most C (same noise draw)."""
    feats = torch.randn(30, 8) * 5
    labels = torch.arange(30) % 3
    a = noisy_class_sums(feats[:29], labels[:29], 3, 1.0, 1.0, torch.Generator().manual_seed(1))
    b = noisy_class_sums(feats, labels, 3, 1.0, 1.0, torch.Generator().manual_seed(1))
    assert (b - a).norm() <= 1.0 + 1e-5


def test_poisson_sample_rate():
    idx = poisson_sample(100_000, 0.03, torch.Generator().manual_seed(0))
    assert abs(len(idx) - 3000) < 4 * (100_000 * 0.03 * 0.97) ** 0.5
