"""Hostile clients (issue 20): one test per attack a node can mount on the server.

Every attack is either refused with its reason (its kind counted in metrics.jsonl as
``rejected-<kind>``, its node's line in ``rejection-reasons``) or shown harmless: the honest nodes'
accepted sets (the ``.npz`` files of the run store, compared array by array, bit for bit) and the
run's final metrics are identical to those of an attacker-free run with the same seed. Honest
nodes keep their node ids and partition ids in every run (``HostileGrid``), so their seeds
(run seed, partition, round) and their sets are the same with or without attackers.

The work is shared: one attacker-free fedistill run, one fedistill run where every attacker below
mounts its attack beside the same 3 honest nodes, the same pair for FedAvg, and two runs for the
client-id claim. The tests read those runs' records.

Attack -> expected outcome.

fedistill upload (the attacker answers the train message; ``A | B``: either kind):

- nan-pixel -> non-finite
- inf-pixel -> non-finite
- huge-pixel -> magnitude
- images-float64 -> dtype
- labels-int32 -> dtype
- declared-dtype-lie -> dtype (declared int64, the payload decodes to int32)
- images-wrong-geometry -> shape
- empty-set -> shape
- label-out-of-range -> label-range
- missing-labels -> keys
- extra-array-key -> keys
- many-array-keys -> oversized | keys (5,000 tiny arrays)
- too-many-per-class -> too-many
- oversized-set -> oversized
- soft-labels-not-distributions -> soft-labels
- negative-learning-rate -> magnitude
- pickled-object-array -> malformed | dtype
- truncated-npy -> malformed
- zip-payload -> malformed
- extra-config-record -> records
- extra-metric-record -> records
- extra-small-array-record -> records
- extra-8mb-array-record -> oversized | records
- meta-record-extra-entry -> records
- fedavg-shaped-upload -> records
- decline-with-upload -> records
- missing-meta-record -> malformed
- metrics-as-config-record (num-examples a bool) -> malformed
- empty-content -> malformed
- evaluate-shaped-reply-to-train (a reply of the wrong message type) -> malformed
- ipc-as-string ("2") -> metadata
- ipc-as-float (2.0) -> metadata
- round-as-float (1.9) -> metadata
- round-as-bool (true, == 1 if coerced) -> metadata
- meta-stored-form-oversized (12,000 "é": < 64 KiB as sent, ~72 KB stored) -> metadata
- meta-not-json -> metadata
- meta-as-bytes -> metadata
- meta-deeply-nested -> metadata
- meta-unknown-key -> metadata
- meta-wrong-method -> metadata
- meta-wrong-geometry -> metadata
- bytes-uploaded-lie -> metadata
- unknown-metric -> metadata
- histogram-budget-lie -> metadata
- seconds-nan -> metadata
- upload-num-examples-2^53-1 -> metadata
- epsilon-in-non-dp-run -> privacy
- meta-epsilon-in-non-dp-run -> privacy
- forged-rho -> privacy
- decline-unknown-kind -> malformed
- decline-forged-figures -> declined-budget, figures not recorded (``privacy-figures-refused``)
- decline-huge-reason (100,000 characters) -> declined-policy, reason cut to ~300 characters
- decline-reason-1mb -> oversized
- error-reply-huge-reason (1,000,000 characters) -> error-reply, reason cut to ~300 characters
- duplicate-after-error (error reply, then a valid set) -> error-reply, duplicate
- duplicate-after-refusal (NaN set, then a valid set) -> non-finite, duplicate
- unsolicited-valid-set (error reply, plus a valid set answering a message never sent) -> error-reply, unsolicited
- silent -> timeout (counted, no reason line)

federated evaluation (the attacker answers the evaluate message; its train reply is a policy
decline). Refused reports are left out of the mean and counted in ``federated-rejected``:

- eval-weight-2^53-1 -> refused (metadata)
- eval-weight-1e12-float -> refused (metadata)
- eval-weight-negative -> refused (metadata)
- eval-weight-zero -> refused (metadata)
- eval-weight-above-max-examples (max-examples + 1) -> refused (metadata)
- eval-weight-nan -> refused (metadata)
- eval-weight-bool (metrics as a ConfigRecord) -> refused (malformed)
- eval-accuracy-above-1 -> refused (metadata)
- eval-accuracy-negative -> refused (metadata)
- eval-accuracy-nan -> refused (metadata)
- eval-accuracy-inf -> refused (metadata)
- eval-extra-metric -> refused (metadata)
- eval-extra-record -> refused (records)
- eval-upload-shaped-reply (a reply of the wrong message type) -> refused (oversized | records)
- eval-error-reply -> refused (error-reply)
- eval-empty-content -> refused (malformed)
- eval-oversized-metrics -> refused (oversized)
- eval-duplicate-after-refusal (accuracy 2.0, then a legal-looking report) -> both refused
- eval-unsolicited (a legal-looking report answering a message never sent) -> refused (unsolicited)
- eval-decline-forged-weight (declined=1, num-examples 2^53-1, accuracy 1.0) -> harmless: left out
- forged-accuracy-legal-weight (accuracy 1.0 or 0.0 at max-examples) -> accepted, moves the mean by at
  most max-examples / (max-examples + honest total), by at most 1 / nodes under ``unweighted``

FedAvg update (the attacker answers each FedAvg round's train message; the run's accuracy is that
of a run without the attackers, bit for bit):

- fedavg-nan-weights-1e12-examples -> metadata | non-finite
- fedavg-nan-weights -> non-finite
- fedavg-inf-weights -> non-finite
- fedavg-wrong-shape -> shape
- fedavg-missing-key -> keys
- fedavg-extra-key -> keys
- fedavg-extra-8mb-key -> oversized | keys
- fedavg-wrong-dtype -> dtype
- fedavg-declared-dtype-lie -> shape | dtype
- fedavg-pickled-array -> malformed | dtype | shape
- fedavg-examples-zero -> metadata
- fedavg-examples-negative -> metadata
- fedavg-examples-2^53-1 -> metadata
- fedavg-examples-1e12 -> metadata
- fedavg-examples-above-max -> metadata
- fedavg-examples-float -> metadata
- fedavg-examples-nan -> metadata
- fedavg-examples-missing -> metadata
- fedavg-examples-bool (metrics as a ConfigRecord) -> malformed
- fedavg-extra-metric -> metadata
- fedavg-extra-record -> records
- fedavg-error-reply -> error-reply
- fedavg-empty-content -> malformed
- fedavg-upload-shaped-reply -> records | oversized
- fedavg-missing-bytes-uploaded -> metadata (Flower would refuse to aggregate the whole round)
- fedavg-huge-finite-weights -> magnitude (1e30: finite, and it would decide the average)

identity:

- client-id-claim (a valid set whose ``client`` names an honest node's id) -> harmless: both
  accepted, the victim's set bit-identical, the run's accuracy that of a run without the claim

Beyond the attacks, the contract's fallbacks: a set poisoned in the store after it was accepted
is quarantined on resume; a defense that raises fails as ``defense-fail`` says; a run name
cannot leave ``runs-dir``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from client.app import app as client_app
from distill.networks import network_for
from server.app import run
from server.rounds import expectation, federated_evaluate, make_messages
from server.settings import RunSettings
from server.store import RunStore, read_metrics
from server.updates import check_evaluation, check_update
from server.validate import check_reply
from tests.flower_fixtures import (Behaviour, HostileGrid, flower_task_identity, task_identity,  # noqa: F401
                                   unsolicited_reply)
from tests.test_server_fuzz import (HIST, INFO, IPC, Content, good_arrays, good_content, reply_for, to_record_dict,
                                    with_arrays, with_meta, with_metrics)

HONEST = [101, 102, 103]  # HostileGrid's honest node ids (partition ids 0, 1, 2)
FEDISTILL = {"iterations": 1, "ipc": IPC, "dm.batch-real": 8, "net-width": 8, "net-depth": 1, "server-epochs": 2,
             "server-dsa": False, "round-timeout": 1.0, "fraction-evaluate": 1.0}
FEDAVG = {"algorithm": "fedavg", "num-server-rounds": 2, "net-width": 8, "net-depth": 1, "fraction-evaluate": 0.0,
          "round-timeout": 1.0}
MAX_EXAMPLES = RunSettings().max_examples
MAX_REASON_LINE = 600  # "node N: kind: " and a reason cut to ~300 characters
SEED = 7  # the attackers' template set (tests/test_server_fuzz.py's good reply)
N = IPC * INFO.num_classes  # images in the template set

Reply = Content | Error | RecordDict | Message  # a fuzz-style content dict, an error, records, or a built reply
Build = Callable[[Message], list[Reply]]


@dataclass(frozen=True)
class Attack:
    """One attack: the replies it sends for the message it targets, and the kind each must be refused with."""

    name: str
    build: Build
    kinds: tuple[frozenset[str], ...]


def _kinds(kinds: Iterable[str | set[str]]) -> tuple[frozenset[str], ...]:
    return tuple(frozenset({k} if isinstance(k, str) else k) for k in kinds)


def attack(name: str, make: Callable[[], Reply], *kinds: str | set[str]) -> Attack:
    """An attack that answers its message once with ``make()``; ``kinds``: what it must be refused as
    (a kind, or a set of acceptable kinds; none: it must not be refused at all)."""
    return Attack(name, lambda msg: [make()], _kinds(kinds))


def scripted(name: str, build: Build, *kinds: str | set[str]) -> Attack:
    """An attack that sends ``build(msg)``: several replies, replies to other messages, or none;
    ``kinds``: one per reply, in order."""
    return Attack(name, build, _kinds(kinds))


def as_reply(msg: Message, reply: Reply) -> Message:
    """``reply`` as a Message answering ``msg`` (a built Message is sent as it is)."""
    if isinstance(reply, Message):
        return reply
    if isinstance(reply, RecordDict):
        return Message(reply, reply_to=msg)
    return reply_for(msg, reply)


# -- what the attackers send: the fuzz test's valid reply, changed one way at a time --------------

def good() -> Content:
    """A valid upload for this run (checked by the first test), as client/app.py builds one."""
    return good_content(SEED, client="attacker")


def arrays() -> dict[str, np.ndarray]:
    return good_arrays(SEED)


def meta_dict() -> dict[str, Any]:
    return json.loads(good()["meta"]["set-meta"])


def with_pixel(value: float) -> Content:
    images = arrays()["images"].copy()
    images[0, 0, 0, 0] = value
    return with_arrays(good(), {**arrays(), "images": images})


def with_array(key: str, value: Array) -> Content:
    """``value`` under ``key`` as it is (declared dtype and shape need not match the payload)."""
    content = good()
    return {**content, "synthetic": {**content["synthetic"], key: value}}


def with_raw_meta(value: object) -> Content:
    return {**good(), "meta": {"set-meta": value}}


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def payload(data: bytes, dtype: str = "float32", shape: tuple[int, ...] = (1,)) -> Array:
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


PICKLED = npy(np.array([{"x": 1}], dtype=object), allow_pickle=True)


def decline(kind: str, reason: str = "no", **metrics: float) -> Content:
    return {"declined": {"kind": kind, "reason": reason}, "metrics": {"declined": 1, **metrics}}


def report(accuracy: float = 0.5, examples: object = 100, **extra: Any) -> Content:
    """An evaluate reply's content (num-examples, accuracy, loss)."""
    return {"metrics": {"num-examples": examples, "accuracy": accuracy, "loss": 1.0, **extra}}


