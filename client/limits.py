"""A node's own upper bounds on what a task may ask of it, whatever the server sends.

The server chooses the task (threads, iterations, ipc, the network) and, in iterative mode or
under FedAvg, sends a global model; a node that took them as given could be made to spin all its
cores, run for days, or decode and load an arbitrary set of tensors. These bounds come from the
node's own node-config and apply to every task, with or without a privacy policy (whose
``policy-max-*`` keys bound DP rounds as well: the stricter value wins).

Node-config keys (defaults in brackets):

- ``limit-threads`` [the CPUs this process may use]: torch threads; a task asking for more is
  run with this many (not declined).
- ``limit-iterations`` [20000, the DM paper's longest schedule]: distillation iterations, and a DP
  method's noisy queries (DP gradient matching's iterations x outer loops, DP experts' steps).
- ``limit-ipc`` [50, the largest budget of the literature's benchmarks]: images (or stored bases)
  per class.
- ``limit-model-mib`` [64]: the network the task asks the node to build (``net-width``,
  ``net-depth``, on its data's geometry), and the global model's arrays as received.
- ``limit-local-epochs`` [50]: a FedAvg round's passes over the local data (``local-epochs``),
  FedAvg's counterpart of ``limit-iterations``.
- ``limit-batch-size`` [1024]: every batch size among the method's settings (``dm.batch-real``,
  ``dc.batch-train``, ``mtt.expert-batch``, ``dpsgd-gm.chunk``...) and, in a FedAvg round,
  ``local-batch-size``: a batch's activations are what costs memory.
- ``limit-steps`` [1000]: every other integer setting of the method (inner loops and steps,
  experts and their epochs, models, pool sizes...; seeds aside), each of which multiplies the work
  of an iteration; and an expert buffer's snapshots (``num-experts x (expert-train-epochs + 1)``),
  all held in memory.

A task over ``limit-iterations``, ``limit-ipc``, ``limit-local-epochs``, ``limit-batch-size`` or
``limit-steps`` is declined (kind "policy", the reason names the limit). A global model must have
exactly the tensors of the network the node builds for the task
(:func:`client.local.expected_state`): the same names, shapes and dtypes, finite values; anything
else is declined before it is loaded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

from distill.task import DistillTask, method_config

PREFIX = "limit-"
DEFAULT_ITERATIONS = 20_000
DEFAULT_IPC = 50
DEFAULT_MODEL_MIB = 64
DEFAULT_LOCAL_EPOCHS = 50
DEFAULT_BATCH_SIZE = 1024
DEFAULT_STEPS = 1000
BATCH_SETTINGS = ("chunk",)  # examples per per-example-gradient chunk: a batch too, by another name
NPY_HEADER_SLACK = 4096  # what np.save adds to an array's bytes (the header), with room to spare
MiB = 2**20


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class NodeLimits:
    """The node's bounds (see the module docstring); every field an integer >= 1."""

    threads: int
    iterations: int = DEFAULT_ITERATIONS
    ipc: int = DEFAULT_IPC
    model_mib: int = DEFAULT_MODEL_MIB
    local_epochs: int = DEFAULT_LOCAL_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    steps: int = DEFAULT_STEPS

    def __post_init__(self) -> None:
        for name in ("threads", "iterations", "ipc", "model_mib", "local_epochs", "batch_size", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"node-config {PREFIX}{name.replace('_', '-')} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "NodeLimits":
        """The node's limits; an unknown ``limit-*`` key is an error (a misspelt bound must not vanish)."""
        known = {"limit-threads", "limit-iterations", "limit-ipc", "limit-model-mib", "limit-local-epochs",
                 "limit-batch-size", "limit-steps"}
        unknown = sorted(str(k) for k in node_config if str(k).startswith(PREFIX) and k not in known)
        if unknown:
            raise ValueError(f"node-config {unknown}: unknown limit keys; known: {sorted(known)}")
        values = {k[len(PREFIX):].replace("-", "_"): _integer(v, str(k)) for k, v in node_config.items() if k in known}
        return cls(**{"threads": available_cpus(), **values})

    @property
    def model_bytes(self) -> int:
        return self.model_mib * MiB

    def threads_for(self, asked: int) -> int:
        """The torch threads a task asking for ``asked`` gets."""
        return max(1, min(asked, self.threads))

    def refusal(self, task: DistillTask) -> str | None:
        """Why the task's size is over this node's limits, or None."""
        asked = [("iterations", "iterations", task.iterations, self.iterations), ("ipc", "ipc", task.ipc, self.ipc)]
        prefix = f"{task.distill_method}."
        for key, value in sorted(task.settings.items()):
            if isinstance(value, int) and not isinstance(value, bool) and not key.endswith("seed"):
                name = prefix + key.replace("_", "-")
                asked.append((name, "batch-size", value, self.batch_size) if key in BATCH_SETTINGS or "batch" in key
                             else (name, "steps", value, self.steps))
        if {"num_experts", "expert_train_epochs"} <= set(task.settings):  # the expert buffer, held in memory
            snapshots = task.settings["num_experts"] * (task.settings["expert_train_epochs"] + 1)
            asked.append((f"{prefix}num-experts x ({prefix}expert-train-epochs + 1)", "steps", snapshots, self.steps))
        if task.dp != "none":  # a DP method's noisy queries (DP gradient matching's loops, DP experts' steps)
            asked.append(("the DP method's noisy queries", "iterations", method_config(task, seed=0).queries,
                          self.iterations))
        if task.algorithm == "fedavg":  # only FedAvg's local update reads these
            asked += [("local-epochs", "local-epochs", task.local_epochs, self.local_epochs),
                      ("local-batch-size", "batch-size", task.local_batch_size, self.batch_size)]
        over = [f"{name} {value} > {PREFIX}{limit_name} {limit}" for name, limit_name, value, limit in asked
                if value > limit]
        return f"the run asks {', '.join(over)} (this node's limits)" if over else None


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"node-config {key} must be an integer, got {value!r}")
    try:
        number = float(value)
    except ValueError as err:
        raise ValueError(f"node-config {key} must be an integer, got {value!r}") from err
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"node-config {key} must be an integer, got {value!r}")
    return int(number)


