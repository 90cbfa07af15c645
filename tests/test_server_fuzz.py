"""Hostile uploads: hypothesis fuzzes the server's reply validation (issue 6).

Every malformed reply must be refused with a :class:`Rejected` kind (never another
exception), counted in the round and logged, while the good replies of the same round are
kept. The default run tries ~150 replies per test; ``-m slow`` runs a heavier profile.

A mutation Flower refuses to build (its constructors run on the sender) is not a pass: a hostile
node sends bytes, not constructor calls. Such a reply is encoded by hand as Flower's wire objects
(``tests/raw_reply.py``), inflated by Flower's own code as the ServerApp's Grid does, and must then
be rejected with a kind like any other. Each test counts its mutations, how many Flower refused to
build, how many of those arrived as raw bytes and were rejected, and how many Flower's inflation
itself raises on (no message reaches the server's checks: see
``test_a_reply_flower_cannot_inflate_costs_only_its_own_node``); the counts are printed at the end
of the module (and written as JSON to ``$FEDISTILL_FUZZ_COUNTS`` when set).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from distill.data import load_dataset
from distill.synthetic import FACTOR_SPEC_KEY, SetMetadata
from server.rounds import collect, make_messages
from distill.upload import Expectation, factor_spec_json
from server.validate import KINDS, Rejected, check_reply
from server.wire import check_reply_size
from tests.flower_fixtures import LocalGrid, task_identity, with_metadata  # noqa: F401 - fixture
from tests.raw_reply import Objects, inflate, raw_reply, wire_objects

INFO = load_dataset().info
K, IPC = INFO.num_classes, 2
EXP = Expectation(INFO, "dm", ipc=IPC, round=1, min_class_samples=10, samples_per_image=2)
EXP_DP = Expectation(INFO, "dp-dm", ipc=IPC, round=1, dp="dp-dm", delta=1e-5)
IDC_SPEC = factor_spec_json("idc", {"factor": 2}, INFO)
EXP_IDC = Expectation(INFO, "dm", ipc=IPC, round=1, min_class_samples=10, samples_per_image=2, factor_spec=IDC_SPEC)
HIST = [40] * K  # every class budgets IPC images: nothing capped or skipped
DP_PRIVACY = {"epsilon": 3.0, "delta": 1e-5, "sigma": 1.0, "sample_rate": 0.04, "steps": 2, "rho": 0.0,
              "accountant": "rdp"}
DP_METRICS = {"epsilon-round": 3.0, "delta": 1e-5, "sigma": 1.0, "sample-rate": 0.04, "steps": 2, "rho": 0.0}
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HEAVY = settings(max_examples=2000, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

Content = dict  # record name -> record (a plain dict until it becomes a RecordDict)
Mutation = Callable[[Content], Content]


# -- a good reply, as client/app.py builds one ------------------------------------------------

def good_arrays(seed: int = 0, soft: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(K), IPC).astype(np.int64)
    images = rng.standard_normal((len(labels), *INFO.image_shape)).astype(np.float32)
    return {"images": images, "labels": np.eye(K, dtype=np.float32)[labels] if soft else labels}


def good_content(seed: int = 0, soft: bool = False, dp: bool = False, client: str = "") -> Content:
    arrays = good_arrays(seed, soft)
    meta = SetMetadata(INFO, "dp-dm" if dp else "dm", IPC, round=1, client=client or str(seed),
                       privacy=dict(DP_PRIVACY) if dp else {})
    metrics = {"seconds": 0.5, "bytes-uploaded": sum(a.nbytes for a in arrays.values())}
    if dp:
        metrics.update(DP_METRICS, **{"epsilon-total": 3.0, "clip": 1.0, "privacy-budget": 0.0})
    else:
        metrics.update({"num-examples": sum(HIST), "class-histogram": list(HIST), "classes-capped": 0,
                        "classes-skipped": 0})
    return {"synthetic": {k: Array(v) for k, v in arrays.items()},
            "meta": {"set-meta": json.dumps(meta.to_dict())}, "metrics": metrics}


def good_idc_arrays(seed: int = 0, soft: bool = False) -> dict[str, np.ndarray]:
    """An IDC factor-2 upload: IPC stored grids per class, 4 labels per grid."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(K), IPC * 4).astype(np.int64)
    base = rng.standard_normal((K * IPC, *INFO.image_shape)).astype(np.float32)
    return {"labels": np.eye(K, dtype=np.float32)[labels] if soft else labels,
            FACTOR_SPEC_KEY: _spec_array(IDC_SPEC), "factor_base": base}


def _spec_array(text: str | bytes) -> np.ndarray:
    return np.frombuffer(text.encode() if isinstance(text, str) else text, np.uint8).copy()


def good_idc_content(seed: int = 0, soft: bool = False) -> Content:
    return with_arrays(good_content(seed), good_idc_arrays(seed, soft))


def to_record_dict(content: Content) -> RecordDict:
    """Plain dicts become the record types of a reply; anything else is put in as it is."""
    kinds = {"synthetic": ArrayRecord, "meta": ConfigRecord, "metrics": MetricRecord, "declined": ConfigRecord}
    out = RecordDict()
    for name, rec in content.items():
        out[name] = kinds.get(name, ConfigRecord)(rec) if isinstance(rec, dict) else rec
    return out


def arrays_of(content: Content) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in content["synthetic"].items()}


def with_arrays(content: Content, arrays: dict[str, np.ndarray], fix_bytes: bool = True) -> Content:
    """Replace the arrays; by default keep bytes-uploaded honest so only the arrays are wrong."""
    metrics = dict(content["metrics"])
    if fix_bytes:
        metrics["bytes-uploaded"] = sum(a.nbytes for a in arrays.values())
    return {**content, "synthetic": {k: Array(v) for k, v in arrays.items()}, "metrics": metrics}


