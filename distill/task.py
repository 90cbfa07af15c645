"""The task protocol: the one place where a run-config becomes a task, a method config and a budget.

A federation's train message carries a :class:`DistillTask` (kebab-case keys on the wire). It
is an envelope:

- the partition spec (``dataset``, ``partitioner``, ``alpha``, ``shards-per-client``, ``seed``,
  ``holdout-fraction``);
- the method: ``method`` plus the settings every method shares (``ipc``, ``iterations``,
  ``init``, ``net-width``, ``net-depth``, ``embedder-noise``, ``rho``, ``param``,
  ``param-kwargs``) and that method's own settings, nested under its name
  (``dm.lr-img``, ``kip.kernel``, ``mtt.expert-epochs``...: the registry's config fields,
  :func:`method_settings`);
- the optional DP spec (``dp`` names the DP method; ``epsilon``, ``delta``, ``clip``,
  ``sigma``, ``sample-rate``, ``accountant``, ``privacy-budget``);
- the budget policy (``min-class-samples``, ``samples-per-image``: :func:`class_budget`).

Client, server, privacy, attacks and benchmarks all build method configs through
:func:`method_config` and budgets through :func:`class_budget`; none re-derives them. It is
free of Flower and Opacus: DP methods are lazy entries of :mod:`distill.methods`.

Flower's run-config flattens TOML tables into dotted keys, so ``[tool.flwr.app.config.kip]``
``kernel = "ntk"`` arrives as ``kip.kernel``; a key cannot be both a value and a table, hence
one namespace per method rather than ``method.kernel``.

>>> task = DistillTask.from_config({"method": "kip", "kip.kernel": "ntk", "ipc": 2})
>>> task.settings["kernel"], task.settings["n_models"], method_config(task, seed=0).kernel
('ntk', 1, 'ntk')
>>> DistillTask.from_config({"kip.kernal": "ntk"})
Traceback (most recent call last):
...
ValueError: unknown setting 'kip.kernal'; kip has: batch-real, kernel, learn-labels, lr-img, lr-labels, n-models, reg
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, NamedTuple

import numpy as np

from .methods import MethodConfig, available_methods, config_fields, make_config, private_methods
from .partition import PARTITIONERS

ALGORITHMS = ("fedistill", "fedavg")
# ``dp`` values: no DP, or the name of a DP method (privacy/, a lazy entry of distill.methods,
# registered private). The tuples are the registry's at import; checks ask the registry itself.
DP_METHODS = tuple(private_methods())
DP_MODES = ("none", *DP_METHODS)
DP_ACCOUNTANTS = ("rdp", "prv")
RUN_KEY = re.compile(r"[A-Za-z0-9._:-]{0,200}")  # printed in a node's ledger: no control characters
INTEGER_FIELDS = ("round", "ipc", "iterations", "client_threads", "net_width", "net_depth", "seed",
                  "min_class_samples", "samples_per_image", "shards_per_client", "local_epochs",
                  "local_batch_size")
# A method config's fields that are not per-method settings on the wire:
COMMON = ("ipc", "iterations", "init", "embedder_noise", "rho", "param", "param_kwargs")  # task fields
DP_SPEC = ("epsilon", "delta", "sigma", "clip", "sample_rate", "accountant")  # task fields under DP
# The node decides these, never the server: where it computes, its files, its secret noise, what
# it has released before; ``seed`` comes from :func:`distill.partition.client_seed`.
NODE_ONLY = ("device", "progress", "embedder_state", "time_limit_s", "seed", "arch", "arch_kwargs",
             "expert_cache", "insecure_reproducible_noise", "released_counts")
NOT_SETTINGS = frozenset(COMMON + DP_SPEC + NODE_ONLY)


def safe_run_key(name: str) -> str:
    """``name`` (the server's run store name) in the characters :data:`RUN_KEY` allows."""
    return re.sub(r"[^A-Za-z0-9._:-]", "_", name)[:200]


def method_settings(name: str) -> dict[str, dataclasses.Field]:
    """The settings of method ``name`` a run-config may set, as ``{snake_name: field}``."""
    return {k: f for k, f in config_fields(name).items() if k not in NOT_SETTINGS}


def method_defaults(name: str) -> dict[str, Any]:
    """Every settable field of method ``name``'s config with its default (the method's own, not a
    federation's task defaults)."""
    return {k: _default(f) for k, f in config_fields(name).items()}


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def declared_method_keys() -> dict[str, dict[str, Any]]:
    """Every method's settings with their defaults, ``{method: {kebab-key: default}}``: the
    ``[tool.flwr.app.config.<method>]`` tables of pyproject.toml (a test keeps them equal).

    A dict default is written as JSON text (TOML run-config values are scalars).
    """
    out: dict[str, dict[str, Any]] = {}
    for name in available_methods():
        table = {}
        for key, f in sorted(method_settings(name).items()):
            value = _default(f)
            table[key.replace("_", "-")] = json.dumps(value, sort_keys=True) if isinstance(value, dict) else value
        out[name] = table
    return out


def coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default``, strictly: a string (CLI, ``--set``) is parsed, an int
    is a float where a float is wanted, anything else of the wrong type raises ``ValueError``."""
    want = type(default)
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, bool):
                return value
        elif isinstance(default, int):
            if isinstance(value, str):
                return int(value)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif isinstance(default, float):
            number = float(value) if isinstance(value, str) or (
                isinstance(value, (int, float)) and not isinstance(value, bool)) else None
            if number is not None and math.isfinite(number):
                return number
        elif isinstance(default, dict):
            parsed = json.loads(value) if isinstance(value, str) else value
            if isinstance(parsed, dict):
                return parsed
        elif isinstance(value, want):
            return value
    except ValueError:
        pass
    raise ValueError(f"setting {key}={value!r}: expected {want.__name__}")


def coerce_settings(method: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Method ``method``'s settings (keys kebab- or snake-case) checked and typed, over its
    defaults; ``ValueError`` names an unknown key together with the method's known ones."""
    known = method_settings(method)
    out = {k: _default(f) for k, f in known.items()}
    spellings: dict[str, str] = {}
    for key, value in raw.items():
        snake = str(key).replace("-", "_")
        if snake in spellings:
            raise ValueError(f"setting {method}.{key} is given twice (also as {method}.{spellings[snake]})")
        spellings[snake] = str(key)
        if snake not in known:
            names = ", ".join(sorted(k.replace("_", "-") for k in known))
            raise ValueError(f"unknown setting '{method}.{key}'; {method} has: {names}")
        out[snake] = in_range(f"{method}.{key}", coerce(f"{method}.{key}", value, _default(known[snake])))
    return out


MAX_TEXT = 200  # characters of a text setting (a DSA strategy, a kernel's name)


def in_range(key: str, value: Any) -> Any:
    """``value``, or ``ValueError`` where no method could mean it: an integer setting is a count
    (>= 0), a learning rate is > 0, a text is short. The method's config checks the rest."""
    name = key.rsplit(".", 1)[-1].replace("-", "_")
    if type(value) is int and value < 0:
        raise ValueError(f"setting {key}={value}: a count, must be >= 0")
    if isinstance(value, float) and (name.startswith("lr") or name.endswith("_lr")) and not value > 0:
        raise ValueError(f"setting {key}={value}: a learning rate, must be > 0")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise ValueError(f"setting {key}: {len(value)} characters, at most {MAX_TEXT}")
    return value


def parse_assignments(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (every script's ``--set``) as run-config entries: a value is a Python
    literal (numbers, ``true``/``false``, a ``{...}`` object) where it reads as one, else text.

    >>> parse_assignments(["ipc=5", "dm.lr-img=0.5", "kip.kernel=ntk", "dm.dsa=false"])
    {'ipc': 5, 'dm.lr-img': 0.5, 'kip.kernel': 'ntk', 'dm.dsa': False}
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = str(pair).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        text = text.strip()
        lowered = {"true": "True", "false": "False"}.get(text.lower(), text)
        try:
            out[key.strip()] = ast.literal_eval(lowered)
        except (ValueError, SyntaxError):
            out[key.strip()] = text
    return out


def split_keys(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``(plain, {method: settings})`` from a flat mapping whose method settings are dotted keys.

    An unknown method prefix raises ``ValueError`` naming the known methods.
    """
    plain: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in config.items():
        prefix, dot, rest = str(key).partition(".")
        if not dot:
            plain[key] = value
            continue
        if prefix not in available_methods():
            raise ValueError(f"unknown method {prefix!r} in key {key!r}; known: {available_methods()}")
        nested.setdefault(prefix, {})[rest] = value
    return plain, nested


@dataclass(frozen=True)
class DistillTask:
    """What the server asks of a client in one round (the ``config`` record of a train message).

    Every plain field has the name of its kebab-case wire key with ``-`` turned into ``_``;
    ``settings`` are the distilling method's own (:attr:`distill_method`), all of them (its
    defaults where not set), nested under its name on the wire.
    """

    algorithm: str = "fedistill"
    # the partition spec
    dataset: str = "mnist10k"
    partitioner: str = "dirichlet"
    alpha: float = 0.5
    shards_per_client: int = 2
    seed: int = 0
    holdout_fraction: float = 0.1
    round: int = 1
    # Set by the server, not the run-config: the run store's name, stable across a resume, so a
    # node's per-run budget (``privacy-budget``) keeps counting when a crashed run resumes.
    run_key: str = ""
    # the method: settings every method has, then its own
    method: str = "dm"
    ipc: int = 10
    iterations: int = 100
    init: str = "real"
    net_width: int = 32
    net_depth: int = 3
    embedder_noise: float = 0.1
    rho: float = 0.0
    # What clients store and upload (docs/distill.md "Parameterisations"): "pixels", or a
    # factorised set ("idc", "haba", "latent") whose ``ipc`` counts stored bases per class.
    # ``param_kwargs`` is its options as a JSON object string (a dict is turned into one).
    param: str = "pixels"
    param_kwargs: str = "{}"
    settings: Mapping[str, Any] = field(default_factory=dict)
    # the budget policy (:func:`class_budget`)
    min_class_samples: int = 10
    samples_per_image: int = 2
    # FedAvg rounds, and the client's threads
    local_epochs: int = 1
    local_lr: float = 0.01
    local_batch_size: int = 32
    client_threads: int = 1
    # Example-level DP (privacy/, docs/privacy.md): ``dp`` replaces ``method`` when not "none".
    dp: str = "none"
    epsilon: float = 8.0
    delta: float = 1e-5
    clip: float = 1.0
    sigma: float = 0.0
    sample_rate: float = 0.04
    accountant: str = "rdp"
    privacy_budget: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.param_kwargs, dict):  # programmatic callers and ``--set param-kwargs={...}``
            object.__setattr__(self, "param_kwargs", json.dumps(self.param_kwargs, sort_keys=True))
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.partitioner not in PARTITIONERS:
            raise ValueError(f"partitioner must be one of {PARTITIONERS}, got {self.partitioner!r}")
        if self.method not in available_methods():  # at the server, before any client is asked
            raise ValueError(f"unknown method {self.method!r}; known: {available_methods()}")
        wrong = [k for k in INTEGER_FIELDS if type(getattr(self, k)) is not int]  # bools are not counts
        if wrong:
            raise ValueError(f"{[k.replace('_', '-') for k in wrong]} must be integers: {self}")
        if self.ipc < 1 or self.min_class_samples < 1 or self.samples_per_image < 1:
            raise ValueError(f"ipc, min-class-samples and samples-per-image must be >= 1: {self}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout-fraction must be in [0, 1), got {self.holdout_fraction}")
        if not isinstance(self.run_key, str) or not RUN_KEY.fullmatch(self.run_key):
            raise ValueError(f"run-key must match {RUN_KEY.pattern}, got {str(self.run_key)[:80]!r}")
        if self.client_threads < 1 or self.local_epochs < 1:
            raise ValueError(f"client-threads and local-epochs must be >= 1: {self}")
        self._check_privacy()
        object.__setattr__(self, "settings", coerce_settings(self.distill_method, self.settings))
        self._check_param()
        method_config(self, seed=0)  # every value in its range, by the method's own checks

    def _check_param(self) -> None:
        """Options must be a JSON object (their values, and rho, the method config checks), and DP
        clients upload pixels."""
        self.param_options  # noqa: B018 - raises on bad JSON
        if self.param != "pixels" and self.dp != "none":
            raise ValueError(f"param={self.param!r} under dp={self.dp!r} is not built: DP clients upload pixels")

    @property
    def param_options(self) -> dict[str, Any]:
        """``param_kwargs`` parsed: the parameterisation's options (``ValueError`` if not a JSON object)."""
        try:
            options = json.loads(self.param_kwargs or "{}")
        except (TypeError, ValueError) as err:
            raise ValueError(f"param-kwargs must be a JSON object string, got {self.param_kwargs!r}") from err
        if not isinstance(options, dict):
            raise ValueError(f"param-kwargs must be a JSON object, got {self.param_kwargs!r}")
        return options

    def _check_privacy(self) -> None:
        """Refuse privacy settings that cannot run, before any message goes out."""
        if self.dp != "none" and self.dp not in private_methods():
            raise ValueError(f"dp must be 'none' or one of {private_methods()}, got {self.dp!r}")
        if self.method in private_methods():
            raise ValueError(f"method {self.method!r} is a DP method: set dp={self.method!r} instead "
                             "(the client then accounts its spending across rounds)")
        if self.dp != "none" and self.algorithm != "fedistill":
            raise ValueError(f"dp={self.dp!r} needs algorithm 'fedistill' (DP FedAvg is not built)")
        if not 0.0 <= self.rho < 1.0:
            raise ValueError(f"rho must be in [0, 1), got {self.rho}")
        if not (self.privacy_budget >= 0 and math.isfinite(self.privacy_budget)):
            raise ValueError(f"privacy-budget must be finite and >= 0 (0 = no limit), got {self.privacy_budget}")
        if self.dp == "none":
            return
        if not 0.0 < self.delta < 1.0 or not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"delta must be in (0, 1) and sample-rate in (0, 1]: {self.delta}, {self.sample_rate}")
        if not (self.clip > 0 and math.isfinite(self.clip)) or not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise ValueError(f"clip must be finite and > 0, sigma finite and >= 0: {self.clip}, {self.sigma}")
        if self.sigma == 0 and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon must be finite and > 0 when sigma is 0, got {self.epsilon}")
        if self.accountant not in DP_ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {DP_ACCOUNTANTS}, got {self.accountant!r}")

    @property
    def distill_method(self) -> str:
        """The method that produces the upload: the DP method under DP, else ``method``."""
        return self.method if self.dp == "none" else self.dp

    @property
    def arch_kwargs(self) -> dict[str, int]:
        return {"width": self.net_width, "depth": self.net_depth}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DistillTask":
        """Build from a kebab-case mapping whose method settings are dotted (``kip.kernel``).

        Unknown keys raise ``ValueError`` naming them. Settings of a method other than the one
        that distills are checked (known, well-typed) and dropped: Flower's run-config carries
        every method's declared defaults.
        """
        plain, nested = split_keys(config)
        known = {f.name for f in fields(cls)} - {"settings"}
        values = {str(k).replace("-", "_"): v for k, v in plain.items()}
        if unknown := sorted(set(values) - known):
            raise ValueError(f"unknown task keys {[k.replace('_', '-') for k in unknown]}")
        for method, raw in nested.items():
            coerce_settings(method, raw)
        method = values.get("method", cls.method) if values.get("dp", cls.dp) == "none" else values["dp"]
        return cls(**values, settings=nested.get(str(method), {}))

    def to_config(self) -> dict[str, Any]:
        """The flat wire form: plain kebab-case keys, the method's settings as ``<method>.<key>``."""
        out = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self) if f.name != "settings"}
        for key, value in sorted(self.settings.items()):
            out[f"{self.distill_method}.{key.replace('_', '-')}"] = (
                json.dumps(value, sort_keys=True) if isinstance(value, dict) else value)
        return out


