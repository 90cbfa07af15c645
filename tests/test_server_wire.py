"""The wire rules every reply meets before it is decoded: records, size, strict metadata types."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from distill.data import load_dataset
from server.settings import RunSettings
from server.store import RunStore
from server.validate import Expectation, Rejected, check_meta
from server.wire import (MAX_META_CHARS, UPLOAD_RECORDS, canonical_meta, check_records, check_reply_size,
                         parse_meta, reply_bytes)

INFO = load_dataset().info
EXP = Expectation(INFO, "dm", ipc=2, round=1)


def _meta(**changes) -> dict:
    return {"dataset": INFO.to_dict(), "method": "dm", "ipc": 2, "round": 1, **changes}


def test_an_honest_metadata_passes_and_reads_back_identically():
    meta = check_meta(json.dumps(_meta(privacy={"epsilon": 1.5, "accountant": "rdp"}, extra={"soft": True})), EXP)
    assert parse_meta(canonical_meta(meta)) == meta


@pytest.mark.parametrize("changes", [{"ipc": "2"}, {"round": 1.9}, {"round": True}, {"ipc": 2.0},
                                     {"seed": "0"}, {"client": 7}, {"method": ["dm"]},
                                     {"privacy": {"epsilon": [1, 2]}}, {"extra": {"nested": {"a": 1}}},
                                     {"unknown": 1}, {"dataset": {**INFO.to_dict(), "channels": "1"}},
                                     {"dataset": {**INFO.to_dict(), "mean": ["0.1"]}},
                                     {"dataset": {**INFO.to_dict(), "extra": 1}}],
                         ids=lambda c: next(iter(c)) + "=" + repr(next(iter(c.values())))[:20])
def test_metadata_types_are_strict_never_coerced(changes):
    with pytest.raises(Rejected) as err:
        check_meta(json.dumps(_meta(**changes)), EXP)
    assert err.value.kind == "metadata" and "set-meta" in err.value.detail


@pytest.mark.parametrize("raw", ["[1, 2]", '"text"', "null", "{" * 5000 + "}" * 5000])
def test_metadata_that_is_not_an_object_is_refused(raw):
    with pytest.raises(Rejected) as err:
        parse_meta(raw)
    assert err.value.kind == "metadata"


def test_the_size_limit_applies_to_the_stored_form():
    """12,000 'é' fit 64 KiB as received characters but are 72 KB once escaped as the store writes them."""
    received = json.dumps(_meta(client="é" * 12_000), ensure_ascii=False)
    assert len(received) < MAX_META_CHARS < len(json.dumps(json.loads(received)))
    with pytest.raises(Rejected, match="as stored") as err:
        check_meta(received, EXP)
    assert err.value.kind == "metadata"
    check_meta(json.dumps(_meta(client="é" * 10_000), ensure_ascii=False), EXP)  # 60 KB stored: kept


def _upload(**extra) -> RecordDict:
    content = RecordDict({"synthetic": ArrayRecord({"images": Array(np.zeros((1, 1, 28, 28), np.float32))}),
                          "meta": ConfigRecord({"set-meta": "{}"}), "metrics": MetricRecord({"seconds": 1.0})})
    for name, record in extra.items():
        content[name] = record
    return content


def test_records_one_more_is_records_one_missing_is_malformed():
    check_records(_upload(), UPLOAD_RECORDS)
    with pytest.raises(Rejected) as err:
        check_records(_upload(extra=ConfigRecord({"x": 1})), UPLOAD_RECORDS)
    assert err.value.kind == "records"
    content = _upload()
    del content["meta"]
    with pytest.raises(Rejected) as err:
        check_records(content, UPLOAD_RECORDS)
    assert err.value.kind == "malformed"


def test_reply_size_counts_arrays_strings_and_numbers_and_bounds_them():
    content = _upload()
    base = reply_bytes(content)
    assert base >= 28 * 28 * 4
    content["metrics"] = MetricRecord({"seconds": 1.0, "class-histogram": [1] * 1000})
    assert reply_bytes(content) == base + len("class-histogram") + 8 * 1000
    content["meta"] = ConfigRecord({"set-meta": "x" * 1_000_000})
    with pytest.raises(Rejected) as err:
        check_reply_size(content, EXP.max_reply_bytes())
    assert err.value.kind == "oversized"


@pytest.mark.parametrize("name", ["x/../../../../escaped", "../up", "a/b", "..", ".hidden", "", "a" * 65,
                                  "tab\tname", "é"])
def test_unsafe_run_names_are_refused_before_anything_is_written(name, tmp_path):
    runs = tmp_path / "runs"
    if name:
        with pytest.raises(ValueError, match="run-name"):
            RunSettings.from_run_config({"run-name": name})
    with pytest.raises(ValueError, match="run name"):
        RunStore.create(runs, name)
    assert not runs.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_safe_run_name_stays_under_runs_dir(tmp_path):
    store = RunStore.create(tmp_path, "exp-1.a_b")
    assert store.root.parent == tmp_path and store.root.name.endswith("-exp-1.a_b")


@pytest.mark.parametrize("key,value", [("defense-fail", "maybe"), ("evaluate-weighting", "median"),
                                       ("max-examples", 0)])
def test_bad_bound_settings_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        RunSettings.from_run_config({key: value})