def with_meta(content: Content, **changes) -> Content:
    meta = json.loads(content["meta"]["set-meta"])
    meta.update(changes)
    return {**content, "meta": {"set-meta": json.dumps(meta)}}


def with_metrics(content: Content, **changes) -> Content:
    metrics = {**content["metrics"], **{k.replace("_", "-"): v for k, v in changes.items()}}
    return {**content, "metrics": {k: v for k, v in metrics.items() if v is not None}}


# -- mutations: each draws one way of being wrong, with the kinds that may name it ------------

finite = st.floats(-1e6, 1e6, allow_nan=False)
non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])
junk_scalar = st.one_of(st.integers(-2**62, 2**62), st.floats(allow_nan=True), st.text(max_size=20),
                        st.binary(max_size=20), st.booleans())
junk_metric = st.one_of(st.integers(-2**62, 2**62), st.floats(allow_nan=True),
                        st.lists(st.integers(-5, 5), max_size=12), st.lists(st.floats(allow_nan=True), max_size=12))
key_name = st.text(st.characters(codec="ascii", categories=["L", "N", "P"]), min_size=1, max_size=12)


@st.composite
def record_mutation(draw) -> tuple[Mutation, set[str]]:
    """A reply record missing, of the wrong type, or a whole reply of garbage."""
    name = draw(st.sampled_from(["synthetic", "meta", "metrics"]))
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return (lambda c: {k: v for k, v in c.items() if k != name}), {"malformed"}
    if choice == 1:
        wrong = {"synthetic": MetricRecord({"x": 1}), "meta": ArrayRecord({"set-meta": Array(np.zeros(1))}),
                 "metrics": ConfigRecord({"seconds": "soon"})}[name]
        return (lambda c: {**c, name: wrong}), {"malformed"}
    junk = draw(st.dictionaries(key_name, junk_scalar, max_size=4))
    return (lambda c: {"junk": ConfigRecord(junk)}), {"malformed", "records"}


@st.composite
def array_mutation(draw) -> tuple[Mutation, set[str]]:
    """Keys, dtypes, shapes, values and sizes of the uploaded arrays."""
    case = draw(st.sampled_from(["extra-key", "missing-key", "images-dtype", "labels-dtype", "images-shape",
                                 "labels-shape", "empty", "nan", "magnitude", "label-range", "soft-negative",
                                 "soft-sum", "too-many", "oversized", "lr", "declared-object"]))
    a = good_arrays(draw(st.integers(0, 3)), soft=case.startswith("soft"))
    n = len(a["labels"])
    at = draw(st.integers(0, 10**9))
    if case == "extra-key":
        name = draw(key_name.filter(lambda s: s not in ("images", "labels", "lr")))
        return (lambda c: with_arrays(c, {**a, name: np.zeros(2, np.float32)})), {"keys"}
    if case == "missing-key":
        drop = draw(st.sampled_from(["images", "labels"]))
        return (lambda c: with_arrays(c, {k: v for k, v in a.items() if k != drop})), {"keys"}
    if case == "images-dtype":
        dt = draw(st.sampled_from([np.float64, np.float16, np.int64, np.uint8, ">f4", np.complex64]))
        return (lambda c: with_arrays(c, {**a, "images": a["images"].astype(dt)})), {"dtype"}
    if case == "labels-dtype":
        dt = draw(st.sampled_from([np.int32, np.uint8, np.float64, np.bool_, ">i8"]))
        return (lambda c: with_arrays(c, {**a, "labels": a["labels"].astype(dt)})), {"dtype"}
    if case == "images-shape":
        shape = draw(st.lists(st.integers(0, 30), min_size=0, max_size=5).filter(
            lambda s: len(s) != 4 or tuple(s[1:]) != INFO.image_shape))
        return (lambda c: with_arrays(c, {**a, "images": np.zeros(shape, np.float32)})), {"shape", "oversized"}
    if case == "labels-shape":
        shape = draw(st.sampled_from([(n + 1,), (n - 1,), (n, K + 1), (n, 1), (n, K, 1), ()]))
        return (lambda c: with_arrays(c, {**a, "labels": np.zeros(shape, np.int64)})), {"shape"}
    if case == "empty":
        empty = {"images": np.zeros((0, *INFO.image_shape), np.float32), "labels": np.zeros(0, np.int64)}
        return (lambda c: with_arrays(c, empty)), {"shape"}
    if case == "nan":
        images = a["images"].copy()
        images.reshape(-1)[at % images.size] = draw(non_finite)
        return (lambda c: with_arrays(c, {**a, "images": images})), {"non-finite"}
    if case == "magnitude":
        images = a["images"].copy()
        images.reshape(-1)[at % images.size] = draw(st.floats(100.5, 3e38)) * draw(st.sampled_from([1, -1]))
        return (lambda c: with_arrays(c, {**a, "images": images})), {"magnitude"}
    if case == "label-range":
        labels = a["labels"].copy()
        labels[at % n] = draw(st.one_of(st.integers(-2**62, -1), st.integers(K, 2**62)))
        return (lambda c: with_arrays(c, {**a, "labels": labels})), {"label-range"}
    if case == "soft-negative":
        labels = a["labels"].copy()
        row = at % n
        labels[row] = labels[row] * 2 - 1.0 / K  # sums to 1, one entry negative
        return (lambda c: with_arrays(c, {**a, "labels": labels})), {"soft-labels"}
    if case == "soft-sum":
        labels = a["labels"].copy()
        labels[at % n] *= draw(st.floats(0, 0.99) | st.floats(1.01, 1e6))
        return (lambda c: with_arrays(c, {**a, "labels": labels})), {"soft-labels"}
    if case == "too-many":
        cls = draw(st.integers(0, K - 1))
        extra = {"images": a["images"][:1], "labels": np.array([cls], np.int64)}
        more = {k: np.concatenate([a[k], extra[k]]) for k in a}
        return (lambda c: with_arrays(c, more)), {"too-many"}
    if case == "oversized":
        reps = draw(st.integers(3, 8))
        big = {k: np.concatenate([v] * reps) for k, v in a.items()}
        return (lambda c: with_arrays(c, big)), {"oversized"}
    if case == "lr":
        lr, kinds = draw(st.sampled_from([
            (np.array([0.0], np.float32), {"magnitude"}), (np.array([-0.1], np.float32), {"magnitude"}),
            (np.array([1e9], np.float32), {"magnitude"}), (np.array([np.nan], np.float32), {"non-finite"}),
            (np.array([0.01, 0.02], np.float32), {"shape"}), (np.array([0.01], np.float64), {"dtype"}),
            (np.zeros((1, 1), np.float32), {"shape"})]))
        return (lambda c: with_arrays(c, {**a, "lr": lr})), kinds
    # declared-object: an object (pickled) array must be refused before or at decoding
    import io
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    declared = draw(st.sampled_from(["object", "float32", "int64"]))
    pickled = Array(dtype=declared, shape=(1,), stype="numpy.ndarray", data=buf.getvalue())
    target = draw(st.sampled_from(["images", "labels"]))
    return (lambda c: {**c, "synthetic": {**c["synthetic"], target: pickled}}), {"dtype", "malformed"}


