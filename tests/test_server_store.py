"""Run store and pool: atomic writes, safe checkpoint loading, latest-set-per-client merging."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.data import load_dataset
from distill.synthetic import SetMetadata, SyntheticSet
from server.pool import SyntheticPool
from server.store import RunStore, atomic_write, read_metrics
from distill.upload import Expectation, validate_set
from server.validate import Rejected

INFO = load_dataset().info


def _set(n: int, label: int = 0, soft: bool = False) -> SyntheticSet:
    labels = torch.full((n,), label, dtype=torch.long)
    if soft:
        labels = torch.nn.functional.one_hot(labels, 10).float()
    return SyntheticSet(torch.zeros(n, 1, 28, 28), labels, SetMetadata(INFO, "dm", 10))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")

    def boom(f):
        f.write("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_store_round_trips_metrics_sets_and_model(tmp_path):
    store = RunStore.create(tmp_path, "t")
    store.append_metrics({"round": 1, "accuracy": 0.5})
    store.append_metrics({"round": 2, "accuracy": 0.6})
    assert [m["round"] for m in read_metrics(store.root)] == [1, 2]
    store.save_set(_set(3), 1, 42)
    assert len(SyntheticSet.load(store.root / "sets" / "round001-node42.npz")) == 3
    store.save_model({"w": torch.ones(2)})
    assert torch.equal(store.load_model()["w"], torch.ones(2))


class Payload:
    """Stands for any object whose unpickling could run code."""


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    store = RunStore(tmp_path)
    torch.save({"w": torch.ones(1), "evil": Payload()}, tmp_path / "global_model.pt")
    with pytest.raises(pickle.UnpicklingError):
        store.load_model()


def test_pool_keeps_the_latest_set_per_client_and_merges_soft_with_hard():
    pool = SyntheticPool()
    pool.update(1, _set(2, 0))
    pool.update(2, _set(3, 1))
    pool.update(1, _set(4, 2))  # client 1's newer set replaces its older one
    images, labels = pool.merged()
    assert len(pool) == 2 and images.shape[0] == 7 and sorted(labels.tolist()) == [1] * 3 + [2] * 4
    pool.update(3, _set(1, 5, soft=True))
    _, labels = pool.merged()
    assert labels.shape == (8, 10) and torch.allclose(labels.sum(1), torch.ones(8))


def test_the_merged_pool_does_not_depend_on_node_ids():
    """Flower's simulation draws new node ids at every start: the same sets must train the same model."""
    sets = [_set(2, 0), _set(3, 1), _set(4, 2)]
    merged = []
    for ids in ([1, 2, 3], [30, 20, 10], [7, 99, 8]):
        pool = SyntheticPool()
        for node, syn in zip(ids, sets):
            pool.update(node, syn)
        merged.append(pool.merged())
    assert all(torch.equal(m[0], merged[0][0]) and torch.equal(m[1], merged[0][1]) for m in merged)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 20), scale=st.floats(0.1, 50), seed=st.integers(0, 2**16), bad_at=st.integers(0, 10**6))
def test_plausible_uploads_pass_and_one_nan_anywhere_fails(n, scale, seed, bad_at):
    rng = np.random.default_rng(seed)
    arrays = {"images": (rng.standard_normal((n, 1, 28, 28)) * scale).clip(-99, 99).astype(np.float32),
              "labels": rng.permutation(np.arange(n) % 10).astype(np.int64)}
    exp = Expectation(INFO, "dm", ipc=2, round=1)
    validate_set(arrays, exp)
    arrays["images"].reshape(-1)[bad_at % arrays["images"].size] = np.nan
    with pytest.raises(Rejected, match="non-finite"):
        validate_set(arrays, exp)
