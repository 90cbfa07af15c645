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
from client.task import DistillTask
from distill.synthetic import FACTOR_SPEC_KEY
from distill.upload import Expectation, factor_spec_json, validate_set
from server.validate import Rejected, check_meta, check_reply
from tests.flower_fixtures import InProcessGrid, task_identity  # noqa: F401 - fixture

INFO = load_dataset().info
EXP = Expectation(INFO, "dm", ipc=2, round=1, max_abs_pixel=100.0)
TINY = {"iterations": 1, "ipc": 2, "dm.batch-real": 8, "net-width": 8, "net-depth": 1}


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
    validate_set(good_arrays(), EXP)
    validate_set({**good_arrays(), "labels": soft(good_arrays()["labels"])}, EXP)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_upload_is_rejected_with_its_kind(kind):
    with pytest.raises(Rejected) as err:
        validate_set(BAD[kind](good_arrays()), EXP)
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


def _tamper(kind: str, delivered: list[Message]):
    """Replace a real client's reply by the bad variant ``kind``; ``delivered``: the messages the
    grid delivered (an error reply answers the one the node got)."""
    def tamper(node: int, reply: Message) -> Message:
        content = reply.content
        if kind == "error-reply":
            asked = next(m for m in reversed(delivered) if m.metadata.dst_node_id == node)
            return Message(Error(code=2, reason="client crashed"), reply_to=asked)
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


@pytest.mark.parametrize("kind", sorted(BAD) + ["error-reply", "malformed", "metadata-bytes", "pickle"])
def test_one_bad_client_is_counted_and_the_round_keeps_its_good_replies(kind, task_identity):  # noqa: F811
    bad_node = 102
    grid = InProcessGrid(client_app, 3)
    tamper = _tamper(kind, grid.sent)
    grid.tamper = lambda n, r: tamper(n, r) if n == bad_node else r
    msgs = make_messages(sorted(grid.get_node_ids()), dict(TINY), 1, "train")
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



# -- factorised sets (param idc / haba / latent): the wire form carries factors, not images ----

IDC_SPEC = factor_spec_json("idc", {}, INFO)
EXP_IDC = Expectation(INFO, "dm", ipc=2, round=1, factor_spec=IDC_SPEC, min_class_samples=10, samples_per_image=2)


def idc_arrays(bases_per_class: int = 2, factor: int = 2) -> dict[str, np.ndarray]:
    """A hand-built IDC upload: ``bases_per_class`` stored grids per class, labels per decoded image."""
    m = 10 * bases_per_class
    spec = json.dumps({"kind": "idc", "factor": factor, "height": 28, "width": 28}, sort_keys=True)
    labels = np.repeat(np.arange(10), bases_per_class * factor ** 2).astype(np.int64)
    return {"labels": labels, FACTOR_SPEC_KEY: np.frombuffer(spec.encode(), np.uint8).copy(),
            "factor_base": np.random.default_rng(0).standard_normal((m, 1, 28, 28)).astype(np.float32)}


def _spec_bytes(spec: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(spec).encode(), np.uint8).copy()


BAD_FACTORS = {
    "keys": lambda a: {**a, "images": np.zeros((1, 1, 28, 28), np.float32)},
    "dtype": lambda a: {**a, "factor_base": a["factor_base"].astype(np.float64)},
    "factors": lambda a: {**a, FACTOR_SPEC_KEY: np.frombuffer(b"{not json", np.uint8).copy()},
    "non-finite": lambda a: {**a, "factor_base": _with_nan(a["factor_base"])},
    "magnitude": lambda a: {**a, "factor_base": np.full_like(a["factor_base"], 1e6)},
    "label-range": lambda a: {**a, "labels": np.concatenate([a["labels"][1:], a["labels"][:1]])},  # base mixes
    "too-many": lambda a: {"labels": np.concatenate([a["labels"], np.zeros(4, np.int64)]),
                           FACTOR_SPEC_KEY: a[FACTOR_SPEC_KEY],
                           "factor_base": np.concatenate([a["factor_base"], a["factor_base"][:1]])},
}


def test_a_factorised_upload_passes_and_counts_stored_bases():
    validate_set(idc_arrays(), EXP_IDC)
    assert EXP_IDC.per_base == 4
    assert EXP_IDC.max_upload_bytes() < Expectation(INFO, "dm", ipc=2 * 4, round=1).max_upload_bytes()