@st.composite
def byte_mutation(draw) -> tuple[Mutation, set[str]]:
    """Arbitrary bytes where an .npy payload should be (corrupt, truncated, zip, a lying header)."""
    good = Array(good_arrays()["images"]).data
    data = draw(st.one_of(st.binary(max_size=300), st.just(good[:draw(st.integers(0, len(good) - 1))]),
                          st.just(b"PK\x03\x04" + draw(st.binary(max_size=50))),
                          st.just(good[:10] + draw(st.binary(min_size=1, max_size=120)))))
    stype = draw(st.sampled_from(["numpy.ndarray", "torch.Tensor", ""]))
    arr = Array(dtype="float32", shape=(1,), stype=stype, data=data)
    return (lambda c: {**c, "synthetic": {**c["synthetic"], "images": arr}}), {"malformed", "shape", "dtype"}


META_KEYS = ["dataset", "method", "ipc", "round", "privacy"]


@st.composite
def meta_mutation(draw) -> tuple[Mutation, set[str]]:
    """set-meta missing, not a string, not JSON, or contradicting the run or the data."""
    case = draw(st.sampled_from(["not-str", "not-json", "not-object", "drop-key", "geometry", "method", "ipc",
                                 "round", "huge", "nested", "number-junk", "rho"]))
    if case == "not-str":
        value = draw(junk_scalar.filter(lambda v: not isinstance(v, str)))
        return (lambda c: {**c, "meta": {"set-meta": value}}), {"metadata"}
    if case == "not-json":
        text = draw(st.text(max_size=40).filter(lambda t: not _is_json(t)))
        return (lambda c: {**c, "meta": {"set-meta": text}}), {"metadata"}
    if case == "not-object":
        value = json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.none())))
        return (lambda c: {**c, "meta": {"set-meta": value}}), {"metadata"}
    if case == "drop-key":
        key = draw(st.sampled_from(["dataset", "method", "ipc"]))
        def drop(c: Content) -> Content:
            meta = json.loads(c["meta"]["set-meta"])
            meta.pop(key)
            return {**c, "meta": {"set-meta": json.dumps(meta)}}
        return drop, {"metadata"}
    if case == "geometry":
        field = draw(st.sampled_from(["num_classes", "channels", "height", "width", "mean", "std"]))
        value = draw({"mean": st.just([0.5]), "std": st.just([2.0])}.get(field, st.integers(-3, 300)))
        assume(value != INFO.to_dict()[field])
        return (lambda c: with_meta(c, dataset={**INFO.to_dict(), field: value})), {"metadata"}
    if case == "method":
        method = draw(st.text(max_size=8).filter(lambda m: m != "dm"))
        return (lambda c: with_meta(c, method=method)), {"metadata"}
    if case in ("ipc", "round"):
        value = draw(st.integers(-10, 10**6).filter(lambda v: v != (IPC if case == "ipc" else 1)))
        return (lambda c: with_meta(c, **{case: value})), {"metadata"}
    if case == "huge":
        return (lambda c: with_meta(c, extra={"pad": "x" * 70_000})), {"metadata"}
    if case == "nested":
        depth = draw(st.integers(50_000, 60_000))
        text = "[" * depth + "]" * depth
        return (lambda c: {**c, "meta": {"set-meta": text[:65_000]}}), {"metadata"}
    if case == "rho":
        rho = draw(st.one_of(non_finite, st.floats(0.01, 0.99), st.text(max_size=5)))
        return (lambda c: with_meta(c, privacy={"rho": rho})), {"privacy", "metadata"}
    # number-junk: Infinity / NaN / huge where integers belong
    key = draw(st.sampled_from(["ipc", "round"]))
    value = draw(st.sampled_from([float("inf"), float("nan"), 1e300, "two", None, [2]]))
    return (lambda c: with_meta(c, **{key: value})), {"metadata"}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