def soft_not_distributions() -> Content:
    soft = good_arrays(SEED, soft=True)
    labels = soft["labels"].copy()
    labels[0] *= 3.0
    return with_arrays(good(), {**soft, "labels": labels})


def too_many() -> Content:
    a = arrays()
    return with_arrays(good(), {"images": np.concatenate([a["images"], a["images"][:1]]),
                                "labels": np.concatenate([a["labels"], np.array([0], np.int64)])})


def budget_lie() -> Content:
    hist = list(HIST)
    hist[0] = 1  # one example of class 0 cannot pay for its IPC images
    return with_metrics(good(), **{"class-histogram": hist, "num-examples": sum(hist)})


def stored_form_oversized() -> Content:
    """12,000 "é": 12,000 characters as sent, 72,000 once json.dumps escapes them for the store."""
    return with_raw_meta(json.dumps({**meta_dict(), "client": "é" * 12_000}, ensure_ascii=False))


def fedavg_shaped_upload() -> Content:
    state = network_for(INFO, seed=0, width=8, depth=1).state_dict()
    return {"arrays": ArrayRecord(state), "metrics": {"num-examples": 100, "bytes-uploaded": 1}}


TRAIN_ATTACKS = [
    attack("nan-pixel", lambda: with_pixel(float("nan")), "non-finite"),
    attack("inf-pixel", lambda: with_pixel(float("inf")), "non-finite"),
    attack("huge-pixel", lambda: with_pixel(1e6), "magnitude"),
    attack("images-float64", lambda: with_arrays(good(), {**arrays(), "images": arrays()["images"].astype(np.float64)}),
           "dtype"),
    attack("labels-int32", lambda: with_arrays(good(), {**arrays(), "labels": arrays()["labels"].astype(np.int32)}),
           "dtype"),
    attack("declared-dtype-lie", lambda: with_array("labels", payload(npy(arrays()["labels"].astype(np.int32)), "int64",
                                                                      arrays()["labels"].shape)), "dtype"),
    attack("images-wrong-geometry", lambda: with_arrays(good(), {**arrays(), "images": np.zeros((N, 1, 14, 14),
                                                                                              np.float32)}),
           "shape"),
    attack("empty-set", lambda: with_arrays(good(), {"images": np.zeros((0, *INFO.image_shape), np.float32),
                                                     "labels": np.zeros(0, np.int64)}), "shape"),
    attack("label-out-of-range", lambda: with_arrays(good(), {**arrays(), "labels": np.where(
        np.arange(N) == 0, INFO.num_classes, arrays()["labels"])}), "label-range"),
    attack("missing-labels", lambda: with_arrays(good(), {"images": arrays()["images"]}), "keys"),
    attack("extra-array-key", lambda: with_arrays(good(), {**arrays(), "trigger": np.zeros(2, np.float32)}), "keys"),
    attack("many-array-keys", lambda: with_arrays(good(), {**arrays(), **{f"k{i}": np.zeros(1, np.float32)
                                                                          for i in range(5000)}}),
           {"oversized", "keys"}),
    attack("too-many-per-class", too_many, "too-many"),
    attack("oversized-set", lambda: with_arrays(good(), {k: np.concatenate([v] * 4) for k, v in arrays().items()}),
           "oversized"),
    attack("soft-labels-not-distributions", soft_not_distributions, "soft-labels"),
    attack("negative-learning-rate", lambda: with_arrays(good(), {**arrays(), "lr": np.array([-0.1], np.float32)}),
           "magnitude"),
    attack("pickled-object-array", lambda: with_array("images", payload(PICKLED)), {"malformed", "dtype"}),
    attack("truncated-npy", lambda: with_array("images", payload(npy(arrays()["images"])[:100], "float32",
                                                                 arrays()["images"].shape)), "malformed"),
    attack("zip-payload", lambda: with_array("images", payload(b"PK\x03\x04" + bytes(200))), "malformed"),
    attack("extra-config-record", lambda: {**good(), "note": ConfigRecord({"x": 1})}, "records"),
    attack("extra-metric-record", lambda: {**good(), "telemetry": MetricRecord({"x": 1.0})}, "records"),
    attack("extra-small-array-record", lambda: {**good(), "spare": ArrayRecord({"x": Array(np.zeros(2, np.float32))})},
           "records"),
    attack("extra-8mb-array-record", lambda: {**good(), "spare": ArrayRecord(
        {"x": Array(np.zeros(2 * 1024 * 1024, np.float32))})}, {"oversized", "records"}),
    attack("meta-record-extra-entry", lambda: {**good(), "meta": {**good()["meta"], "note": "x"}}, "records"),
    attack("fedavg-shaped-upload", fedavg_shaped_upload, "records"),
    attack("decline-with-upload", lambda: {**good(), **decline("policy")}, "records"),
    attack("missing-meta-record", lambda: {k: v for k, v in good().items() if k != "meta"}, "malformed"),
    attack("metrics-as-config-record", lambda: {**good(), "metrics": ConfigRecord(
        {**good()["metrics"], "num-examples": True})}, "malformed"),
    attack("empty-content", lambda: RecordDict(), "malformed"),
    attack("evaluate-shaped-reply-to-train", lambda: report(), "malformed"),
    attack("ipc-as-string", lambda: with_meta(good(), ipc=str(IPC)), "metadata"),
    attack("ipc-as-float", lambda: with_meta(good(), ipc=float(IPC)), "metadata"),
    attack("round-as-float", lambda: with_meta(good(), round=1.9), "metadata"),
    attack("round-as-bool", lambda: with_meta(good(), round=True), "metadata"),
    attack("meta-stored-form-oversized", stored_form_oversized, "metadata"),
    attack("meta-not-json", lambda: with_raw_meta("{'ipc': 2"), "metadata"),
    attack("meta-as-bytes", lambda: with_raw_meta(good()["meta"]["set-meta"].encode()), "metadata"),
    attack("meta-deeply-nested", lambda: with_raw_meta("[" * 60_000), "metadata"),
    attack("meta-unknown-key", lambda: with_meta(good(), owner="root"), "metadata"),
    attack("meta-wrong-method", lambda: with_meta(good(), method="mtt"), "metadata"),
    attack("meta-wrong-geometry", lambda: with_meta(good(), dataset={**INFO.to_dict(), "channels": 3}), "metadata"),
    attack("bytes-uploaded-lie", lambda: with_metrics(good(), **{"bytes-uploaded": 1}), "metadata"),
    attack("unknown-metric", lambda: with_metrics(good(), accuracy=1.0), "metadata"),
    attack("histogram-budget-lie", budget_lie, "metadata"),
    attack("seconds-nan", lambda: with_metrics(good(), seconds=float("nan")), "metadata"),
    attack("upload-num-examples-2^53-1", lambda: with_metrics(good(), **{"num-examples": 2**53 - 1}), "metadata"),
    attack("epsilon-in-non-dp-run", lambda: with_metrics(good(), **{"epsilon-round": 1.0}), "privacy"),
    attack("meta-epsilon-in-non-dp-run", lambda: with_meta(good(), privacy={"epsilon": 1.0}), "privacy"),
    attack("forged-rho", lambda: with_metrics(with_meta(good(), privacy={"rho": 0.5}), rho=0.5), "privacy"),
    attack("decline-unknown-kind", lambda: decline("bored"), "malformed"),
    attack("decline-forged-figures", lambda: decline("budget", **{"epsilon-total": float("nan")}), "declined-budget"),
    attack("decline-huge-reason", lambda: decline("policy", "r" * 100_000), "declined-policy"),
    attack("decline-reason-1mb", lambda: decline("policy", "r" * 1_000_000), "oversized"),
    attack("error-reply-huge-reason", lambda: Error(code=2, reason="e" * 1_000_000), "error-reply"),
    scripted("duplicate-after-error", lambda msg: [Error(code=2, reason="crashed"), good()], "error-reply",
           "duplicate"),
    scripted("duplicate-after-refusal", lambda msg: [with_pixel(float("nan")), good()], "non-finite", "duplicate"),
    scripted("unsolicited-valid-set", lambda msg: [Error(code=2, reason="crashed"),
                                                 unsolicited_reply(msg, to_record_dict(good()))],
           "error-reply", "unsolicited"),
    scripted("silent", lambda msg: []),  # counted as a timeout: no reason line
]

