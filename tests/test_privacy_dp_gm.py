"""DP gradient matching: the noisy gradient is DP-SGD's, the run is accounted and reproducible."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule

from distill.methods import distill, make_config
from distill.networks import seeded_network
from privacy.dp_gm import noisy_gradient

from .conftest import SMALL_NET

FAST = dict(ipc=2, iterations=2, outer_loop=2, inner_loop=1, arch_kwargs=SMALL_NET, sample_rate=0.2,
            count_sigma=2.0, count_threshold=10.0, sigma=1.0)


def test_noisy_gradient_is_the_clipped_mean_gradient(small_train):
    """q = 1 and negligible noise: the release is sum of per-example clipped gradients / N."""
    data = small_train.subset(torch.arange(0, 600, 50))  # 12 examples
    net = seeded_network("convnet", 1, 10, (28, 28), seed=3, **SMALL_NET)
    cfg = make_config("dpsgd-gm", **{**FAST, "sample_rate": 1.0, "sigma": 1e-9, "clip": 0.05, "chunk": 5})
    got = noisy_gradient(GradSampleModule(copy.deepcopy(net), loss_reduction="sum"), data, cfg, cfg.sigma,
                         lambda x: x, torch.Generator().manual_seed(0), expected=float(len(data)))
    want = [torch.zeros_like(p) for p in net.parameters()]
    for i in range(len(data)):
        g = torch.autograd.grad(F.cross_entropy(net(data.images[i:i + 1]), data.labels[i:i + 1]),
                                list(net.parameters()))
        scale = min(1.0, 0.05 / float(torch.sqrt(sum((t ** 2).sum() for t in g))))
        for w, t in zip(want, g):
            w.add_(t * scale / len(data))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))


def test_reproducible_accounted_and_far_from_private_images(small_train):
    cfg = make_config("dpsgd-gm", **FAST, insecure_reproducible_noise=True)
    a, b = distill(small_train, cfg), distill(small_train, cfg)
    assert torch.equal(a.images, b.images) and a.labels.tolist() == sorted(list(range(10)) * 2)
    secret = make_config("dpsgd-gm", **FAST)  # the default: noise no seed can replay
    assert not torch.equal(distill(small_train, secret).images, distill(small_train, secret).images)
    p = a.meta.privacy
    assert p["steps"] == 4 and json.loads(p["spends"]) == [[2.0, 1.0, 1], [1.0, 0.2, 4]]
    assert torch.cdist(a.images.flatten(1), small_train.images.flatten(1)).min() > 1.0
    start = distill(small_train, make_config("dpsgd-gm", **{**FAST, "iterations": 0}))
    assert (a.images - start.images).abs().mean() > 1e-3  # the images moved


def test_the_divisor_is_the_noisy_total_never_the_exact_size(small_train, monkeypatch):
    """A server that knew the divisor would learn len(real): it must be q x the released noisy total."""
    import privacy.dp_gm as dp_gm

    seen = []
    real_noisy_gradient = dp_gm.noisy_gradient

    def spy(*args, **kwargs):
        seen.append(args[-1] if len(args) >= 7 else kwargs["expected"])
        return real_noisy_gradient(*args, **kwargs)

    monkeypatch.setattr(dp_gm, "noisy_gradient", spy)
    counts = tuple(70.0 for _ in range(10))  # released before; the data holds 60 a class
    distill(small_train, make_config("dpsgd-gm", **{**FAST, "iterations": 1}, released_counts=counts))
    assert seen and all(e == pytest.approx(FAST["sample_rate"] * 700) for e in seen)
    assert len(small_train) == 600