@st.composite
def metrics_mutation(draw) -> tuple[Mutation, set[str]]:
    """Garbage or lies in the MetricRecord: bytes, histogram, counts, seconds, class budget."""
    case = draw(st.sampled_from(["bytes", "hist-length", "hist-negative", "hist-float", "hist-junk", "seconds",
                                 "examples", "capped", "skipped", "budget", "junk"]))
    if case == "bytes":
        value = draw(junk_metric.filter(lambda v: v != good_content()["metrics"]["bytes-uploaded"]))
        return (lambda c: with_metrics(c, **{"bytes-uploaded": value})), {"metadata"}
    if case == "hist-length":
        hist = draw(st.lists(st.integers(0, 100), max_size=30).filter(lambda h: len(h) != K))
        return (lambda c: with_metrics(c, **{"class-histogram": hist})), {"metadata"}
    if case == "hist-negative":
        hist = list(HIST)
        hist[draw(st.integers(0, K - 1))] = draw(st.integers(-2**62, -1))
        return (lambda c: with_metrics(c, **{"class-histogram": hist})), {"metadata"}
    if case == "hist-float":
        hist = [float(h) for h in HIST]
        hist[draw(st.integers(0, K - 1))] = draw(st.floats(allow_nan=True))
        return (lambda c: with_metrics(c, **{"class-histogram": hist})), {"metadata"}
    if case == "hist-junk":
        value = draw(st.one_of(st.integers(), st.floats(allow_nan=True)))
        return (lambda c: with_metrics(c, **{"class-histogram": value})), {"metadata"}
    if case == "seconds":
        value = draw(st.one_of(non_finite, st.floats(-1e9, -1e-9), st.lists(st.floats(0, 1), min_size=1)))
        return (lambda c: with_metrics(c, seconds=value)), {"metadata"}
    if case == "examples":
        value = draw(junk_metric.filter(lambda v: v != sum(HIST)))
        return (lambda c: with_metrics(c, **{"num-examples": value})), {"metadata"}
    if case in ("capped", "skipped"):
        value = draw(junk_metric.filter(lambda v: v != 0))
        return (lambda c: with_metrics(c, **{f"classes-{case}": value})), {"metadata"}
    if case == "budget":  # the histogram cannot pay for the set's images of one class
        hist = list(HIST)
        cls = draw(st.integers(0, K - 1))
        hist[cls] = draw(st.integers(0, 2 * IPC - 1))
        return (lambda c: with_metrics(c, **{"class-histogram": hist, "num-examples": sum(hist)})), {"metadata"}
    value = draw(junk_metric)
    key = draw(st.sampled_from(["seconds", "classes-capped", "classes-skipped", "num-examples"]))
    assume(not (key == "seconds" and isinstance(value, (int, float)) and np.isfinite(value) and value >= 0))
    assume(not (key in ("classes-capped", "classes-skipped") and value == 0))
    assume(not (key == "num-examples" and value == sum(HIST)))
    return (lambda c: with_metrics(c, **{key: value})), {"metadata"}


@st.composite
def reply_mutation(draw) -> tuple[Mutation, set[str]]:
    """An error reply, or a declined record that is not a known decline."""
    if draw(st.booleans()):
        code, reason = draw(st.integers(0, 2**31)), draw(st.text(max_size=2000))
        return (lambda c: Error(code=code, reason=reason)), {"error-reply"}
    junk = draw(st.one_of(st.dictionaries(key_name, junk_scalar, max_size=3),
                          st.just({"kind": "bored"}), st.just({"kind": 3})))
    return (lambda c: {**c, "declined": ConfigRecord(junk)}), {"malformed", "records"}


IDC = json.loads(IDC_SPEC)
json_scalar = st.one_of(st.integers(-2**62, 2**62), st.floats(allow_nan=True), st.text(max_size=20), st.booleans(),
                        st.none())


