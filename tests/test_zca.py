"""ZCA whitening (distill/zca.py): it whitens, it inverts, its regulariser bounds the gain, and
a whitened dataset names its space."""

from __future__ import annotations

import pytest
import torch

from distill.data import Dataset, DatasetInfo, LabeledImages
from distill.zca import ZCA, whiten_dataset

INFO = DatasetInfo("toy", 2, 1, 4, 4, (0.0,), (1.0,))


def correlated(n: int, seed: int = 0) -> torch.Tensor:
    """Images whose 16 pixels are strongly correlated (a random mixing of a few sources)."""
    gen = torch.Generator().manual_seed(seed)
    sources = torch.randn(n, 16, generator=gen) * torch.tensor([5.0] * 4 + [0.5] * 12)
    mix = torch.randn(16, 16, generator=gen)
    return (sources @ mix + 3.0).reshape(n, 1, 4, 4)


def test_whitened_covariance_is_the_regularised_identity():
    x = correlated(20000)
    zca = ZCA.fit(x, eps=1e-3)
    w = zca.apply(x).flatten(1).double()
    cov = torch.cov(w.T)
    assert w.mean(0).abs().max() < 1e-3
    # eigenvalues of the whitened covariance are S / (S + eps): ~1 for every direction well above eps
    assert torch.allclose(cov, torch.eye(16, dtype=torch.float64), atol=0.02)
    raw = torch.cov(x.flatten(1).double().T)
    assert (raw - torch.diag(raw.diag())).abs().max() > 10  # it was far from white before


def test_invert_undoes_apply_and_fit_is_deterministic():
    x = correlated(500)
    a, b = ZCA.fit(x), ZCA.fit(x)
    assert torch.equal(a.whiten, b.whiten) and torch.equal(a.mean, b.mean)
    assert torch.allclose(a.invert(a.apply(x)), x, atol=1e-3)
    assert torch.allclose(a.whiten @ a.unwhiten, torch.eye(16), atol=1e-4)


def test_eps_bounds_the_gain_of_weak_directions():
    x = correlated(2000)
    x[:, :, 0, 0] = 1.0  # a pixel with no variance at all
    for eps in (0.1, 0.01):
        gain = torch.linalg.matrix_norm(ZCA.fit(x, eps).whiten, ord=2)
        assert gain <= eps ** -0.5 + 1e-3


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="N >= 2"):
        ZCA.fit(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="eps"):
        ZCA.fit(correlated(10), eps=0.0)


def test_whiten_dataset_fits_on_train_and_names_the_space():
    train = LabeledImages(correlated(400), torch.arange(400) % 2, INFO)
    test = LabeledImages(correlated(100, seed=1), torch.arange(100) % 2, INFO)
    white, zca = whiten_dataset(Dataset(train, test))
    assert white.info.name == "toy+zca" and white.test.info.name == "toy+zca"
    assert torch.allclose(white.train.images, zca.apply(train.images))
    assert torch.allclose(white.test.images, zca.apply(test.images))
    assert torch.equal(white.train.labels, train.labels)
    assert torch.allclose(zca.whiten, ZCA.fit(train.images).whiten)  # the train split alone
