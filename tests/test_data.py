import numpy as np
import pytest
import torch

from distill.data import BUNDLED, bundled_path, load_dataset, load_npz


def test_bundled_sample_loads_offline_with_mnist_normalisation(mnist):
    assert (len(mnist.train), len(mnist.test)) == (8000, 2000)
    assert mnist.info.image_shape == (1, 28, 28) and mnist.info.num_classes == 10
    assert mnist.train.images.dtype == torch.float32 and mnist.train.labels.dtype == torch.int64
    assert abs(float(mnist.train.images.mean())) < 0.05
    assert abs(float(mnist.train.images.std()) - 1.0) < 0.05
    assert mnist.train.class_histogram().tolist() == [801, 902, 793, 826, 784, 690, 811, 856, 755, 782]
    assert bundled_path().is_file()


def test_npz_source_accepts_colour_images(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), y_train=np.arange(20) % 4,
             x_test=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), y_test=np.arange(8) % 4)
    ds = load_npz(path)
    assert ds.info.image_shape == (3, 8, 8) and ds.info.num_classes == 4
    assert ds.train.images.shape == (20, 3, 8, 8)


def test_npz_missing_keys_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="lacks keys"):
        load_npz(path)


def test_offline_torchvision_names_the_bundled_alternative(tmp_path):
    with pytest.raises(RuntimeError, match=BUNDLED):
        load_dataset("fashionmnist", root=tmp_path, download=False)


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ValueError, match="cifar10"):
        load_dataset("imagenet")


def test_bundled_path_env_override(tmp_path, monkeypatch):
    from distill.data import BUNDLED_ENV

    copy = tmp_path / "sample.npz"
    copy.write_bytes(bundled_path().read_bytes())
    monkeypatch.setenv(BUNDLED_ENV, str(copy))
    assert bundled_path() == copy
    monkeypatch.setenv(BUNDLED_ENV, str(tmp_path / "missing.npz"))
    with pytest.raises(FileNotFoundError, match=BUNDLED_ENV):
        bundled_path()


def test_class_filters_keep_order_and_pick_the_right_samples(mnist):
    data = mnist.test
    sub = data.of_classes(np.array([7, 2]))
    assert set(sub.labels.tolist()) == {2, 7} and len(sub) == int((data.labels == 2).sum() + (data.labels == 7).sum())
    idx = torch.nonzero((data.labels == 2) | (data.labels == 7)).flatten()
    assert torch.equal(sub.images, data.images[idx])  # original order
    first = data.first_per_class(3)
    assert first.class_histogram().tolist() == [3] * 10
    assert torch.equal(first.images[:3], data.images[data.class_indices()[0][:3]])