Expected = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def state_bytes(expected: Expected) -> int:
    """Bytes of a state with these shapes and dtypes."""
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in expected.values())


def network_refusal(expected: Expected, limits: NodeLimits, task: DistillTask) -> str | None:
    """Why the network the task asks for is too large for this node, or None."""
    size = state_bytes(expected)
    if size > limits.model_bytes:
        return (f"the run's network (net-width {task.net_width}, net-depth {task.net_depth}) is "
                f"{size / MiB:.1f} MiB > {PREFIX}model-mib {limits.model_mib}")
    return None


def record_refusal(record: ArrayRecord, limits: NodeLimits) -> str | None:
    """Why a received global model is too large to decode, or None (nothing is decoded here)."""
    size = sum(len(array.data) for array in record.values())
    if size > limits.model_bytes:
        return f"the global model is {size / MiB:.1f} MiB > {PREFIX}model-mib {limits.model_mib}"
    return None


def checked_state(record: ArrayRecord, expected: Expected) -> dict[str, torch.Tensor] | str:
    """The global model as a state dict once it matches ``expected`` exactly, else why not.

    The declared names, shapes, dtypes and byte counts are compared before any array is decoded;
    each decoded array (``allow_pickle=False``) again, since the bytes need not match the declaration.
    """
    names, wanted = list(record.keys()), set(expected)
    if set(names) != wanted or len(names) != len(wanted):
        missing, extra = sorted(wanted - set(names)), sorted(set(names) - wanted)
        return (f"the global model's tensors differ from this node's network: missing {missing[:5]}, "
                f"unexpected {[str(n)[:40] for n in extra[:5]]}" + (" ..." if len(extra) > 5 else ""))
    state: dict[str, torch.Tensor] = {}
    for name in names:
        array, (shape, dtype) = record[name], expected[name]
        numpy_dtype = str(torch.empty((), dtype=dtype).numpy().dtype)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if (array.stype != "numpy.ndarray" or array.dtype != numpy_dtype or tuple(array.shape) != shape
                or len(array.data) > nbytes + NPY_HEADER_SLACK):
            return (f"global model tensor {name!r}: {array.dtype} {tuple(array.shape)} ({array.stype}, "
                    f"{len(array.data)} bytes), this node's network has {numpy_dtype} {shape}")
        try:
            value = array.numpy()
        except Exception as err:  # noqa: BLE001 - hostile bytes raise many types
            return f"global model tensor {name!r} does not decode ({type(err).__name__})"
        if not isinstance(value, np.ndarray) or str(value.dtype) != numpy_dtype or value.shape != shape:
            return f"global model tensor {name!r} decodes to something else than it declares"
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"global model tensor {name!r} holds non-finite values"
        state[name] = torch.from_numpy(value)
    return state