@st.composite
def factor_mutation(draw) -> tuple[Mutation, set[str]]:
    """A factorised upload (the run's param is idc) with a bad, foreign or oversized spec or factor."""
    case = draw(st.sampled_from(["spec-bytes", "spec-json", "spec-values", "spec-other", "spec-dtype", "spec-long",
                                 "base-dtype", "base-shape", "nan", "magnitude", "mixed-labels", "too-many",
                                 "oversized", "missing", "extra", "images", "shared-dtype"]))
    a = good_idc_arrays(draw(st.integers(0, 3)))
    base = a["factor_base"]

    def put(**changes) -> Mutation:
        arrays = {k: v for k, v in {**a, **changes}.items() if v is not None}
        return lambda c: with_arrays(c, arrays)

    if case == "spec-bytes":  # not UTF-8, or not JSON at all
        junk = draw(st.binary(max_size=60).filter(lambda b: not _is_json_bytes(b)))
        return put(**{FACTOR_SPEC_KEY: _spec_array(junk)}), {"factors"}
    if case == "spec-json":  # JSON, but not a spec object
        value = draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.none(), st.text(max_size=5),
                               st.dictionaries(key_name, json_scalar, max_size=3)))
        return put(**{FACTOR_SPEC_KEY: _spec_array(json.dumps(value))}), {"factors"}
    if case == "spec-values":  # the run's kind, a key wrong, missing, extra or out of range
        key = draw(st.sampled_from(["factor", "height", "width", "extra"]))
        value = draw(st.one_of(st.integers(-10, 2000), st.floats(allow_nan=True), st.text(max_size=3),
                               st.booleans(), st.none()))
        spec = {**IDC, key: value}
        assume(spec != IDC)
        if draw(st.booleans()) and key != "extra":
            spec.pop(key)
        return put(**{FACTOR_SPEC_KEY: _spec_array(json.dumps(spec))}), {"factors"}
    if case == "spec-other":  # a valid spec, not the run's: another factor or kind
        spec = draw(st.sampled_from([{**IDC, "factor": 4}, {**IDC, "factor": 1}, {"kind": "haba", "hallucinators": 4,
                                     "hidden": 8}, {"kind": "latent", "factor": 2, "decoders": 4, "code_channels": 4,
                                                    "hidden": 16, "height": 28, "width": 28}]))
        return put(**{FACTOR_SPEC_KEY: _spec_array(json.dumps(spec))}), {"factors"}
    if case == "spec-dtype":
        spec = a[FACTOR_SPEC_KEY]
        bad = draw(st.sampled_from([spec.astype(np.int64), spec.astype(np.float32), spec.reshape(1, -1),
                                    spec.astype(np.int8)]))
        return put(**{FACTOR_SPEC_KEY: bad}), {"dtype", "factors"}
    if case == "spec-long":
        return put(**{FACTOR_SPEC_KEY: _spec_array(json.dumps({**IDC, "pad": "x" * 5000}))}), \
            {"factors", "oversized"}
    if case == "base-dtype":
        dt = draw(st.sampled_from([np.float64, np.float16, np.int64, np.uint8, ">f4"]))
        return put(factor_base=base.astype(dt)), {"dtype", "oversized"}
    if case == "base-shape":
        shape = draw(st.lists(st.integers(0, 40), min_size=0, max_size=5).filter(
            lambda s: len(s) != 4 or tuple(s[1:]) != INFO.image_shape))
        return put(factor_base=np.zeros(shape, np.float32)), {"factors", "too-many", "oversized", "shape"}
    if case == "nan":
        bad = base.copy()
        bad.reshape(-1)[draw(st.integers(0, base.size - 1))] = draw(non_finite)
        return put(factor_base=bad), {"non-finite"}
    if case == "magnitude":
        bad = base.copy()
        bad.reshape(-1)[draw(st.integers(0, base.size - 1))] = draw(st.floats(200, 3e38))
        return put(factor_base=bad), {"magnitude"}
    if case == "mixed-labels":  # a decoded image labelled apart from its stored base
        labels = a["labels"].copy()
        i = draw(st.integers(0, len(labels) - 1))
        labels[i] = (labels[i] + draw(st.integers(1, K - 1))) % K
        return put(labels=labels), {"label-range"}
    if case == "too-many":  # one more stored grid for some class, labels to match
        cls = draw(st.integers(0, K - 1))
        return put(factor_base=np.concatenate([base, base[:1]]),
                   labels=np.concatenate([a["labels"], np.full(4, cls, np.int64)])), {"too-many"}
    if case == "oversized":
        reps = draw(st.integers(3, 8))
        return put(factor_base=np.concatenate([base] * reps), labels=np.concatenate([a["labels"]] * reps)), \
            {"oversized"}
    if case == "missing":
        drop = draw(st.sampled_from(["labels", FACTOR_SPEC_KEY, "factor_base"]))
        return put(**{drop: None}), {"keys", "factors"}
    if case == "extra":
        name = draw(st.one_of(key_name.map(lambda s: "factor_" + s).filter(lambda s: s != "factor_base"), key_name
                              .filter(lambda s: s not in ("labels", "lr", FACTOR_SPEC_KEY) and
                                      not s.startswith("factor_"))))
        return put(**{name: np.zeros(2, np.float32)}), {"keys", "factors"}
    if case == "images":  # plain images alongside (or instead of) the factors
        images = np.zeros((len(a["labels"]), *INFO.image_shape), np.float32)
        alone = draw(st.booleans())
        return put(images=images, **({FACTOR_SPEC_KEY: None, "factor_base": None} if alone else {})), {"keys"}
    # shared-dtype: a factor array of another kind's name with a wrong dtype
    return put(factor_enc_w=np.zeros(3, np.float64)), {"dtype"}


