"""A reply as the bytes a node pushes, built by hand: what Flower's constructors refuse can still be sent.

Why: ``Array(ndarray)``, ``MetricRecord``, ``ConfigRecord`` and ``RecordDict`` refuse some values
(object arrays, a string in a MetricRecord, ``None`` anywhere, a list where a record belongs), but
they run on the sender. A hostile node sends Flower 1.42's wire form directly: a tree of
*inflatable objects* (``<type> <children ids> <body length>`` + body; object id = sha256 of the
content). The SuperLink only checks each object's head (``validate_object_content``), not its body,
and the ServerApp's Grid inflates the tree in ``pull_messages`` (``inflate_object_from_contents``).

:func:`wire_objects` encodes a reply the fuzz built as plain values into such objects, without
calling Flower's constructors: arrays as ``.npy`` bytes (object arrays pickled, as a hostile
sender would), record values with the proto type that fits them; a MetricRecord holding values
only a ConfigRecord can carry travels as a ConfigRecord; a value no record type can carry is an
item whose value is unset; something that is not a record at all is an ``ArrayChunk`` in a
record's place. :func:`inflate` then runs Flower's own inflation, as the ServerApp's Grid does.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from flwr.common.serde_utils import _record_value_to_proto, error_to_proto, metadata_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import ConfigRecord as ProtoConfigRecord
from flwr.proto.recorddict_pb2 import ConfigRecordValue, MetricRecordValue
from flwr.proto.recorddict_pb2 import MetricRecord as ProtoMetricRecord
from flwr.supercore.constant import HEAD_BODY_DIVIDER, HEAD_VALUE_DIVIDER
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, validate_object_content

from tests.flower_fixtures import with_metadata

RECORD_KINDS = {"synthetic": "ArrayRecord", "metrics": "MetricRecord"}  # any other name: a ConfigRecord
METRIC_TYPES: list[type] = [int, float]
CONFIG_TYPES: list[type] = [bool, int, float, str, bytes]  # bool first: it is an int too


class Objects(dict):
    """Object id -> object content, as the SuperLink stores a pushed message."""

    def put(self, type_name: str, body: bytes, children: list[str] | tuple[str, ...] = ()) -> str:
        head = f"{type_name}{HEAD_VALUE_DIVIDER}{','.join(dict.fromkeys(children))}{HEAD_VALUE_DIVIDER}{len(body)}"
        content = head.encode() + HEAD_BODY_DIVIDER + body
        validate_object_content(content)  # what the SuperLink checks when a node pushes it
        object_id = hashlib.sha256(content).hexdigest()
        self[object_id] = content
        return object_id


def _has_bool(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value))


def _fits(value: Any, types: list[type]) -> bool:
    """Whether a proto field of ``types`` holds ``value`` (a bool is no metric, though an ``int``)."""
    if _has_bool(value) and bool not in types:
        return False
    try:
        _record_value_to_proto(value, list(types), ConfigRecordValue)
        return True
    except (TypeError, ValueError):  # no proto field for it, or an integer out of range
        return False


def _proto_value(value: Any, types: list[type], proto: type) -> Any:
    """The value's proto, or one with no value set when nothing in the schema can hold it."""
    return _record_value_to_proto(value, list(types), proto) if _fits(value, types) else proto()


def _npy(value: Any) -> tuple[str, list[int], bytes]:
    """dtype, shape and ``.npy`` bytes of anything, pickled where numpy needs to."""
    array = value if isinstance(value, np.ndarray) else np.asarray(value, dtype=object if isinstance(value, dict)
                                                                   else None)
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return str(array.dtype), list(array.shape), buf.getvalue()


def _array(objects: Objects, value: Any) -> str:
    if isinstance(value, Array):
        dtype, shape, stype, data = value.dtype, list(value.shape), value.stype, value.data
    else:
        (dtype, shape, data), stype = _npy(value), "numpy.ndarray"
    chunks = [objects.put("ArrayChunk", bytes(data))] if data else []
    body = json.dumps({"dtype": dtype, "shape": shape, "stype": stype,
                       "arraychunk_ids": list(range(len(chunks)))}).encode()
    return objects.put("Array", body, chunks)


def _record(objects: Objects, name: str, record: Any) -> str:
    """One record of the reply's content, by its Flower type or (plain dict) by its name."""
    if isinstance(record, (ArrayRecord, ConfigRecord, MetricRecord)):
        kind = type(record).__name__
    elif isinstance(record, Mapping):
        kind = RECORD_KINDS.get(name, "ConfigRecord")
    else:  # not a record at all: the nearest bytes are another object in the record's place
        return objects.put("ArrayChunk", repr(record).encode())
    if kind == "ArrayRecord":
        ids = {str(k): _array(objects, v) for k, v in record.items()}
        return objects.put("ArrayRecord", json.dumps(ids).encode(), list(ids.values()))
    values = dict(record)
    if kind == "MetricRecord" and not all(_fits(v, METRIC_TYPES) for v in values.values()) \
            and all(_fits(v, CONFIG_TYPES) for v in values.values()):
        kind = "ConfigRecord"  # strings, bools or bytes: the sender just types the record as a ConfigRecord
    proto, value_proto, types = ((ProtoMetricRecord, MetricRecordValue, METRIC_TYPES) if kind == "MetricRecord"
                                 else (ProtoConfigRecord, ConfigRecordValue, CONFIG_TYPES))
    items = [proto.Item(key=str(k), value=_proto_value(v, types, value_proto)) for k, v in values.items()]
    return objects.put(kind, proto(items=items).SerializeToString(deterministic=True))


def wire_objects(instruction: Message, content: Mapping[str, Any] | Error) -> tuple[str, Objects]:
    """The reply to ``instruction`` carrying ``content``, as (message object id, objects)."""
    objects = Objects()
    metadata = metadata_to_proto(Message(Error(code=0), reply_to=instruction).metadata)
    metadata.message_id = ""
    if isinstance(content, Error):
        body = ProtoMessage(metadata=metadata, error=error_to_proto(content)).SerializeToString(deterministic=True)
        return objects.put("Message", body), objects
    ids = {str(name): _record(objects, str(name), record) for name, record in content.items()}
    record_dict = objects.put("RecordDict", json.dumps(ids).encode(), list(ids.values()))
    body = ProtoMessage(metadata=metadata).SerializeToString(deterministic=True)
    return objects.put("Message", body, [record_dict]), objects


def inflate(message_id: str, objects: Objects) -> Message:
    """What the ServerApp's Grid does with a pulled reply (``flwr.superlink.grid.http_grid``)."""
    message = inflate_object_from_contents(message_id, dict(objects), keep_object_contents=True)
    assert isinstance(message, Message)
    return with_metadata(message, message_id=message_id)


def raw_reply(instruction: Message, content: Mapping[str, Any] | Error) -> Message:
    """The reply as the server would see it after Flower inflated the raw bytes; raises whatever
    Flower's inflation raises when it cannot."""
    return inflate(*wire_objects(instruction, content))
