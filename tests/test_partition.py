import numpy as np
import pytest

from distill.partition import class_histograms, partition

LABELS = np.random.default_rng(0).integers(0, 10, 5000)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_every_sample_in_exactly_one_partition_and_seeded(method):
    parts = partition(LABELS, 17, method, alpha=0.3, seed=4)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(LABELS) and len(np.unique(allidx)) == len(LABELS)
    again = partition(LABELS, 17, method, alpha=0.3, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(LABELS, 17, method, alpha=0.3, seed=5)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def _skew(parts):
    h = class_histograms(LABELS, parts, 10).astype(float)
    return float(np.mean(h.max(1) / np.maximum(h.sum(1), 1)))


def test_dirichlet_follows_alpha():
    skews = [_skew(partition(LABELS, 20, "dirichlet", alpha=a, seed=0)) for a in (0.05, 0.5, 100.0)]
    assert skews[0] > skews[1] > skews[2]
    assert skews[0] > 0.6 and skews[2] < 0.2  # IID-like at large alpha: max class share ~ 0.1


def test_shards_give_few_classes_per_client():
    h = class_histograms(LABELS, partition(LABELS, 50, "shards", shards_per_client=2, seed=0), 10)
    assert (np.count_nonzero(h, axis=1) <= 4).all()  # a shard may straddle a class boundary


def test_histograms_and_errors():
    parts = partition(LABELS, 5, "iid")
    assert class_histograms(LABELS, parts, 10).sum() == len(LABELS)
    with pytest.raises(ValueError, match="unknown partitioner"):
        partition(LABELS, 5, "zipf")
    with pytest.raises(ValueError, match="alpha"):
        partition(LABELS, 5, "dirichlet", alpha=0)
    with pytest.raises(ValueError, match="min_size|>= 1"):
        partition(LABELS, 0, "iid")