def method_config(task: DistillTask, *, seed: int, ipc: int | None = None, **node: Any) -> MethodConfig:
    """The config of the task's distilling method: the one place a task becomes a method config.

    ``ipc`` overrides the task's (a class group with a smaller budget). ``node`` holds what the
    node decides (:data:`NODE_ONLY`: ``device``, ``embedder_state``, ``expert_cache``,
    ``released_counts``...); anything else there raises ``ValueError``. Under DP the config
    carries the task's DP spec and initialises from noise (a real image would be released).
    """
    if stray := sorted(set(node) - set(NODE_ONLY)):
        raise ValueError(f"{stray} are not node-side settings; the task sets them (node-side: {NODE_ONLY})")
    values: dict[str, Any] = dict(ipc=task.ipc if ipc is None else ipc, iterations=task.iterations, init=task.init,
                                  arch="convnet", arch_kwargs=task.arch_kwargs, embedder_noise=task.embedder_noise,
                                  rho=task.rho, param=task.param, param_kwargs=task.param_options)
    if task.dp != "none":
        values.update(init="noise", **{k: getattr(task, k) for k in DP_SPEC})
    return make_config(task.distill_method, **{**values, **task.settings, "seed": seed, **node})


def config_from_settings(method: str, settings: Mapping[str, Any]) -> MethodConfig:
    """A method config from a flat mapping of its config fields (an audit's or a benchmark's
    method spec, ``{"ipc": 1, "batch_real": 16, "arch_kwargs": {...}}``), through the task.

    Each field goes where it belongs: the task's (shared settings, the DP spec), the method's own,
    or the node's (:data:`NODE_ONLY`); then :func:`method_config`, as for any client.
    """
    values = {str(k).replace("-", "_"): v for k, v in settings.items()}
    defaults = method_defaults(method)  # the method's, not a federation's
    task_fields = {k: values.pop(k, defaults[k]) for k in [*COMMON, *DP_SPEC] if k in defaults}
    node = {k: values.pop(k, defaults[k]) for k in NODE_ONLY if k in values or k in ("arch", "arch_kwargs")}
    kind = {"dp": method} if method in private_methods() else {"method": method}
    task = DistillTask(**kind, **task_fields, settings=values)
    return method_config(task, seed=int(node.pop("seed", 0)), **node)