EVAL_ATTACKS = [
    attack("eval-weight-2^53-1", lambda: report(1.0, 2**53 - 1), "metadata"),
    attack("eval-weight-1e12-float", lambda: report(1.0, 1e12), "metadata"),
    attack("eval-weight-negative", lambda: report(1.0, -5), "metadata"),
    attack("eval-weight-zero", lambda: report(1.0, 0), "metadata"),
    attack("eval-weight-above-max-examples", lambda: report(1.0, MAX_EXAMPLES + 1), "metadata"),
    attack("eval-weight-nan", lambda: report(1.0, float("nan")), "metadata"),
    attack("eval-weight-bool", lambda: {"metrics": ConfigRecord({"num-examples": True, "accuracy": 1.0,
                                                                 "loss": 0.0})}, "malformed"),
    attack("eval-accuracy-above-1", lambda: report(1.5), "metadata"),
    attack("eval-accuracy-negative", lambda: report(-0.5), "metadata"),
    attack("eval-accuracy-nan", lambda: report(float("nan")), "metadata"),
    attack("eval-accuracy-inf", lambda: report(float("inf")), "metadata"),
    attack("eval-extra-metric", lambda: report(1.0, 100, backdoor=1.0), "metadata"),
    attack("eval-extra-record", lambda: {**report(), "note": ConfigRecord({"x": "y"})}, "records"),
    attack("eval-upload-shaped-reply", good, {"oversized", "records"}),
    attack("eval-error-reply", lambda: Error(code=2, reason="crashed"), "error-reply"),
    attack("eval-empty-content", lambda: RecordDict(), "malformed"),
    attack("eval-oversized-metrics", lambda: report(1.0, 100, padding=[0.0] * 10_000), "oversized"),
    scripted("eval-duplicate-after-refusal", lambda msg: [report(2.0), report(1.0, MAX_EXAMPLES)], "metadata",
           {"duplicate", "unsolicited"}),
    scripted("eval-unsolicited", lambda msg: [unsolicited_reply(msg, to_record_dict(report(1.0, MAX_EXAMPLES)))],
           "unsolicited"),
    attack("eval-decline-forged-weight", lambda: report(1.0, 2**53 - 1, declined=1)),  # left out, not refused
]