@pytest.mark.parametrize("kind", sorted(BAD_FACTORS))
def test_each_bad_factorised_upload_is_rejected_with_its_kind(kind):
    with pytest.raises(Rejected) as err:
        validate_set(BAD_FACTORS[kind](idc_arrays()), EXP_IDC)
    assert err.value.kind == kind and err.value.detail


@pytest.mark.parametrize("spec", [{"kind": "idc", "factor": 4, "height": 28, "width": 28},
                                  {"kind": "haba", "hallucinators": 4, "hidden": 8}])
def test_a_factor_spec_other_than_the_runs_is_rejected_naming_both(spec):
    with pytest.raises(Rejected) as err:
        validate_set({**idc_arrays(), FACTOR_SPEC_KEY: _spec_bytes(spec)}, EXP_IDC)
    assert err.value.kind == "factors" and spec["kind"] in err.value.detail and '"idc"' in err.value.detail


def test_the_form_must_match_the_runs_param():
    with pytest.raises(Rejected) as err:
        validate_set(good_arrays(), EXP_IDC)  # plain images to an idc run
    assert err.value.kind == "keys" and "idc" in err.value.detail
    with pytest.raises(Rejected) as err:
        validate_set(idc_arrays(), EXP)  # factors to a pixels run
    assert err.value.kind == "keys"


def test_a_factorised_class_budget_counts_stored_bases(task_identity):  # noqa: F811
    from server.validate import check_class_counts
    exp = Expectation(INFO, "dm", ipc=2, round=1, factor_spec=IDC_SPEC, min_class_samples=1, samples_per_image=2)
    hist = np.array([4] * 10)  # 4 samples / 2 per image = 2 bases per class: 8 decoded images fit
    check_class_counts(MetricRecord({}), hist, idc_arrays()["labels"], exp)
    with pytest.raises(Rejected, match="stored bases"):
        check_class_counts(MetricRecord({}), np.array([2] + [4] * 9), idc_arrays()["labels"], exp)


def test_an_idc_client_reply_is_accepted_and_pays_for_its_factors_only(task_identity):  # noqa: F811
    grid = InProcessGrid(client_app, 3)
    msgs = make_messages(sorted(grid.get_node_ids()), dict(TINY, param="idc"), 1, "train")
    replies = {m.metadata.dst_node_id: r for m, r in zip(msgs, grid.send_and_receive(msgs))}
    exp = Expectation(INFO, "dm", ipc=2, round=1, factor_spec=IDC_SPEC, min_class_samples=10, samples_per_image=2)
    for reply in replies.values():
        syn = check_reply(reply, exp)
        assert syn.factors is not None and syn.factors.spec_json() == IDC_SPEC
        assert len(syn) == 4 * syn.factors.num_bases and syn.class_counts().max() <= 2 * 4
        sent = reply.content["metrics"]["bytes-uploaded"]
        assert sent == syn.nbytes() == sum(a.nbytes for a in syn.to_arrays().values())
        assert sent < syn.images.numpy().nbytes  # 4 images per stored grid
    # the same replies against a run that asked for HaBa: refused, both kinds named
    haba = Expectation(INFO, "dm", ipc=2, round=1, factor_spec=factor_spec_json("haba", {}, INFO))
    with pytest.raises(Rejected) as err:
        check_reply(next(iter(replies.values())), haba)
    assert err.value.kind == "factors" and "idc" in err.value.detail and "haba" in err.value.detail


@pytest.mark.parametrize("param", ["haba", "latent"])
def test_shared_network_clients_keep_one_network_and_their_class_budget(param, task_identity):  # noqa: F811
    """Dirichlet 0.1 caps classes: haba / latent distill once and cut each class to its budget."""
    options = '{"hallucinators": 2}' if param == "haba" else '{"decoders": 2}'
    # lr-img 0.1: at DM's default 1.0 a single haba step already leaves |pixel| > 100 (magnitude)
    config = dict(TINY, param=param, partitioner="dirichlet", alpha=0.1, **{"dm.lr-img": 0.1, "param-kwargs": options})
    grid = InProcessGrid(client_app, 3)
    msgs = make_messages(sorted(grid.get_node_ids()), config, 1, "train")
    task = DistillTask.from_config({k: v for k, v in config.items()})
    exp = Expectation(INFO, "dm", ipc=2, round=1, factor_spec=factor_spec_json(param, task.param_options, INFO),
                      min_class_samples=10, samples_per_image=2)
    result = collect(grid, msgs, exp, timeout=60)
    assert len(result.accepted) == 3, result.reasons
    for _, syn in result.accepted:
        assert syn.factors.kind == param and len(syn) == 2 * syn.factors.num_bases
