"""A data holder's privacy policy: what its node will release, whatever a run asks.

The policy is set on the node (its node-config, or a JSON file the node-config names) and never
by the run-config, which whoever starts a run chooses. Where the policy and the run both set a
value, the stricter one wins: the run may ask for less (a smaller delta, fewer iterations), never
for more. A request over the policy is declined with its reason (:class:`PolicyDeclined`).

Node-config keys (``flower-supernode --node-config``): ``privacy-policy`` (path of a JSON file
with the same keys without the ``policy-`` prefix), or ``policy-dp-required``,
``policy-epsilon-cap`` (lifetime), ``policy-max-delta``, ``policy-accountant``,
``policy-methods`` (comma-separated), ``policy-max-iterations``, ``policy-max-ipc``,
``policy-max-threads``, ``policy-ledger`` (the ledger file), ``policy-data-id``.

>>> p = NodePolicy.from_node_config({"policy-epsilon-cap": 4.0, "policy-ledger": "/tmp/l.json"})
>>> p.dp_required, p.epsilon_cap, p.max_delta
(True, 4.0, 1e-05)
>>> p.admit(dp="none", delta=1e-5, iterations=10, ipc=10, threads=1)
Traceback (most recent call last):
...
privacy.policy.PolicyDeclined: this node requires DP (policy dp-required); the run asks dp='none'
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from distill.methods import private_methods

from .accounting import ACCOUNTANTS

DP_METHOD_NAMES = tuple(private_methods())  # the registry's DP methods (distill.methods, private=True)
PREFIX = "policy-"
FILE_KEY = "privacy-policy"


class PolicyDeclined(ValueError):
    """The run asks for more than the node's policy allows; nothing was read or spent."""


@dataclass(frozen=True)
class Admission:
    """What the node will run: the run's request, tightened by the policy."""

    accountant: str
    threads: int


@dataclass(frozen=True)
class NodePolicy:
    """What a node releases. ``None`` limits are unbounded; ``ledger`` is required."""

    ledger: str = ""
    dp_required: bool = True
    epsilon_cap: float | None = None
    max_delta: float = 1e-5
    accountant: str = "rdp"
    methods: tuple[str, ...] = DP_METHOD_NAMES
    max_iterations: int | None = None
    max_ipc: int | None = None
    max_threads: int | None = None
    data_id: str = ""

    def __post_init__(self) -> None:
        if not self.ledger:
            raise ValueError("a privacy policy needs a ledger path (policy-ledger): the lifetime budget lives there")
        if self.epsilon_cap is not None and not (self.epsilon_cap > 0 and math.isfinite(self.epsilon_cap)):
            raise ValueError(f"policy epsilon-cap must be finite and > 0, got {self.epsilon_cap}")
        if not 0.0 < self.max_delta < 1.0:
            raise ValueError(f"policy max-delta must be in (0, 1), got {self.max_delta}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"policy accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        unknown = sorted(set(self.methods) - set(DP_METHOD_NAMES))
        if unknown:
            raise ValueError(f"policy methods {unknown} are not DP methods; known: {list(DP_METHOD_NAMES)}")
        for name in ("max_iterations", "max_ipc", "max_threads"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"policy {name.replace('_', '-')} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "NodePolicy | None":
        """The node's policy, or None when its node-config sets none (a simulated node).

        A policy file and ``policy-*`` keys may both be given: a key the node-config sets takes
        the stricter of its value and the file's; the file and the keys must agree on the
        ledger, the data identity and the accountant. A key that looks like a policy key but is
        not one, or an empty ``privacy-policy``, is an error: a misspelt policy must never leave
        a node unprotected.
        """
        keys = {k[len(PREFIX):]: v for k, v in node_config.items() if k.startswith(PREFIX)}
        suspicious = sorted(k for k in node_config if "polic" in str(k).lower()
                            and k != FILE_KEY and not str(k).startswith(PREFIX))
        if suspicious:
            raise ValueError(f"node-config keys {suspicious} look like privacy-policy keys but are not "
                             f"({FILE_KEY}=FILE or {PREFIX}<key>=VALUE); refusing to run without the policy")
        if FILE_KEY in node_config and not str(node_config[FILE_KEY]).strip():
            raise ValueError(f"node-config {FILE_KEY} is empty: name the policy file or drop the key")
        path = node_config.get(FILE_KEY)
        if not keys and not path:
            return None
        values: dict[str, Any] = {}
        if path:
            try:
                loaded = json.loads(Path(str(path)).read_text())
            except (OSError, ValueError) as err:
                raise ValueError(f"privacy policy {path}: unreadable ({err}); the node releases nothing") from err
            if not isinstance(loaded, dict):
                raise ValueError(f"privacy policy {path}: must be a JSON object")
            values = _parse(loaded, str(path))
        for name, value in _parse(keys, "node-config").items():
            values[name] = _stricter(name, values[name], value) if name in values else value
        return cls(**values)

    def admit(self, *, dp: str, delta: float, iterations: int, ipc: int, threads: int) -> Admission:
        """What the node will run for this request, or :class:`PolicyDeclined` saying why not."""
        if dp == "none":
            if self.dp_required:
                raise PolicyDeclined("this node requires DP (policy dp-required); the run asks dp='none'")
        elif dp not in self.methods:
            raise PolicyDeclined(f"method {dp!r} is not allowed by this node's policy (allowed: {list(self.methods)})")
        elif delta > self.max_delta:
            raise PolicyDeclined(f"the run asks delta {delta:g}; this node accepts at most {self.max_delta:g}")
        over = [f"{name} {value} > {limit}" for name, value, limit in
                (("iterations", iterations, self.max_iterations), ("ipc", ipc, self.max_ipc))
                if limit is not None and value > limit]
        if over:
            raise PolicyDeclined(f"the run asks {', '.join(over)} (this node's policy limits)")
        return Admission(accountant=self.accountant, threads=_least(threads, self.max_threads) or threads)


def _parse(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Field name -> typed value for the kebab-case keys given (and only those)."""
    known = {f.name.replace("_", "-"): f.name for f in fields(NodePolicy)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown policy keys {unknown}; known: {sorted(known)}")
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = known[key]
        if name == "methods":
            value = tuple(m.strip() for m in value.split(",") if m.strip()) if isinstance(value, str) else tuple(value)
        elif name == "dp_required":
            value = _boolean(value, f"{where}: dp-required")
        elif name in ("epsilon_cap", "max_delta"):
            value = float(value)
        elif name.startswith("max_"):
            value = _integer(value, f"{where}: {key}")
        elif name == "ledger":
            value = str(value)
            if value and not Path(value).is_absolute():
                raise ValueError(f"{where}: ledger {value!r} must be an absolute path (a ClientApp process may run "
                                 "in another working directory, and a relative path would start a fresh ledger)")
        out[name] = value
    return out


def _stricter(name: str, a: Any, b: Any) -> Any:
    """The stricter of two values of one policy field (identity fields must agree)."""
    if name in ("ledger", "data_id", "accountant"):
        if a != b:
            raise ValueError(f"policy file and node-config disagree on {name.replace('_', '-')}: {a!r} / {b!r}")
        return a
    if name == "dp_required":
        return a or b
    if name == "methods":
        return tuple(m for m in a if m in b)
    if name == "max_delta":
        return min(a, b)
    return _least(a, b)


def _least(a, b):
    """The smaller of two optional limits (None = unbounded)."""
    return b if a is None else a if b is None else min(a, b)


def _boolean(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{what} must be true or false, got {value!r}")


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or float(value) != int(float(value)):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return int(float(value))