# -- FedAvg updates: the global model the message carries, changed one way at a time -------------

def model_of(msg: Message) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in msg.content["arrays"].items()}


def update(state: dict[str, np.ndarray | Array], **metrics: object) -> Content:
    """A FedAvg reply with ``state`` and honest-looking metrics (``None`` drops one)."""
    record = ArrayRecord({k: v if isinstance(v, Array) else Array(np.ascontiguousarray(v)) for k, v in state.items()})
    values = {"num-examples": 100, "bytes-uploaded": sum(len(a.data) for a in record.values()), **metrics}
    return {"arrays": record, "metrics": {k: v for k, v in values.items() if v is not None}}


def poisoned(msg: Message, value: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) if v.dtype.kind == "f" else v for k, v in model_of(msg).items()}


def smallest(state: dict[str, np.ndarray]) -> str:
    return min(state, key=lambda k: state[k].size)


def reshaped(msg: Message) -> Content:
    state = model_of(msg)
    key = next(k for k, v in state.items() if v.ndim >= 2)
    return update({**state, key: state[key].reshape(state[key].shape[0], -1)})


def retyped(msg: Message) -> Content:
    state = model_of(msg)
    key = smallest(state)
    return update({**state, key: state[key].astype(np.float64)})


def declared_lie(msg: Message) -> Content:
    state = model_of(msg)
    key = smallest(state)
    return update({**state, key: payload(npy(state[key].astype(np.float64)), "float32", state[key].shape)})


def pickled_update(msg: Message) -> Content:
    state = model_of(msg)
    key = smallest(state)
    return update({**state, key: payload(PICKLED, "float32", state[key].shape)})


def fedavg(name: str, build: Callable[[Message], Reply], *kinds: str | set[str]) -> Attack:
    """An attack on a FedAvg round: one reply built from the global model the message carries."""
    return scripted(name, lambda msg: [build(msg)], *kinds)


