"""Checks of what nodes send about the global model: FedAvg updates and evaluation reports.

Both are weighted by a count the node reports, so both are bounded by the server's
``max-examples``: one node claiming 2^53 - 1 examples would otherwise decide the average alone.
An update must be the global model's own shape (same keys, shapes, dtypes), finite, and come with
nothing else; a refused one is left out of the average and counted like a refused upload.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from flwr.app import Message, MetricRecord

from .errors import Rejected
from .validate import decode_array
from .wire import EVALUATE_RECORDS, FEDAVG_RECORDS, check_records, check_reply_size, is_int, is_number

EVALUATE_METRICS = ("num-examples", "accuracy", "loss")
DECLINED_EVALUATION = ("num-examples", "accuracy", "loss", "declined")
UPDATE_METRICS = ("num-examples", "bytes-uploaded")
WEIGHTINGS = ("unweighted", "examples")  # how federated evaluation averages the nodes' accuracies


def check_examples(value: object, max_examples: int) -> int:
    """``num-examples`` as the weight of a reply: an integer in [1, max_examples], else ``metadata``."""
    if not is_int(value) or not 1 <= value <= max_examples:
        raise Rejected("metadata", f"num-examples {str(value)[:40]} is not an integer in [1, {max_examples}] "
                                   "(the server's max-examples)")
    return int(value)


def _metric_keys(metrics: MetricRecord, expected: tuple[str, ...]) -> None:
    """Exactly ``expected``: Flower's strategy refuses to aggregate replies whose metric keys
    differ, so one reply with a key more or less would otherwise stop the whole aggregation."""
    if set(metrics) != set(expected):
        got = sorted(str(k)[:40] for k in metrics)[:8]
        raise Rejected("metadata", f"metrics {got}; a reply of this kind reports exactly {sorted(expected)}")


def check_update(reply: Message, reference: Mapping[str, torch.Tensor], max_examples: int,
                 max_abs_weight: float = math.inf) -> int:
    """A FedAvg reply fit to average into ``reference`` (the global model's state): its weight.

    Raises :class:`Rejected` for an error reply, other records or metrics, a size over the
    model's, keys, declared or decoded dtypes and shapes other than the model's, non-finite
    values or values beyond ``max_abs_weight`` (``magnitude``: a finite 1e30 would still decide the
    average), a ``num-examples`` outside [1, max_examples] or a ``bytes-uploaded`` that is no count.
    """
    if reply.has_error():
        raise Rejected("error-reply", f"code {reply.error.code}: {str(reply.error.reason)[-300:]}")
    content = reply.content
    model_bytes = sum(t.numel() * t.element_size() for t in reference.values())
    check_reply_size(content, model_bytes + 256 * (len(reference) + 8) + 4096)
    check_records(content, FEDAVG_RECORDS)
    record, metrics = content["arrays"], content["metrics"]
    _metric_keys(metrics, UPDATE_METRICS)
    weight = check_examples(metrics.get("num-examples"), max_examples)
    if not (is_int(metrics["bytes-uploaded"]) and 0 <= metrics["bytes-uploaded"] < 2**53):
        raise Rejected("metadata", "bytes-uploaded must be an integer count")
    if set(record.keys()) != set(reference):
        missing, extra = sorted(set(reference) - set(record.keys())), sorted(set(record.keys()) - set(reference))
        raise Rejected("keys", f"update keys differ from the model's: missing {missing[:5]}, extra "
                               f"{[str(e)[:40] for e in extra[:5]]}")
    for key, tensor in reference.items():
        want_dtype, want_shape = str(tensor.numpy().dtype), tuple(tensor.shape)
        arr = record[key]
        if str(arr.dtype) != want_dtype:
            raise Rejected("dtype", f"{key}: {str(arr.dtype)[:20]}, the model has {want_dtype}")
        if tuple(arr.shape) != want_shape:
            raise Rejected("shape", f"{key}: {tuple(arr.shape)[:8]}, the model has {want_shape}")
        value = decode_array(key, arr)
        if value.dtype != np.dtype(want_dtype) or value.shape != want_shape:
            raise Rejected("shape", f"{key} decodes to {value.shape} {value.dtype}, not as declared")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise Rejected("non-finite", f"NaN or Inf in {key}")
        if value.size and float(np.abs(value).max()) > max_abs_weight:
            raise Rejected("magnitude", f"|{key}| up to {float(np.abs(value).max()):.3g} > max-abs-weight "
                                        f"{max_abs_weight:g}")
    return weight


def check_evaluation(reply: Message, max_examples: int) -> tuple[float, int] | None:
    """(accuracy, examples) of a plausible evaluate reply; ``None`` for a decline (under DP a node
    reports nothing). Raises :class:`Rejected` for anything else that is not one."""
    if reply.has_error():
        raise Rejected("error-reply", f"code {reply.error.code}")
    check_reply_size(reply.content, 4096)
    check_records(reply.content, EVALUATE_RECORDS)
    metrics = reply.content["metrics"]
    if "declined" in metrics and metrics["declined"] == 1:
        _metric_keys(metrics, DECLINED_EVALUATION)
        return None
    _metric_keys(metrics, EVALUATE_METRICS)
    acc, loss = metrics["accuracy"], metrics["loss"]
    if not (is_number(acc) and math.isfinite(acc) and 0.0 <= acc <= 1.0):
        raise Rejected("metadata", f"accuracy {str(acc)[:40]} is not a number in [0, 1]")
    if not (is_number(loss) and math.isfinite(loss) and loss >= 0.0):
        raise Rejected("metadata", f"loss {str(loss)[:40]} is not a finite number >= 0")
    return float(acc), check_examples(metrics["num-examples"], max_examples)


def federated_mean(results: list[tuple[float, int]], weighting: str) -> float:
    """The nodes' mean accuracy, weighted by examples (each bounded already) or unweighted."""
    if not results:
        return float("nan")
    accs = [acc for acc, _ in results]
    weights = [n for _, n in results] if weighting == "examples" else [1] * len(results)
    return float(np.average(accs, weights=weights))