def _is_json_bytes(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8"))
        return True
    except (UnicodeDecodeError, ValueError):
        return False


no_wire_type = st.one_of(st.none(), st.dictionaries(key_name, st.integers(0, 9), min_size=1, max_size=2),
                         st.just([[1, 2]]), st.just([1, 2.5]), st.just([1, "a"]))  # no record type holds these


@st.composite
def unbuildable_mutation(draw) -> tuple[Mutation, set[str]]:
    """What Flower's constructors refuse on the sender but a node can still send as bytes: values no
    record type (or not this one) holds, object arrays, non-arrays, a record that is not a record."""
    case = draw(st.sampled_from(["metric-value", "meta-value", "object-array", "not-an-array", "not-a-record"]))
    if case == "metric-value":  # a str / bool / bytes arrives in a ConfigRecord typed record; the rest cannot
        key = draw(st.sampled_from(["seconds", "bytes-uploaded", "num-examples", "class-histogram", "classes-capped"]))
        value = draw(st.one_of(no_wire_type, st.text(max_size=8), st.booleans(), st.binary(max_size=8)))
        return (lambda c: {**c, "metrics": {**c["metrics"], key: value}}), {"malformed"}
    if case == "meta-value":
        value = draw(no_wire_type)
        return (lambda c: {**c, "meta": {"set-meta": value}}), {"metadata"}
    if case == "object-array":  # Array(ndarray) will not pickle; the bytes can be a pickle all the same
        target = draw(st.sampled_from(["images", "labels"]))
        value = draw(st.sampled_from([np.array([{"x": 1}], dtype=object), np.array([1, "a", None], dtype=object),
                                      np.empty((2, 0), dtype=object)]))
        return (lambda c: {**c, "synthetic": {**c["synthetic"], target: value}}), {"dtype", "malformed"}
    if case == "not-an-array":
        value = draw(st.one_of(st.lists(st.floats(-1, 1), max_size=4), st.integers(), st.text(max_size=4), st.none()))
        return (lambda c: {**c, "synthetic": {**c["synthetic"], "images": value}}), {"dtype", "shape", "malformed"}
    name = draw(st.sampled_from(["synthetic", "meta", "metrics"]))
    value = draw(st.one_of(st.lists(st.integers(), max_size=3), st.text(max_size=5), st.none(), st.integers()))
    return (lambda c: {**c, name: value}), {"malformed", "records"}


any_mutation = st.one_of(record_mutation(), array_mutation(), byte_mutation(), meta_mutation(),
                         metrics_mutation(), reply_mutation(), unbuildable_mutation())


@st.composite
def dp_mutation(draw) -> tuple[Mutation, set[str]]:
    """A DP reply whose privacy figures are missing, non-finite, impossible, contradictory or not the run's."""
    meta_key = draw(st.sampled_from(sorted(DP_PRIVACY)))
    case = draw(st.sampled_from(["meta-only", "both-non-finite", "drop", "total-below", "run-delta"]))
    metric_key = {"epsilon": "epsilon-round", "sample_rate": "sample-rate"}.get(meta_key, meta_key)
    if case == "meta-only" and meta_key != "accountant":
        value = draw(st.one_of(finite, non_finite, st.text(max_size=4), st.none()))
        assume(value != DP_PRIVACY[meta_key])
        return (lambda c: with_meta(c, privacy={**DP_PRIVACY, meta_key: value})), {"privacy", "metadata"}
    if case == "both-non-finite" and meta_key != "accountant":
        bad = draw(non_finite)
        return (lambda c: with_metrics(with_meta(c, privacy={**DP_PRIVACY, meta_key: bad}),
                                       **{metric_key: bad})), {"privacy", "metadata"}
    if case == "drop" and meta_key != "accountant":
        return (lambda c: with_metrics(c, **{metric_key: None})), {"privacy"}
    if case == "run-delta":
        delta = draw(st.floats(1e-9, 0.5).filter(lambda d: d != 1e-5))
        return (lambda c: with_metrics(with_meta(c, privacy={**DP_PRIVACY, "delta": delta}), delta=delta)), \
            {"privacy"}
    total = draw(st.floats(-1e6, 2.9) | non_finite)
    return (lambda c: with_metrics(c, **{"epsilon-total": total})), {"privacy"}


# -- replies and a grid that returns them -------------------------------------------------------

def instruction(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=node, message_type="train",
                   group_id="1")


def reply_for(msg: Message, content: Content | Error) -> Message:
    if isinstance(content, Error):
        return Message(content, reply_to=msg)
    return Message(to_record_dict(content), reply_to=msg)


class ScriptedGrid(LocalGrid):
    """Answers each node's message with a prepared reply (``None``: no reply); extras are pushed as they are."""

    def __init__(self, script: dict[int, Callable[[Message], Message | None]],
                 extras: Iterable[Callable[[Message], Message]] = ()) -> None:
        self.script, self.extras, self.replies = script, list(extras), {}

    def get_node_ids(self) -> list[int]:
        return sorted(self.script)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        delivered = [with_metadata(msg, message_id=uuid.uuid4().hex) for msg in messages]  # as a SuperLink does
        for msg in delivered:
            reply = self.script[msg.metadata.dst_node_id](msg)
            self.replies[msg.metadata.message_id] = [reply] if reply is not None else []
        if delivered:
            first = delivered[0]
            self.replies[first.metadata.message_id] += [extra(first) for extra in self.extras]
        return [msg.metadata.message_id for msg in delivered]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [r for i in message_ids for r in self.replies.pop(i, [])]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(list(messages)))


# -- the tests ---------------------------------------------------------------------------------

TALLY: dict[str, Counter] = {}  # test -> outcome counts, printed at the end of the module
RAW_KINDS = {"malformed", "records"}  # what retyping a record or an item on the wire may add


def tally(name: str) -> Counter:
    """A fresh counter for one fuzz test (a rerun, e.g. hypothesis replaying a failure, starts again)."""
    TALLY[name] = Counter()
    return TALLY[name]


def delivered(msg: Message, content: Content | Error, counts: Counter) -> Message | None:
    """The reply as the server receives it: built by Flower if Flower builds it, else the raw bytes
    a node can send anyway, inflated by Flower; ``None`` (counted) when Flower's inflation raises."""
    counts["mutations"] += 1
    try:
        reply = reply_for(msg, content)
        counts["built"] += 1
        return reply
    except (TypeError, ValueError):  # refused on the sender's side: a hostile sender skips the constructors
        counts["flower-refused-to-build"] += 1
    sent = wire_objects(msg, content)  # the test's own encoder: it must not fail
    try:
        return inflate(*sent)
    except Exception as err:  # noqa: BLE001 - what the ServerApp's Grid would raise in pull_messages
        counts["raw-flower-cannot-inflate"] += 1
        counts[f"raw-flower-cannot-inflate:{type(err).__name__}"] += 1
        return None


def _assert_rejected(content: Content | Error, exp: Expectation, kinds: set[str], counts: Counter) -> None:
    built = counts["built"]
    reply = delivered(instruction(7), content, counts)
    if reply is None:
        return  # counted: no message exists for the server to check (see the test named in the module doc)
    raw = counts["built"] == built
    with pytest.raises(Rejected) as err:
        check_reply(reply, exp)
    allowed = (kinds | RAW_KINDS if raw else kinds) | ({"oversized"} if _over_limit(reply, exp) else set())
    assert err.value.kind in KINDS and err.value.kind in allowed, (err.value.kind, allowed, err.value.detail, raw)
    assert err.value.detail
    if raw:
        counts["raw-rejected"] += 1


def _over_limit(reply: Message, exp: Expectation) -> bool:
    """Whether the whole reply is over the run's limit: that check comes first, whatever else is wrong."""
    try:
        check_reply_size(reply.content, exp.max_reply_bytes())
        return False
    except Rejected:
        return True
    except Exception:  # noqa: BLE001 - an error reply has no content
        return False