FEDAVG_ATTACKS = [
    fedavg("fedavg-nan-weights-1e12-examples", lambda m: update(poisoned(m, float("nan")), **{"num-examples": 10**12}),
           {"metadata", "non-finite"}),
    fedavg("fedavg-nan-weights", lambda m: update(poisoned(m, float("nan"))), "non-finite"),
    fedavg("fedavg-inf-weights", lambda m: update(poisoned(m, float("inf"))), "non-finite"),
    fedavg("fedavg-wrong-shape", reshaped, "shape"),
    fedavg("fedavg-missing-key", lambda m: update({k: v for k, v in model_of(m).items() if k != smallest(model_of(m))}),
           "keys"),
    fedavg("fedavg-extra-key", lambda m: update({**model_of(m), "trigger": np.zeros(2, np.float32)}), "keys"),
    fedavg("fedavg-extra-8mb-key", lambda m: update({**model_of(m), "spare": np.zeros(2 * 1024 * 1024, np.float32)}),
           {"oversized", "keys"}),
    fedavg("fedavg-wrong-dtype", retyped, "dtype"),
    fedavg("fedavg-declared-dtype-lie", declared_lie, {"shape", "dtype"}),
    fedavg("fedavg-pickled-array", pickled_update, {"malformed", "dtype", "shape"}),
    fedavg("fedavg-examples-zero", lambda m: update(model_of(m), **{"num-examples": 0}), "metadata"),
    fedavg("fedavg-examples-negative", lambda m: update(model_of(m), **{"num-examples": -100}), "metadata"),
    fedavg("fedavg-examples-2^53-1", lambda m: update(model_of(m), **{"num-examples": 2**53 - 1}), "metadata"),
    fedavg("fedavg-examples-1e12", lambda m: update(model_of(m), **{"num-examples": 10**12}), "metadata"),
    fedavg("fedavg-examples-above-max", lambda m: update(model_of(m), **{"num-examples": MAX_EXAMPLES + 1}),
           "metadata"),
    fedavg("fedavg-examples-float", lambda m: update(model_of(m), **{"num-examples": 100.0}), "metadata"),
    fedavg("fedavg-examples-nan", lambda m: update(model_of(m), **{"num-examples": float("nan")}), "metadata"),
    fedavg("fedavg-examples-missing", lambda m: update(model_of(m), **{"num-examples": None}), "metadata"),
    fedavg("fedavg-examples-bool", lambda m: {**update(model_of(m)), "metrics": ConfigRecord(
        {"num-examples": True, "bytes-uploaded": 1})}, "malformed"),
    fedavg("fedavg-extra-metric", lambda m: update(model_of(m), loss=0.0), "metadata"),
    fedavg("fedavg-extra-record", lambda m: {**update(model_of(m)), "note": ConfigRecord({"x": 1})}, "records"),
    fedavg("fedavg-error-reply", lambda m: Error(code=2, reason="crashed"), "error-reply"),
    fedavg("fedavg-empty-content", lambda m: RecordDict(), "malformed"),
    fedavg("fedavg-upload-shaped-reply", lambda m: good(), {"records", "oversized"}),
    fedavg("fedavg-missing-bytes-uploaded", lambda m: update(model_of(m), **{"bytes-uploaded": None}), "metadata"),
    fedavg("fedavg-huge-finite-weights", lambda m: update(poisoned(m, 1e30)), "magnitude"),
]
# Attacks shown by their own runs rather than by a per-attack record.
OTHER_ATTACKS = ["client-id-claim", "forged-accuracy-legal-weight"]
TRAIN_IDS = {a.name: 201 + i for i, a in enumerate(TRAIN_ATTACKS)}
EVAL_IDS = {a.name: 301 + i for i, a in enumerate(EVAL_ATTACKS)}
FEDAVG_IDS = {a.name: 401 + i for i, a in enumerate(FEDAVG_ATTACKS)}


def on_train(a: Attack) -> Behaviour:
    """An attacker that mounts ``a`` on train messages and is silent at evaluation."""
    def behave(msg: Message) -> list[Message]:
        if msg.metadata.message_type != MessageType.TRAIN:
            return []
        return [as_reply(msg, r) for r in a.build(msg)]
    return behave


def on_evaluate(a: Attack) -> Behaviour:
    """An attacker that declines training (as a node whose policy refuses it) and mounts ``a`` at evaluation."""
    def behave(msg: Message) -> list[Message]:
        if msg.metadata.message_type == MessageType.TRAIN:
            return [as_reply(msg, decline("policy", "evaluation only"))]
        return [as_reply(msg, r) for r in a.build(msg)]
    return behave


# -- the shared runs -----------------------------------------------------------------------------

class LogLines(logging.Handler):
    """The server's warnings of one run (per-node evaluation refusals are only logged)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class Run:
    root: Path
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    logs: list[str]

    @property
    def record(self) -> dict[str, Any]:
        return self.metrics[-1]


def play(grid: HostileGrid, runs_dir: Path, **config: Any) -> Run:
    """A whole run over ``grid``, with the server's warnings."""
    handler = LogLines()
    logger = logging.getLogger("fedistill.server")
    logger.addHandler(handler)
    try:
        with flower_task_identity():
            summary = run(grid, {}, runs_dir=str(runs_dir), **config)
    finally:
        logger.removeHandler(handler)
    return Run(Path(summary["run"]), read_metrics(summary["run"]), summary, handler.lines)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Run:
    """The 3 honest nodes alone."""
    return play(HostileGrid(client_app, 3), tmp_path_factory.mktemp("baseline"), **FEDISTILL)


@pytest.fixture(scope="module")
def attacked(tmp_path_factory) -> Run:
    """The same 3 honest nodes, and one attacker node per upload and evaluation attack."""
    attackers = {TRAIN_IDS[a.name]: on_train(a) for a in TRAIN_ATTACKS}
    attackers.update({EVAL_IDS[a.name]: on_evaluate(a) for a in EVAL_ATTACKS})
    return play(HostileGrid(client_app, 3, attackers), tmp_path_factory.mktemp("attacked"), **FEDISTILL)


@pytest.fixture(scope="module")
def fedavg_runs(tmp_path_factory) -> tuple[Run, Run]:
    """FedAvg with the 3 honest nodes alone, then with one attacker node per FedAvg attack."""
    plain = play(HostileGrid(client_app, 3, order_by_node=True), tmp_path_factory.mktemp("fedavg"), **FEDAVG)
    attackers = {FEDAVG_IDS[a.name]: on_train(a) for a in FEDAVG_ATTACKS}
    hostile = play(HostileGrid(client_app, 3, attackers, order_by_node=True), tmp_path_factory.mktemp("fedavg-hostile"),
                   **FEDAVG)
    return plain, hostile


def reasons_of(record: dict[str, Any]) -> dict[int, list[str]]:
    """Each node's ``rejection-reasons`` lines, in order."""
    out: dict[int, list[str]] = {}
    for line in record.get("rejection-reasons", []):
        node = re.match(r"node (-?\d+): ", line)
        assert node, f"a reason line that names no node: {line[:200]!r}"
        out.setdefault(int(node.group(1)), []).append(line[node.end():])
    return out