class ClassBudget(NamedTuple):
    """Synthetic images (stored bases) per class, and which classes were capped or skipped."""

    counts: np.ndarray  # int64 [K]
    capped: list[int]   # held, but given fewer than ipc
    skipped: list[int]  # held, but below min-class-samples: given none


def class_budget(histogram: Any, ipc: int, min_class_samples: int, samples_per_image: int) -> ClassBudget:
    """Synthetic images per class: 0 below ``min_class_samples``, else at most ``n_c // samples_per_image``.

    A class held by a handful of samples would otherwise become near-copies of those samples
    (most of all with real initialisation); this keeps at least ``samples_per_image`` real
    samples behind every synthetic image. The client applies it and the server checks uploads
    against it, from the same function.

    >>> class_budget([0, 3, 12, 50], ipc=10, min_class_samples=10, samples_per_image=2)
    ClassBudget(counts=array([ 0,  0,  6, 10]), capped=[2], skipped=[1])
    """
    hist = np.asarray(histogram, dtype=np.int64)
    counts = np.minimum(ipc, hist // samples_per_image)
    counts[hist < min_class_samples] = 0
    capped = [int(c) for c in np.flatnonzero((counts > 0) & (counts < ipc))]
    skipped = [int(c) for c in np.flatnonzero((hist > 0) & (counts == 0))]
    return ClassBudget(counts, capped, skipped)


def task_budget(task: DistillTask, histogram: Any) -> ClassBudget:
    """:func:`class_budget` under the task's policy."""
    return class_budget(histogram, task.ipc, task.min_class_samples, task.samples_per_image)