def assert_accounted(counts: Counter, refused: bool = False) -> None:
    """Every mutation was built and rejected, or refused by Flower and then fed raw (rejected or
    not inflatable by Flower): nothing returns early unseen."""
    assert counts["mutations"] > 0
    assert counts["mutations"] == counts["built"] + counts["flower-refused-to-build"]
    assert counts["flower-refused-to-build"] == counts["raw-rejected"] + counts["raw-flower-cannot-inflate"]
    if refused:
        assert counts["raw-rejected"] > 0


@pytest.fixture(scope="module", autouse=True)
def fuzz_report(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print each fuzz test's counts past pytest's capture; ``$FEDISTILL_FUZZ_COUNTS``: also as JSON."""
    yield
    if not TALLY:
        return
    lines = [f"fuzz {name}: {c['mutations']} mutations, {c['built']} built by Flower and rejected, "
             f"{c['flower-refused-to-build']} Flower refused to build -> fed as raw bytes: {c['raw-rejected']} "
             f"rejected with a kind, {c['raw-flower-cannot-inflate']} not inflatable by Flower"
             for name, c in TALLY.items()]
    if path := os.environ.get("FEDISTILL_FUZZ_COUNTS"):
        Path(path).write_text(json.dumps({k: dict(v) for k, v in TALLY.items()}, indent=2, sort_keys=True) + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + "\n".join(lines))


def test_the_fuzzers_base_replies_are_accepted(task_identity):  # noqa: F811
    for soft in (False, True):
        assert len(check_reply(reply_for(instruction(7), good_content(soft=soft)), EXP)) == IPC * K
        syn = check_reply(reply_for(instruction(7), good_idc_content(soft=soft)), EXP_IDC)
        assert len(syn) == 4 * IPC * K and syn.factors.num_bases == IPC * K
    assert len(check_reply(reply_for(instruction(7), good_content(dp=True)), EXP_DP)) == IPC * K


def fuzz_rejections(name: str, mutations: st.SearchStrategy, content: Callable[[Any], Content], exp: Expectation,
                    draws: st.SearchStrategy = st.integers(0, 3), extra_kinds: frozenset[str] = frozenset(),
                    budget: Callable = FUZZ, refused: bool = False) -> None:
    """Apply each drawn mutation to ``content(draw)`` and require its rejection with one of its
    kinds (plus ``extra_kinds``), counting what Flower built and what it refused to build."""
    counts = tally(name)

    @budget
    @given(mutation=mutations, draw=draws)
    def case(mutation: tuple[Mutation, set[str]], draw: Any) -> None:
        mutate, kinds = mutation
        _assert_rejected(mutate(content(draw)), exp, kinds | extra_kinds, counts)

    case()
    assert_accounted(counts, refused=refused)


def test_every_malformed_reply_is_rejected_with_its_kind(task_identity):  # noqa: F811
    fuzz_rejections("generic", any_mutation, good_content, EXP)


def test_every_bad_factorised_reply_is_rejected_with_its_kind(task_identity):  # noqa: F811
    fuzz_rejections("factorised", factor_mutation(), lambda soft: good_idc_content(soft=soft), EXP_IDC,
                    draws=st.booleans())


def test_a_factorised_run_refuses_every_generic_mutation_too(task_identity):  # noqa: F811
    """The generic mutations applied to an idc run's reply: plain arrays are the wrong form there."""
    fuzz_rejections("generic-on-idc", any_mutation, good_idc_content, EXP_IDC, extra_kinds=frozenset({"keys"}))


def test_every_bad_privacy_claim_is_rejected(task_identity):  # noqa: F811
    fuzz_rejections("privacy", dp_mutation(), lambda _: good_content(dp=True), EXP_DP, draws=st.none())


def test_replies_flower_refuses_to_build_still_arrive_as_bytes_and_are_rejected(task_identity):  # noqa: F811
    """Every case here is one Flower's constructors refuse; each is sent as raw bytes instead."""
    counts = tally("flower-refuses-to-build")

    @FUZZ
    @given(mutation=unbuildable_mutation(), seed=st.integers(0, 3))
    def case(mutation: tuple[Mutation, set[str]], seed: int) -> None:
        mutate, kinds = mutation
        before = counts["flower-refused-to-build"]
        _assert_rejected(mutate(good_content(seed)), EXP, kinds, counts)
        assert counts["flower-refused-to-build"] == before + 1, "Flower built it: not an unbuildable mutation"

    case()
    assert_accounted(counts, refused=True)


def test_a_round_keeps_its_good_replies_and_counts_and_logs_every_bad_one(task_identity, caplog):  # noqa: F811
    """``None`` = a good reply, ``"silent"`` = no reply (a timeout); the rest are hostile, built by
    Flower or, where Flower refuses to build them, sent as raw bytes and inflated by Flower. A reply
    Flower's inflation raises on cannot be delivered here (the round-level finding test covers it):
    that node stays silent, counted under raw-flower-cannot-inflate."""
    counts = tally("round")

    @FUZZ
    @given(plan=st.lists(st.one_of(st.none(), st.just("silent"), any_mutation), min_size=1, max_size=6))
    def case(plan: list) -> None:
        caplog.clear()
        contents = {100 + i: (None if step == "silent" else good_content(100 + i) if step is None
                              else step[0](good_content(100 + i))) for i, step in enumerate(plan)}
        before = Counter(counts)
        hostile = {100 + i for i, step in enumerate(plan) if isinstance(step, tuple)}
        grid = ScriptedGrid({node: (lambda m, c=c, bad=node in hostile: None if c is None else
                                    delivered(m, c, counts) if bad else reply_for(m, c))
                             for node, c in contents.items()})
        with caplog.at_level(logging.WARNING, logger="fedistill.server"):
            result = collect(grid, make_messages(sorted(contents), {}, 1, "train"), EXP, timeout=0.0)
        uninflatable = counts["raw-flower-cannot-inflate"] - before["raw-flower-cannot-inflate"]
        good = [100 + i for i, step in enumerate(plan) if step is None]
        silent = plan.count("silent") + uninflatable
        assert [node for node, _ in result.accepted] == good
        assert sum(result.rejected.values()) == len(plan) - len(good) and result.rejected["timeout"] == silent
        assert set(result.rejected) <= set(KINDS)
        assert len(result.reasons) == len(plan) - len(good) - silent
        assert sum("rejected node" in r.getMessage() for r in caplog.records) == len(result.reasons)
        counts["raw-rejected"] += counts["flower-refused-to-build"] - before["flower-refused-to-build"] - uninflatable

    case()
    assert_accounted(counts)


def test_duplicate_and_unsolicited_replies_are_rejected_and_good_ones_kept(task_identity, caplog):  # noqa: F811
    """A second reply and an unsolicited one are refused; two nodes claiming one client id are both
    kept (sets are keyed by node id) and the repeated claim is logged."""
    twice = lambda m: reply_for(m, good_content(100))  # noqa: E731
    stranger = with_metadata(instruction(999), message_id="never-sent")
    grid = ScriptedGrid({100: twice, 101: lambda m: reply_for(m, good_content(101, client="same")),
                         102: lambda m: reply_for(m, good_content(102, client="same")),
                         103: lambda m: reply_for(m, good_content(103))},
                        extras=[twice, lambda m: reply_for(stranger, good_content(104))])
    with caplog.at_level(logging.WARNING, logger="fedistill.server"):
        result = collect(grid, make_messages([100, 101, 102, 103], {}, 1, "train"), EXP, timeout=0.0)
    assert [node for node, _ in result.accepted] == [100, 101, 102, 103]
    assert result.rejected == {"duplicate": 1, "unsolicited": 1}
    assert sum("rejected node" in r.getMessage() for r in caplog.records) == 2
    assert sum("claims client id 'same'" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow
def test_heavy_fuzz_of_reply_validation(task_identity):  # noqa: F811
    fuzz_rejections("heavy-generic", any_mutation, good_content, EXP, budget=HEAVY, refused=True)


@pytest.mark.slow
def test_heavy_fuzz_of_privacy_claims(task_identity):  # noqa: F811
    fuzz_rejections("heavy-privacy", dp_mutation(), lambda _: good_content(dp=True), EXP_DP, draws=st.none(),
                    budget=HEAVY)


# -- what Flower itself cannot inflate ---------------------------------------------------------

class WireGrid(ScriptedGrid):
    """Replies travel as the objects a node pushes and are inflated in ``pull_messages``, one after
    another, as Flower 1.42's ServerApp Grid does (``flwr.superlink.grid.http_grid``): an object
    Flower cannot inflate raises out of ``pull_messages``, and that call returns none of the replies
    it had already inflated."""

    def __init__(self, script: dict[int, Callable[[Message], tuple[str, Objects] | None]]) -> None:
        super().__init__({})
        self.wire_script, self.wire = script, {}

    def get_node_ids(self) -> list[int]:
        return sorted(self.wire_script)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in (with_metadata(m, message_id=uuid.uuid4().hex) for m in messages):
            ids.append(msg.metadata.message_id)
            if (sent := self.wire_script[msg.metadata.dst_node_id](msg)) is not None:
                self.wire[msg.metadata.message_id] = sent
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [inflate(*self.wire.pop(i)) for i in list(message_ids) if i in self.wire]


def test_a_wire_grid_delivers_good_and_rejected_raw_replies(task_identity):  # noqa: F811
    """The WireGrid itself: raw bytes Flower can inflate reach the checks like any reply."""
    object_images = {**good_content(101), "synthetic": {**good_content(101)["synthetic"],
                                                        "images": np.array([{"x": 1}], dtype=object)}}
    grid = WireGrid({100: lambda m: wire_objects(m, good_content(100)), 101: lambda m: wire_objects(m, object_images)})
    result = collect(grid, make_messages([100, 101], {}, 1, "train"), EXP, timeout=0.0)
    assert [node for node, _ in result.accepted] == [100] and result.rejected == {"dtype": 1}


@pytest.mark.parametrize("bad", ["metric-none", "meta-dict", "not-a-record"])
def test_a_reply_flower_cannot_inflate_costs_only_its_own_node(bad, task_identity):  # noqa: F811
    """A node may push objects whose bodies Flower cannot inflate (the SuperLink checks only their
    heads): an item with no value, a record that is an ArrayChunk. Only that node may lose: the
    round keeps the other nodes' sets and counts the bad one."""
    content = good_content(101)
    content = {"metric-none": {**content, "metrics": {**content["metrics"], "seconds": None}},
               "meta-dict": {**content, "meta": {"set-meta": {"a": 1}}},
               "not-a-record": {**content, "meta": [1, 2]}}[bad]
    with pytest.raises(Exception):
        raw_reply(instruction(101), content)  # Flower's own inflation cannot read it
    grid = WireGrid({100: lambda m: wire_objects(m, good_content(100)), 101: lambda m: wire_objects(m, content),
                     102: lambda m: wire_objects(m, good_content(102))})
    result = collect(grid, make_messages([100, 101, 102], {}, 1, "train"), EXP, timeout=0.0)
    assert [node for node, _ in result.accepted] == [100, 102]
    assert result.rejected == {"malformed": 1} and result.reasons[0].startswith("node 101: malformed: Flower could")