def eval_refusals(logs: list[str]) -> dict[str, list[str]]:
    """Each node's logged evaluation refusals (``None``: a reply to no message sent)."""
    out: dict[str, list[str]] = {}
    for line in logs:
        if m := re.search(r"evaluate reply of node (\S+) left out: (.*)$", line, re.S):
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def assert_kinds(lines: list[str], kinds: tuple[frozenset[str], ...], what: str) -> None:
    got = [line.split(":", 1)[0] for line in lines]
    assert len(got) == len(kinds) and all(k in want for k, want in zip(got, kinds)), \
        f"{what}: refused as {got}, expected {[sorted(k) for k in kinds]}; reasons: {[r[:160] for r in lines]}"


def set_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def assert_same_sets(a: Path, b: Path, nodes: Iterable[int]) -> None:
    """The nodes' stored sets of two runs, array by array, bit for bit."""
    for node in nodes:
        name = f"round001-node{node}.npz"
        left, right = set_arrays(a / "sets" / name), set_arrays(b / "sets" / name)
        assert sorted(left) == sorted(right), name
        for key in left:
            assert left[key].dtype == right[key].dtype and left[key].shape == right[key].shape, (name, key)
            assert left[key].tobytes() == right[key].tobytes(), f"{name}: {key} differs"


def same_float(a: object, b: object) -> bool:
    """Equal bit for bit, NaN included."""
    return isinstance(a, float) and isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b)))


# -- the attacks are real: their template is accepted, and there are enough of them ---------------

def test_there_are_at_least_40_distinct_attacks_and_the_docstring_lists_each():
    names = [a.name for a in TRAIN_ATTACKS + EVAL_ATTACKS + FEDAVG_ATTACKS] + OTHER_ATTACKS
    assert len(names) == len(set(names)) >= 40
    missing = [n for n in names if not re.search(rf"^- {re.escape(n)}( \([^)]*\))? ->", __doc__, re.M)]
    assert not missing, f"attacks missing from the module docstring: {missing}"


def test_the_replies_the_attackers_change_are_accepted_unchanged(task_identity):  # noqa: F811
    """Each attack changes one thing of a valid reply: the unchanged reply passes this run's checks."""
    settings = RunSettings.from_run_config({}, **FEDISTILL)
    train = make_messages([201], {}, 1, MessageType.TRAIN)[0]
    assert len(check_reply(reply_for(train, good()), expectation(settings, INFO, 1))) == N
    evaluate = make_messages([301], {}, 1, MessageType.EVALUATE)[0]
    assert check_evaluation(reply_for(evaluate, report(1.0, MAX_EXAMPLES)), MAX_EXAMPLES) == (1.0, MAX_EXAMPLES)
    state = network_for(INFO, seed=0, width=8, depth=1).state_dict()
    fedavg_msg = make_messages([401], {}, 1, MessageType.TRAIN, state)[0]
    assert check_update(reply_for(fedavg_msg, update(model_of(fedavg_msg))), state, MAX_EXAMPLES) == 100


# -- fedistill uploads ----------------------------------------------------------------------------

@pytest.mark.parametrize("a", TRAIN_ATTACKS, ids=lambda a: a.name)
def test_an_upload_attack_is_refused_with_its_kind_and_its_reason(a: Attack, attacked: Run):
    lines = reasons_of(attacked.record).get(TRAIN_IDS[a.name], [])
    assert_kinds(lines, a.kinds, a.name)
    assert all(len(line) <= MAX_REASON_LINE for line in lines), [len(line) for line in lines]
    assert TRAIN_IDS[a.name] not in attacked.record["accepted-nodes"]
    if a.name == "silent":
        assert attacked.record.get("rejected-timeout") == 1
    if a.name == "decline-forged-figures":
        refused = attacked.record.get("privacy-figures-refused", [])
        assert any(line.startswith(f"node {TRAIN_IDS[a.name]}: ") for line in refused), refused
        assert str(TRAIN_IDS[a.name]) not in attacked.record.get("privacy", {})


def test_every_refusal_of_the_attacked_run_is_counted_once(attacked: Run):
    record = attacked.record
    replies = sum(len(a.kinds) for a in TRAIN_ATTACKS) + len(EVAL_ATTACKS)  # eval attackers decline training
    assert record["accepted-nodes"] == HONEST and record["sent"] == len(HONEST) + len(TRAIN_ATTACKS + EVAL_ATTACKS)
    assert record["rejected"] == replies + 1  # + the silent node's timeout
    assert sum(v for k, v in record.items() if k.startswith("rejected-")) == record["rejected"]
    assert len(record["rejection-reasons"]) == replies
    assert record["rejected-declined-policy"] == len(EVAL_ATTACKS) + 1  # + decline-huge-reason
    assert attacked.summary["rejected-by-kind"] == {k[len("rejected-"):]: v for k, v in record.items()
                                                     if k.startswith("rejected-")}


def test_the_attacked_run_keeps_the_honest_sets_bit_identical(baseline: Run, attacked: Run):
    assert baseline.record["accepted-nodes"] == attacked.record["accepted-nodes"] == HONEST
    assert sorted(p.name for p in (attacked.root / "sets").glob("*.npz")) == \
        sorted(p.name for p in (baseline.root / "sets").glob("*.npz"))
    assert_same_sets(baseline.root, attacked.root, HONEST)


def test_the_attacked_run_ends_with_the_attacker_free_runs_metrics(baseline: Run, attacked: Run):
    for key in ("accuracy", "loss"):
        assert same_float(baseline.record[key], attacked.record[key]), (key, baseline.record[key], attacked.record[key])
    assert baseline.record["pool-images"] == attacked.record["pool-images"]
    assert baseline.summary["accuracy"] == attacked.summary["accuracy"]
    state, hostile = RunStore(baseline.root).load_model(), RunStore(attacked.root).load_model()
    assert all(state[k].equal(hostile[k]) for k in state)


# -- federated evaluation -------------------------------------------------------------------------

def test_the_attacker_free_run_counts_every_honest_evaluation(baseline: Run, task_identity):  # noqa: F811
    record = baseline.record
    assert record.get("federated-replies") == len(HONEST) and not record.get("federated-rejected"), \
        {k: v for k, v in record.items() if k.startswith("federated")}
    # the federated accuracy is the (unweighted) mean of what the honest nodes report for the final model
    net = network_for(INFO, seed=0, width=8, depth=1)
    net.load_state_dict(RunStore(baseline.root).load_model())
    asked = make_messages(HONEST, RunSettings.from_run_config({}, **FEDISTILL).task.to_config(), 1,
                          MessageType.EVALUATE, net.state_dict())
    reported = [float(m.content["metrics"]["accuracy"]) for m in HostileGrid(client_app, 3).send_and_receive(asked)]
    assert len(reported) == len(HONEST)
    assert record["federated-accuracy"] == pytest.approx(sum(reported) / len(reported), abs=1e-12)


