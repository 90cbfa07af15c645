import numpy as np
import pytest
import torch

from distill.data import DatasetInfo
from distill.synthetic import SetMetadata, SyntheticSet

INFO = DatasetInfo("mnist10k", 10, 1, 28, 28, (0.1307,), (0.3081,))


def _set(soft=False, lr=None):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(20, 1, 28, 28, generator=g)
    labels = torch.softmax(torch.randn(20, 10, generator=g), 1) if soft else torch.arange(20) % 10
    meta = SetMetadata(INFO, "dm", 2, seed=3, client="7", round=2, privacy={"epsilon": 1.5}, extra={"init": "noise"})
    return SyntheticSet(images, labels, meta, lr)


@pytest.mark.parametrize("soft,lr", [(False, None), (True, 0.0123)])
def test_save_load_round_trips_bit_exactly(tmp_path, soft, lr):
    s = _set(soft, lr)
    loaded = SyntheticSet.load(s.save(tmp_path / "s.npz"))
    assert torch.equal(loaded.images, s.images) and torch.equal(loaded.labels, s.labels)
    assert loaded.meta == s.meta
    assert loaded.lr == (None if lr is None else pytest.approx(lr))
    assert not list(tmp_path.glob("*.tmp*"))  # atomic write leaves no temp file


def test_wire_arrays_round_trip():
    s = _set()
    back = SyntheticSet.from_arrays(s.to_arrays(), SetMetadata.from_dict(s.meta.to_dict()))
    assert torch.equal(back.images, s.images) and back.meta == s.meta
    assert s.nbytes() == 20 * 28 * 28 * 4 + 20 * 8


def test_pickled_content_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, images=np.array([{"a": 1}], dtype=object), labels=np.zeros(1, np.int64),
             meta_json=np.asarray("{}"))
    with pytest.raises(ValueError, match="refused|pickle"):
        SyntheticSet.load(path)


@pytest.mark.parametrize("change,reason", [
    ({"images": np.zeros((2, 1, 28, 28), np.float64)}, "float32"),
    ({"images": np.zeros((2, 3, 28, 28), np.float32)}, "shape"),
    ({"images": np.full((2, 1, 28, 28), np.nan, np.float32)}, "NaN"),
    ({"labels": np.array([0, 10], np.int64)}, "label-range: labels span"),
    ({"labels": np.array([0, 1, 2], np.int64)}, r"shape: labels \(3,\) int64 for 2 images"),
    ({"labels": np.zeros((2, 9), np.float32)}, r"shape: labels \(2, 9\) float32"),
    ({"extra": np.zeros(1)}, "unexpected"),
])
def test_bad_arrays_are_rejected_with_a_reason(change, reason):
    arrays = {"images": np.zeros((2, 1, 28, 28), np.float32), "labels": np.array([0, 1], np.int64)}
    arrays.update(change)
    with pytest.raises(ValueError, match=reason):
        SyntheticSet.from_arrays(arrays, _set().meta)


def test_sets_without_factors_are_unchanged(tmp_path):
    s = _set(lr=0.5)
    assert s.factors is None and set(s.to_arrays()) == {"images", "labels", "lr"}
    loaded = SyntheticSet.load(s.save(tmp_path / "s.npz"))
    assert loaded.factors is None
    with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
        assert sorted(f.files) == ["images", "labels", "lr", "meta_json"]
    with pytest.raises(ValueError, match="needs images or factors"):
        SyntheticSet(None, s.labels, s.meta)
