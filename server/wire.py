"""The shape of a reply on the wire, checked before anything in it is decoded or believed.

Three rules, each cheap and each applied to every reply as it arrives (server/rounds.py):

- **Records**: a reply carries exactly the records its kind has (an upload: ``synthetic``,
  ``meta``, ``metrics``; a decline: ``declined``, ``metrics``; a FedAvg update: ``arrays``,
  ``metrics``). One more is refused as ``records``, whatever its size; one missing is ``malformed``.
- **Size**: the whole reply (array bytes, config strings and metric values) is bounded; over the
  bound it is ``oversized`` before a byte is decoded.
- **Metadata types**: ``set-meta`` is parsed against a strict schema. ``"ipc": "2"`` or
  ``"round": 1.9`` is refused, never coerced, and the 64 KiB limit applies to the canonical form the
  run store keeps (``json.dumps`` escapes every non-ASCII character: 12,000 "é" are 72 KB there).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from distill.synthetic import SetMetadata
from distill.upload import MAX_META_CHARS

from .errors import Rejected

MAX_SCALAR_BYTES = 8  # a metric or config number as it travels
UPLOAD_RECORDS = {"synthetic": ArrayRecord, "meta": ConfigRecord, "metrics": MetricRecord}
DECLINE_RECORDS = {"declined": ConfigRecord, "metrics": MetricRecord}
FEDAVG_RECORDS = {"arrays": ArrayRecord, "metrics": MetricRecord}
EVALUATE_RECORDS = {"metrics": MetricRecord}


def check_records(content: RecordDict, allowed: Mapping[str, type]) -> None:
    """Exactly ``allowed``'s records, each of its type: ``records`` for one too many, ``malformed``
    for one missing or of another type."""
    names = set(content.keys())
    if extra := sorted(names - set(allowed)):
        raise Rejected("records", f"unexpected records {_few(extra)}; a reply of this kind has {sorted(allowed)}")
    mistyped = sorted(k for k in set(allowed) & names if not isinstance(content[k], allowed[k]))
    if (missing := sorted(set(allowed) - names)) or mistyped:
        raise Rejected("malformed", f"missing records {missing}, mistyped {mistyped}; expected {sorted(allowed)}")


def _few(names: list[str]) -> str:
    shown = [n[:40] for n in names[:5]]
    return f"{shown}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def reply_bytes(content: RecordDict) -> int:
    """Bytes a reply's content occupies: array payloads, strings and bytes as sent, numbers 8 each."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(arr.data) + 64 for arr in record.values())
        else:
            total += sum(len(str(key)) + _value_bytes(value) for key, value in record.items())
    return total


def _value_bytes(value: object) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return MAX_SCALAR_BYTES


def check_reply_size(content: RecordDict, limit: int) -> None:
    """``oversized`` for a reply over ``limit`` bytes (counted by :func:`reply_bytes`)."""
    size = reply_bytes(content)
    if size > limit:
        raise Rejected("oversized", f"reply of {size} bytes; this run accepts at most {limit}")


def is_int(value: object) -> bool:
    """A JSON integer: an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A JSON number: int or float, never a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar(value: object) -> bool:
    return is_number(value) or isinstance(value, (str, bool))


def _numbers(value: object) -> bool:
    return isinstance(value, list) and all(is_number(v) for v in value)


Rule = Callable[[object], bool]
DATASET_SCHEMA: dict[str, Rule] = {
    "name": lambda v: isinstance(v, str), "num_classes": is_int, "channels": is_int, "height": is_int,
    "width": is_int, "mean": _numbers, "std": _numbers}
META_SCHEMA: dict[str, Rule] = {
    "dataset": lambda v: isinstance(v, dict) and _matches(v, DATASET_SCHEMA, set(DATASET_SCHEMA)) == [],
    "method": lambda v: isinstance(v, str), "ipc": is_int, "seed": is_int, "client": lambda v: isinstance(v, str),
    "round": is_int, "iterations": is_int,
    "privacy": lambda v: isinstance(v, dict) and all(is_number(x) or isinstance(x, str) for x in v.values()),
    "extra": lambda v: isinstance(v, dict) and all(_scalar(x) for x in v.values()),
}
META_REQUIRED = {"dataset", "method", "ipc"}


def _matches(d: dict, schema: Mapping[str, Rule], required: Iterable[str]) -> list[str]:
    """What is wrong with ``d`` against ``schema`` (empty when nothing is)."""
    problems = [f"missing {k!r}" for k in sorted(set(required) - set(d))]
    problems += [f"unknown key {str(k)[:40]!r}" for k in sorted(map(str, set(d) - set(schema)))[:5]]
    problems += [f"{k!r} has the wrong type ({type(d[k]).__name__})" for k in sorted(set(d) & set(schema))
                 if not schema[k](d[k])]
    return problems


def parse_meta(meta_json: object) -> SetMetadata:
    """The set metadata of a reply or a stored set, strictly typed, or :class:`Rejected` (``metadata``).

    The size limit applies twice: to the text as received (before parsing it) and to the
    canonical form the store keeps, so that what is accepted can always be read back.
    """
    if not isinstance(meta_json, str) or len(meta_json) > MAX_META_CHARS:
        raise Rejected("metadata", "set-meta must be a JSON string under 64 KiB")
    try:
        raw: Any = json.loads(meta_json)
    except (ValueError, RecursionError) as err:
        raise Rejected("metadata", f"unreadable set-meta ({type(err).__name__})") from err
    if not isinstance(raw, dict):
        raise Rejected("metadata", f"set-meta must be a JSON object, got {type(raw).__name__}")
    if problems := _matches(raw, META_SCHEMA, META_REQUIRED):
        raise Rejected("metadata", "set-meta: " + "; ".join(problems[:6]))
    try:
        meta = SetMetadata.from_dict(raw)
    except (ValueError, KeyError, TypeError, OverflowError) as err:
        raise Rejected("metadata", f"unreadable set-meta ({type(err).__name__}: {str(err)[:200]})") from err
    if (size := len(canonical_meta(meta))) > MAX_META_CHARS:
        raise Rejected("metadata", f"set-meta is {size} characters as stored (non-ASCII characters are "
                                   f"escaped); the limit is {MAX_META_CHARS}")
    return meta


def canonical_meta(meta: SetMetadata) -> str:
    """The metadata exactly as the run store writes it (and resume reads it back)."""
    return json.dumps(meta.to_dict())