@pytest.mark.parametrize("a", EVAL_ATTACKS, ids=lambda a: a.name)
def test_an_evaluation_attack_is_left_out_and_counted(a: Attack, attacked: Run):
    refusals = eval_refusals(attacked.logs)
    node = str(EVAL_IDS[a.name])
    if a.name == "eval-unsolicited":  # a reply to no message sent names no node the server asked
        assert not refusals.get(node)
        assert_kinds(refusals.get("None", []), a.kinds, a.name)
    else:
        assert_kinds(refusals.get(node, []), a.kinds, a.name)
    assert (reasons_of(attacked.record)[EVAL_IDS[a.name]][0]).startswith("declined-policy")


def test_evaluation_attacks_leave_the_federated_accuracy_of_the_honest_nodes(baseline: Run, attacked: Run):
    record = attacked.record
    refused = sum(len(a.kinds) for a in EVAL_ATTACKS)
    assert record.get("federated-rejected") == refused, {k: v for k, v in record.items() if k.startswith("federated")}
    assert record.get("federated-replies") == len(HONEST)
    assert same_float(record.get("federated-accuracy"), baseline.record.get("federated-accuracy"))
    assert record.get("federated-weighting") == "unweighted"  # the default


@pytest.mark.parametrize("weighting", ["examples", "unweighted"])
@pytest.mark.parametrize("forged", [1.0, 0.0])
def test_a_forged_accuracy_at_a_legal_weight_moves_the_mean_by_at_most_its_bound(weighting, forged, baseline: Run,
                                                                                 task_identity):  # noqa: F811
    """forged-accuracy-legal-weight: one report at max-examples may pass; its pull is bounded."""
    net = network_for(INFO, seed=0, width=8, depth=1)
    net.load_state_dict(RunStore(baseline.root).load_model())
    config = RunSettings.from_run_config({}, **FEDISTILL).task.to_config()
    asked = make_messages(HONEST, config, 1, MessageType.EVALUATE, net.state_dict())
    honest = [m.content["metrics"] for m in HostileGrid(client_app, 3).send_and_receive(asked)]
    assert len(honest) == 3
    total, cap = sum(int(m["num-examples"]) for m in honest), max(int(m["num-examples"]) for m in honest)
    settings = RunSettings.from_run_config({}, **FEDISTILL, **{"evaluate-weighting": weighting, "max-examples": cap})
    plain = federated_evaluate(HostileGrid(client_app, 3), HONEST, net, settings, 1)
    liar = {301: lambda msg: [as_reply(msg, report(forged, cap))]}
    moved = federated_evaluate(HostileGrid(client_app, 3, liar), [*HONEST, 301], net, settings, 1)
    assert plain["federated-replies"] == 3 and moved["federated-replies"] == 4, (plain, moved)
    assert moved["federated-weighting"] == weighting
    bound = cap / (cap + total) if weighting == "examples" else 1 / 4
    assert abs(moved["federated-accuracy"] - plain["federated-accuracy"]) <= bound + 1e-12
    over = {301: lambda msg: [as_reply(msg, report(forged, cap + 1))]}  # one example over max-examples: refused
    refused = federated_evaluate(HostileGrid(client_app, 3, over), [*HONEST, 301], net, settings, 1)
    assert refused["federated-rejected"] == 1 and refused["federated-accuracy"] == plain["federated-accuracy"]


def test_fedavg_evaluation_replies_that_flower_could_not_aggregate_are_left_out(tmp_path):
    """A decline, a report without loss and one with a metric more: each would make Flower refuse
    the round's whole evaluation aggregation (its replies must share their metric keys); left out,
    the run ends as if those nodes had stayed silent."""
    def at_evaluate(content: Content) -> Behaviour:
        return lambda msg: [] if msg.metadata.message_type == MessageType.TRAIN else [as_reply(msg, content)]
    hostile = {501: at_evaluate(report(declined=1, examples=0)), 502: at_evaluate({"metrics": {
        "num-examples": 100, "accuracy": 0.5}}), 503: at_evaluate(report(extra=1.0))}
    config = {**FEDAVG, "fraction-evaluate": 1.0, "num-server-rounds": 1}
    silent = play(HostileGrid(client_app, 3, {n: (lambda msg: []) for n in hostile}, order_by_node=True),
                  tmp_path / "silent", **config)
    attacked = play(HostileGrid(client_app, 3, hostile, order_by_node=True), tmp_path / "attacked", **config)
    assert attacked.summary["status"] == silent.summary["status"] == "ok"
    assert same_float(attacked.summary["accuracy"], silent.summary["accuracy"])
    refused = [line for line in attacked.logs if "FedAvg reply of node" in line]
    assert sorted(int(re.search(r"node (\d+)", line).group(1)) for line in refused) == [502, 503], refused
    assert not any("Flower refused to aggregate" in line for line in attacked.logs)


# -- identity -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def claim_runs(tmp_path_factory) -> tuple[Run, Run]:
    """An attacker uploads a valid set claiming the honest node 101's client id ("0"), and the same set
    claiming its own: a claim is a label, so both runs must train on the same pool."""
    def claiming(client: str) -> Behaviour:
        return on_train(attack("claim", lambda: good_content(SEED, client=client)))
    config = {**FEDISTILL, "fraction-evaluate": 0.0}
    victim_claim = play(HostileGrid(client_app, 3, {501: claiming("0")}), tmp_path_factory.mktemp("claim"), **config)
    own_claim = play(HostileGrid(client_app, 3, {501: claiming("501")}), tmp_path_factory.mktemp("own"), **config)
    return victim_claim, own_claim


