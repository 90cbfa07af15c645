"""Upload validation: each kind of bad reply is rejected with its reason, and the round goes on."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord

from flwr.common.constant import SType

from client.app import app as client_app
from distill.data import load_dataset
from server.rounds import collect, make_messages
from server.validate import Expectation, Rejected, check_arrays, check_meta
from tests.flower_fixtures import InProcessGrid, task_identity  # noqa: F401 - fixture

INFO = load_dataset().info
EXP = Expectation(INFO, "dm", ipc=2, round=1, max_abs_pixel=100.0)
TINY = {"iterations": 1, "ipc": 2, "batch-real": 8, "net-width": 8, "net-depth": 1}


def good_arrays(n_per_class: int = 2) -> dict[str, np.ndarray]:
    labels = np.repeat(np.arange(10), n_per_class).astype(np.int64)
    return {"images": np.zeros((len(labels), 1, 28, 28), np.float32), "labels": labels}


def soft(labels: np.ndarray) -> np.ndarray:
    return np.eye(10, dtype=np.float32)[labels]


BAD = {
    "keys": lambda a: {**a, "weights": np.zeros(3, np.float32)},
    "dtype": lambda a: {**a, "images": a["images"].astype(np.float64)},
    "shape": lambda a: {**a, "images": np.zeros((len(a["images"]), 1, 28, 27), np.float32)},
    "non-finite": lambda a: {**a, "images": _with_nan(a["images"])},
    "magnitude": lambda a: {**a, "images": np.full_like(a["images"], 1e6)},
    "label-range": lambda a: {**a, "labels": a["labels"] + 5},
    "soft-labels": lambda a: {**a, "labels": soft(a["labels"]) * 2},
    "too-many": lambda a: {k: np.concatenate([v, v[:1]]) for k, v in a.items()},  # 3 of class 0, ipc 2
}


def _with_nan(images: np.ndarray) -> np.ndarray:
    out = images.copy()
    out[0, 0, 0, 0] = np.nan
    return out


def test_a_good_upload_passes():
    check_arrays(good_arrays(), EXP)
    check_arrays({**good_arrays(), "labels": soft(good_arrays()["labels"])}, EXP)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_upload_is_rejected_with_its_kind(kind):
    with pytest.raises(Rejected) as err:
        check_arrays(BAD[kind](good_arrays()), EXP)
    assert err.value.kind == kind and err.value.detail


def _meta(**changes) -> str:
    d = {"dataset": INFO.to_dict(), "method": "dm", "ipc": 2, "round": 1, **changes}
    return json.dumps(d)


@pytest.mark.parametrize("meta", [_meta(method="dc"), _meta(ipc=50), _meta(round=7),
                                  _meta(dataset={**INFO.to_dict(), "num_classes": 100}),
                                  "{not json", json.dumps({"method": "dm"}), 42])
def test_metadata_contradicting_the_run_is_rejected(meta):
    with pytest.raises(Rejected) as err:
        check_meta(meta, EXP)
    assert err.value.kind == "metadata"


def test_metadata_may_rename_the_dataset_but_not_change_it():
    assert check_meta(_meta(dataset={**INFO.to_dict(), "name": "site-a"}), EXP).ipc == 2


def _tamper(kind: str):
    """Replace a real client's reply by the bad variant ``kind``."""
    def tamper(node: int, reply: Message) -> Message:
        content = reply.content
        if kind == "error-reply":
            return Message(Error(code=2, reason="client crashed"), reply_to=_instruction[node])
        if kind == "malformed":
            del content["meta"]
        elif kind == "metadata-bytes":
            content["metrics"] = MetricRecord({**dict(content["metrics"]), "bytes-uploaded": 1})
        elif kind == "pickle":  # an object array would need unpickling: decoding must refuse it
            buf = io.BytesIO()
            np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
            pickled = Array(dtype="float32", shape=(1,), stype=SType.NUMPY, data=buf.getvalue())  # a lie
            content["synthetic"] = ArrayRecord({"images": pickled, "labels": Array(np.zeros(1, np.int64))})
        else:
            arrays = {k: a.numpy() for k, a in content["synthetic"].items()}
            content["synthetic"] = ArrayRecord({k: Array(v) for k, v in BAD[kind](arrays).items()})
        return reply
    return tamper


_instruction: dict[int, Message] = {}


@pytest.mark.parametrize("kind", sorted(BAD) + ["error-reply", "malformed", "metadata-bytes", "pickle"])
def test_one_bad_client_is_counted_and_the_round_keeps_its_good_replies(kind, task_identity):  # noqa: F811
    bad_node = 102
    tamper = _tamper(kind)
    grid = InProcessGrid(client_app, 3, tamper=lambda n, r: tamper(n, r) if n == bad_node else r)
    msgs = make_messages(sorted(grid.get_node_ids()), dict(TINY), 1, "train")
    _instruction.update({m.metadata.dst_node_id: m for m in msgs})
    exp = Expectation(INFO, "dm", ipc=2, round=1)
    result = collect(grid, msgs, exp, timeout=60)
    assert sorted(node for node, _ in result.accepted) == [101, 103]
    expected_kind = {"metadata-bytes": "metadata", "pickle": "malformed"}.get(kind, kind)
    assert result.rejected == {expected_kind: 1}
    assert result.reasons and result.reasons[0].startswith(f"node {bad_node}: {expected_kind}")


def test_missing_replies_count_as_timeouts(task_identity):  # noqa: F811
    def crash(node, reply):
        return None if node == 101 else reply
    grid = InProcessGrid(client_app, 2, tamper=crash)
    result = collect(grid, make_messages([101, 102], dict(TINY), 1, "train"), EXP, timeout=0.5)
    assert len(result.accepted) == 1 and result.rejected == {"timeout": 1}