def test_claiming_an_honest_nodes_client_id_evicts_nobody_and_changes_nothing(baseline: Run, claim_runs):
    """client-id-claim: the victim's set is accepted bit-identical; the claim only reaches the log."""
    victim_claim, own_claim = claim_runs
    assert victim_claim.record["accepted-nodes"] == [*HONEST, 501] and victim_claim.record["rejected"] == 0, \
        victim_claim.record.get("rejection-reasons")
    assert_same_sets(baseline.root, victim_claim.root, HONEST)
    claims = {n: json.loads(str(set_arrays(victim_claim.root / "sets" / f"round001-node{n}.npz")["meta_json"]))
              ["client"] for n in (101, 501)}
    assert claims == {101: "0", 501: "0"}
    assert any("claims client id" in line for line in victim_claim.logs), victim_claim.logs
    for key in ("accuracy", "loss"):
        assert same_float(victim_claim.record[key], own_claim.record[key]), key


# -- FedAvg ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("a", FEDAVG_ATTACKS, ids=lambda a: a.name)
def test_a_fedavg_attack_is_refused_before_averaging(a: Attack, fedavg_runs):
    _, hostile = fedavg_runs
    assert [m["round"] for m in hostile.metrics] == [1, 2]
    for record in hostile.metrics:
        lines = reasons_of(record).get(FEDAVG_IDS[a.name], [])
        assert_kinds(lines, a.kinds, f"round {record['round']}: {a.name}")
        assert all(len(line) <= MAX_REASON_LINE for line in lines)


def test_fedavg_attackers_leave_the_run_as_if_they_sent_nothing(fedavg_runs):
    plain, hostile = fedavg_runs
    for clean, attacked in zip(plain.metrics, hostile.metrics, strict=True):
        assert attacked.get("rejected") == len(FEDAVG_ATTACKS), attacked.get("rejection-reasons")
        assert sum(v for k, v in attacked.items() if k.startswith("rejected-")) == attacked["rejected"]
        for key in ("accuracy", "loss"):
            assert same_float(clean[key], attacked[key]), (attacked["round"], key, clean[key], attacked[key])
    state, hostile_state = RunStore(plain.root).load_model(), RunStore(hostile.root).load_model()
    assert all(state[k].equal(hostile_state[k]) for k in state)


# -- the contract's fallbacks ---------------------------------------------------------------------

def test_a_set_poisoned_in_the_store_after_acceptance_is_quarantined_on_resume(baseline: Run, tmp_path):
    root = Path(shutil.copytree(baseline.root, tmp_path / baseline.root.name))
    victim = root / "sets" / "round001-node101.npz"
    data = set_arrays(victim)
    data["images"][0, 0, 0, 0] = np.nan
    np.savez(victim, **data)
    summary = play(HostileGrid(client_app, 3), tmp_path, resume=str(root)).summary
    quarantined = root / "sets" / "quarantined"
    assert (quarantined / victim.name).exists() and not victim.exists()
    assert (quarantined / f"{victim.name}.reason.txt").read_text().strip()
    assert [q.split(":")[0] for q in summary["resume-quarantined"]] == [f"sets/{victim.name}"]


@pytest.mark.parametrize("fail", ["closed", "open"])
def test_a_defense_that_raises_fails_as_configured(fail, tmp_path, monkeypatch):
    """A set crafted to crash the defense must not slip past it (closed) or stop the round (open)."""
    def crash(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("crafted set crashed the defense")

    monkeypatch.setattr("server.defenses.screen", crash)
    record = play(HostileGrid(client_app, 3), tmp_path, defense="outlier", **{"defense-fail": fail},
                  **{**FEDISTILL, "fraction-evaluate": 0.0}).record
    assert record["defense"]["fail"] == fail and "crafted set crashed" in record["defense"]["error"]
    if fail == "closed":
        assert record["accepted"] == 0 and record["rejected-defense-dropped"] == 3 and "accuracy" not in record
    else:
        assert record["accepted-nodes"] == HONEST and "rejected-defense-dropped" not in record


def test_a_run_name_cannot_leave_runs_dir(tmp_path):
    runs = tmp_path / "deep" / "runs"
    with pytest.raises(ValueError, match="run-name"):
        play(HostileGrid(client_app, 3), runs, **{"run-name": "x/../../../../escaped"}, **FEDISTILL)
    assert not runs.exists() and not any(tmp_path.rglob("escaped*"))


# -- the figures BENCHMARKS.md "Reliability" quotes -----------------------------------------------

def test_the_suite_reports_its_figures(baseline: Run, attacked: Run, fedavg_runs):
    """Counts of the shared runs; written as JSON when ``$FEDISTILL_HOSTILE_REPORT`` names a file."""
    import os
    plain, hostile = fedavg_runs
    fedavg_rejected = sum(m.get("rejected", 0) for m in hostile.metrics)
    state, attacked_state = RunStore(baseline.root).load_model(), RunStore(attacked.root).load_model()
    figures = {
        "attacks": {"upload": len(TRAIN_ATTACKS), "evaluation": len(EVAL_ATTACKS), "fedavg": len(FEDAVG_ATTACKS),
                    "shown-harmless-by-own-runs": len(OTHER_ATTACKS)},
        "attack-kinds": len(TRAIN_ATTACKS + EVAL_ATTACKS + FEDAVG_ATTACKS) + len(OTHER_ATTACKS),
        "fedistill": {"honest-sets-kept": len(attacked.record["accepted-nodes"]), "honest-nodes": len(HONEST),
                      "rejected-by-kind": attacked.summary["rejected-by-kind"],
                      "federated-rejected": attacked.record.get("federated-rejected", 0),
                      "accuracy": attacked.record["accuracy"], "attacker-free-accuracy": baseline.record["accuracy"],
                      "global-model-bit-identical": all(state[k].equal(attacked_state[k]) for k in state)},
        "fedavg": {"rounds": len(hostile.metrics), "rejected": fedavg_rejected,
                   "accuracy": hostile.summary["accuracy"], "attacker-free-accuracy": plain.summary["accuracy"]},
    }
    assert figures["fedistill"]["honest-sets-kept"] == len(HONEST) and figures["fedistill"]["global-model-bit-identical"]
    assert figures["fedistill"]["accuracy"] == figures["fedistill"]["attacker-free-accuracy"]
    assert figures["fedavg"]["accuracy"] == figures["fedavg"]["attacker-free-accuracy"]
    assert fedavg_rejected == len(FEDAVG_ATTACKS) * len(hostile.metrics)
    if path := os.environ.get("FEDISTILL_HOSTILE_REPORT"):
        Path(path).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
