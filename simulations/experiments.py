"""Experiments as files: one TOML per benchmark run under ``conf/<script>/``, checked before any work.

A benchmark script names its experiment with ``--preset NAME`` (``conf/<script>/NAME.toml``) or
``--config PATH``. The file holds the numbers of one figure; whatever it leaves out comes from
the defaults of its schema below or, for a distillation, from :class:`distill.task.DistillTask`
and the method's config. Keys are run-config keys (``net-width``, ``iterations``...); a
method's own settings sit in ``[methods.<method>]`` under their run-config names
(``batch-real``, ``outer-loop``). conf/README.md describes every schema.

A file is read strictly: an unknown key raises ``ValueError`` naming the file and the key, and
every method table is built into a :class:`~distill.task.DistillTask` (which checks the
method's own settings), so a typo fails at once, not an hour into a run.

>>> exp = load_experiment("distill/quick")
>>> method_task("dm", exp.net, exp.method_table("dm", 10), ipc=10)[0].settings["batch_real"]
64
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: Flower's own TOML reader
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.task import COMMON, DP_METHODS, DP_SPEC, DistillTask, coerce  # noqa: E402
from distill.train import TrainConfig  # noqa: E402

CONF = ROOT / "conf"
# Task keys a method table (or a benchmark's ``--set``) may set: what shapes one method config.
# The partition spec, FedAvg and server keys mean nothing to a central benchmark.
TASK_KEYS = tuple(k.replace("_", "-") for k in (*COMMON, "net_width", "net_depth", *DP_SPEC) if k != "ipc")
NODE_KEYS = ("expert-cache",)  # node-side settings a file may name (a folder on this machine)
IPC_TABLE = re.compile(r"ipc-([1-9][0-9]*)")  # per-IPC tables inside a distill method table
Table = Mapping[str, Any]


def method_task(method: str, *layers: Table, ipc: int | None = None) -> tuple[DistillTask, dict[str, Any]]:
    """``method``'s task from run-config layers (later ones win), and its node-side settings.

    A layer's keys are :data:`TASK_KEYS`, :data:`NODE_KEYS` or the method's own settings
    (``-`` or ``_``); a DP method (``dp-dm``) becomes ``dp = "dp-dm"``. Build the method config
    with ``distill.task.method_config(task, seed=..., **node)``.
    """
    config: dict[str, Any] = {"dp": method} if method in DP_METHODS else {"method": method}
    if ipc is not None:
        config["ipc"] = ipc
    node: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            kebab = str(key).replace("_", "-")
            if kebab in TASK_KEYS:
                config[kebab] = value
            elif kebab in NODE_KEYS:
                node[kebab.replace("-", "_")] = value
            else:
                config[f"{method}.{kebab}"] = value  # the task checks it is one of the method's settings
    return DistillTask.from_config(config), node


def _check_type(where: str, key: str, value: Any, hint: Any, default: Any) -> Any:
    """``value`` as field type ``hint`` (TOML arrays become tuples), else ``ValueError``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))  # ``int | None``: a file gives the int
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{where}: {key} must be a list, got {value!r}")
        return tuple(_check_type(where, key, v, args[0], args[0]()) for v in value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {key} must be a table, got {value!r}")
        return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    try:
        return coerce(key, value, hint() if default is None or isinstance(default, tuple) else default)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def read_fields(cls: type, raw: Table, where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``raw``'s plain keys as ``cls``'s fields (kebab-case to snake_case, typed); an unknown key
    raises ``ValueError`` naming it, the file and the known keys. Keys in ``skip`` are left out."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in skip:
            continue
        snake = key.replace("-", "_")
        if snake not in known or "_" in key:  # keys are kebab-case, as run-config keys
            names = ", ".join(sorted(k.replace("_", "-") for k in known))
            raise ValueError(f"{where}: unknown key {key!r}; known: {names}")
        f = known[snake]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[snake] = _check_type(where, key, value, hints[snake], default)
    return out


def method_tables(raw: Table, where: str, per_ipc: bool = False) -> dict[str, dict[str, Any]]:
    """The ``[methods.<method>]`` tables of ``raw`` (``per_ipc``: with ``ipc-<N>`` sub-tables)."""
    tables = raw.get("methods", {})
    if not isinstance(tables, dict) or any(not isinstance(t, dict) for t in tables.values()):
        raise ValueError(f"{where}: [methods] must hold one table per method")
    for method, table in tables.items():
        for key, value in table.items():
            if isinstance(value, dict) and not (per_ipc and IPC_TABLE.fullmatch(key)):
                raise ValueError(f"{where}: [methods.{method}] {key!r} is a table; "
                                 + ("only ipc-<N> tables nest here" if per_ipc else "no table nests here"))
            if per_ipc and IPC_TABLE.fullmatch(key) and not isinstance(value, dict):
                raise ValueError(f"{where}: [methods.{method}] {key} must be a table of settings")
    return {m: dict(t) for m, t in tables.items()}


def check_task(where: str, method: str, *layers: Table, ipc: int | None = None) -> None:
    """Build ``method``'s task from ``layers``; a bad key or value raises naming ``where``."""
    try:
        method_task(method, *layers, ipc=ipc)
    except ValueError as err:
        raise ValueError(f"{where}: [methods.{method}]: {err}") from None


@dataclass(frozen=True)
class DistillExperiment:
    """conf/distill/: bench_distill.py's budgets per (method, IPC), and its evaluator.

    ``methods[m]`` is method ``m``'s table; its ``ipc-<N>`` tables beat it at IPC N.
    """

    net_width: int = DistillTask.net_width
    net_depth: int = DistillTask.net_depth
    dataset: str = ""                                    # load_dataset's argument; "": the bundled sample
    zca: bool = False                                    # ZCA-whiten both splits (distill/zca.py)
    zca_eps: float = 0.1
    pool_epochs: int = 20                                # the whole-pool evaluator's epochs
    eval_epochs: dict = field(default_factory=dict)      # {"<ipc>": epochs}; other IPCs: TrainConfig's
    evaluator: dict = field(default_factory=dict)        # [evaluator]: TrainConfig's other fields
    methods: dict = field(default_factory=dict)

    EVALUATOR_KEYS = ("lr", "momentum", "weight-decay", "batch-size", "dsa")  # TrainConfig's fields, kebab-case

    @property
    def net(self) -> dict[str, int]:
        return {"net-width": self.net_width, "net-depth": self.net_depth}

    @property
    def data_source(self) -> str:
        """``dataset`` as ``load_dataset`` takes it: a relative path is from the repository root,
        so a preset runs from any directory; a name (``mnist``) stays a name; "" is ""."""
        if "/" not in self.dataset:
            return self.dataset
        path = Path(self.dataset).expanduser()
        return str(path if path.is_absolute() else (ROOT / path).resolve())

    def train_config(self, ipc: int | None, device: str = "cpu", epochs: int | None = None) -> TrainConfig:
        """The evaluator of a set at ``ipc`` (``epochs`` beats the file's)."""
        epochs = epochs or (self.epochs_at(ipc) if ipc is not None else self.pool_epochs)
        settings = {k.replace("-", "_"): v for k, v in self.evaluator.items()}
        return TrainConfig(device=device, **settings, **({"epochs": epochs} if epochs else {}))

    def method_table(self, method: str, ipc: int | None) -> dict[str, Any]:
        """Method ``method``'s settings at ``ipc`` (its table, overlaid by its ``ipc-<ipc>`` table)."""
        table = self.methods.get(method, {})
        return {**{k: v for k, v in table.items() if not IPC_TABLE.fullmatch(k)}, **table.get(f"ipc-{ipc}", {})}

    def epochs_at(self, ipc: int) -> int | None:
        return self.eval_epochs.get(str(ipc))

    @classmethod
    def from_toml(cls, raw: Table, where: str) -> "DistillExperiment":
        read = read_fields(cls, raw, where, skip=("methods",))
        defaults = TrainConfig()
        for key, value in read.get("evaluator", {}).items():
            if key not in cls.EVALUATOR_KEYS:
                raise ValueError(f"{where}: [evaluator] has no key {key!r}; known: {sorted(cls.EVALUATOR_KEYS)}")
            try:  # typed as TrainConfig's own default, as every other file key is
                coerce(key, value, getattr(defaults, key.replace("-", "_")))
            except ValueError as err:
                raise ValueError(f"{where}: [evaluator] {err}") from None
        exp = cls(**read, methods=method_tables(raw, where, per_ipc=True))
        try:
            exp.train_config(1)
        except ValueError as err:
            raise ValueError(f"{where}: [evaluator]: {err}") from None
        if exp.zca and not exp.zca_eps > 0:
            raise ValueError(f"{where}: zca-eps must be > 0, got {exp.zca_eps}")
        for key, epochs in exp.eval_epochs.items():
            if not key.isdigit() or not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
                raise ValueError(f"{where}: eval-epochs maps an IPC to epochs >= 1, got {key} = {epochs!r}")
        for method, table in exp.methods.items():
            for ipc in [int(m.group(1)) for k in table if (m := IPC_TABLE.fullmatch(k))] or [None]:
                check_task(where, method, exp.net, exp.method_table(method, ipc), ipc=ipc)
        return exp


@dataclass(frozen=True)
class PrivacyExperiment:
    """conf/privacy/: bench_privacy.py's budgets. The rows' methods read their tables:
    ``dp-dm`` and ``dpsgd-gm`` (the DP rows), ``dm`` and ``dsa`` (their non-private rows, from
    noise); the KIP-rho rows are ``dm``'s table from real images, ``rho-iterations`` long."""

    per_class: int = 0           # real training images per class (0: all 800)
    test_size: int = 0           # test images (0: all 2000)
    ipc: int = DistillTask.ipc
    net_width: int = DistillTask.net_width      # the distillation ConvNet
    net_depth: int = DistillTask.net_depth
    rho_iterations: int = DistillTask.iterations
    eval_net_width: int = DistillTask.net_width  # the networks trained on each set
    eval_net_depth: int = DistillTask.net_depth
    eval_epochs: int = 300
    eval_seeds: tuple[int, ...] = (0, 1, 2)
    dpsgd_epochs: int = 15                       # the DP-SGD baseline on the real data
    dpsgd_net_width: int = DistillTask.net_width
    dpsgd_net_depth: int = DistillTask.net_depth
    methods: dict = field(default_factory=dict)

    ROW_METHODS = ("dp-dm", "dpsgd-gm", "dm", "dsa")

    @property
    def net(self) -> dict[str, int]:
        return {"net-width": self.net_width, "net-depth": self.net_depth}

    def task(self, method: str) -> DistillTask:
        """The task of ``method``'s rows as the file sets it (a row adds its epsilon, init, rho)."""
        return method_task(method, self.net, self.methods.get(method, {}), ipc=self.ipc)[0]

    # The DP rows' budgets under the names bench_before_after.py reads.
    @property
    def dm_steps(self) -> int:
        return self.task("dp-dm").iterations

    @property
    def dm_sample_rate(self) -> float:
        return self.task("dp-dm").sample_rate

    @property
    def gm_iterations(self) -> int:
        return self.task("dpsgd-gm").iterations

    @property
    def gm_outer(self) -> int:
        return self.task("dpsgd-gm").settings["outer_loop"]

    @property
    def gm_inner(self) -> int:
        return self.task("dpsgd-gm").settings["inner_loop"]

    @property
    def gm_sample_rate(self) -> float:
        return self.task("dpsgd-gm").sample_rate

    @classmethod
    def from_toml(cls, raw: Table, where: str) -> "PrivacyExperiment":
        exp = cls(**read_fields(cls, raw, where, skip=("methods",)), methods=method_tables(raw, where))
        if stray := sorted(set(exp.methods) - set(cls.ROW_METHODS)):
            raise ValueError(f"{where}: no row runs {stray}; the rows' methods are {list(cls.ROW_METHODS)}")
        for method in cls.ROW_METHODS:
            check_task(where, method, exp.net, exp.methods.get(method, {}), ipc=exp.ipc)
        return exp


@dataclass(frozen=True)
class ApplicationsExperiment:
    """conf/applications/: bench_applications.py's budgets. ``[methods.dm]`` distills the set of
    the crossarch and nas parts, ``[cl-methods.dm]`` the continual part's memories."""

    ipc: int = DistillTask.ipc
    net_width: int = DistillTask.net_width   # every ConvNet: distillation, evaluation, continual
    net_depth: int = DistillTask.net_depth
    test_per_class: int | None = None        # absent: the whole test split
    seeds: tuple[int, ...] = (0, 1, 2)
    arch_epochs: dict = field(default_factory=lambda: {"convnet": 300, "mlp": 300, "lenet": 300,
                                                       "alexnet": 100, "resnet18": 100})
    crossarch_random: bool = True            # the random-real baseline beside DM
    nas_grid: dict = field(default_factory=dict)  # distill.nas.convnet_grid options
    nas_proxy_epochs: int = 100
    nas_pool_epochs: int = 3
    nas_pool_size: int | None = None         # absent: the whole training pool
    nas_seeds: tuple[int, ...] = (0,)
    cl_buffers: tuple[str, ...] = ("distill", "random", "herding")
    cl_epochs: int = 300
    cl_seeds: tuple[int, ...] = (0,)
    methods: dict = field(default_factory=dict)
    cl_methods: dict = field(default_factory=dict)

    @property
    def net(self) -> dict[str, int]:
        return {"net-width": self.net_width, "net-depth": self.net_depth}

    @property
    def arch_kwargs(self) -> dict[str, int]:
        return {"width": self.net_width, "depth": self.net_depth}

    @classmethod
    def from_toml(cls, raw: Table, where: str) -> "ApplicationsExperiment":
        methods = method_tables(raw, where)
        cl_methods = method_tables({"methods": raw.get("cl-methods", {})}, where)
        exp = cls(**read_fields(cls, raw, where, skip=("methods", "cl-methods")), methods=methods,
                  cl_methods=cl_methods)
        if stray := sorted((set(methods) | set(cl_methods)) - {"dm"}):
            raise ValueError(f"{where}: only [methods.dm] and [cl-methods.dm] are run, not {stray}")
        check_task(where, "dm", exp.net, methods.get("dm", {}), ipc=exp.ipc)
        check_task(where, "dm", exp.net, cl_methods.get("dm", {}), ipc=exp.ipc)
        return exp


def check_run_config(where: str, *layers: Table) -> None:
    """The run-config ``layers`` (later ones win) make valid RunSettings, else ``ValueError`` naming ``where``."""
    from server.settings import RunSettings  # the run-config's own check, unknown keys named

    try:
        RunSettings.from_run_config({k: v for layer in layers for k, v in layer.items()})
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


@dataclass(frozen=True)
class FederatedExperiment:
    """conf/federated/: bench_federated.py's runs. Each (split, run) pair is one federation of
    ``clients`` nodes whose run-config is ``run-config``, then the split's, then the run's keys;
    the large run repeats one pair with ``large-clients`` nodes (named e.g. ``oneshot100-0.5``)."""

    clients: int = 10
    run_config: dict = field(default_factory=dict)
    splits: dict = field(default_factory=dict)   # split name -> run-config keys
    runs: dict = field(default_factory=dict)     # run kind -> run-config keys
    large_clients: int = 100
    large_run: str = "oneshot"
    large_split: str = "0.5"

    @classmethod
    def from_toml(cls, raw: Table, where: str) -> "FederatedExperiment":
        exp = cls(**read_fields(cls, raw, where))
        for table in (exp.splits, exp.runs):
            if not all(isinstance(v, dict) for v in table.values()):
                raise ValueError(f"{where}: splits and runs map a name to a table of run-config keys")
        if exp.large_run not in exp.runs or exp.large_split not in exp.splits:
            raise ValueError(f"{where}: large-run {exp.large_run!r} / large-split {exp.large_split!r} "
                             f"must name a run {sorted(exp.runs)} and a split {sorted(exp.splits)}")
        for name, run in exp.runs.items():  # each run alone names its own bad key, then every pair
            check_run_config(f"{where}: [runs] {name}", exp.run_config, run)
        for split in exp.splits.values():
            for run in exp.runs.values():
                check_run_config(where, exp.run_config, split, run)
        return exp


@dataclass(frozen=True)
class ScaleExperiment:
    """conf/scale/: bench_scale.py's client counts and the run-config every count runs."""

    clients: tuple[int, ...] = (10, 100, 1000)
    run_config: dict = field(default_factory=dict)

    @classmethod
    def from_toml(cls, raw: Table, where: str) -> "ScaleExperiment":
        exp = cls(**read_fields(cls, raw, where))
        check_run_config(where, exp.run_config)
        return exp


SCHEMAS: dict[str, type] = {"distill": DistillExperiment, "privacy": PrivacyExperiment,
                            "applications": ApplicationsExperiment, "federated": FederatedExperiment,
                            "scale": ScaleExperiment}


def experiment_path(path_or_name: str | Path, kind: str | None = None) -> Path:
    """A path as given (it ends in ``.toml``), else ``conf/<kind>/<name>.toml`` or ``conf/<name>.toml``."""
    text = str(path_or_name)
    if text.endswith(".toml"):
        return Path(text)
    return CONF / (f"{kind}/{text}.toml" if kind and "/" not in text else f"{text}.toml")


def preset_names(kind: str) -> list[str]:
    """The experiments under ``conf/<kind>/`` (what ``--preset`` accepts)."""
    return sorted(p.stem for p in (CONF / kind).glob("*.toml"))


def load_experiment(path_or_name: str | Path, kind: str | None = None) -> Any:
    """The experiment a TOML file describes, validated (``ValueError`` names the file and key).

    ``kind`` is the schema (:data:`SCHEMAS`); by default the file's folder under ``conf/``.
    """
    path = experiment_path(path_or_name, kind)
    kind = kind or path.parent.name
    if kind not in SCHEMAS:
        raise ValueError(f"{path}: no experiment kind {kind!r}; known: {sorted(SCHEMAS)}")
    if not path.is_file():
        raise ValueError(f"{path}: no such experiment file; conf/{kind}/ has {preset_names(kind)}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not TOML: {err}") from None
    return SCHEMAS[kind].from_toml(raw, str(path))


def add_experiment_args(parser: Any, kind: str, default: str) -> None:
    """``--preset NAME`` (a file under conf/<kind>/) or ``--config PATH``, one of them."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--preset", choices=preset_names(kind), default=None,
                       help=f"an experiment under conf/{kind}/ (default: {default})")
    group.add_argument("--config", default=None, metavar="PATH", help="an experiment file of your own (TOML)")


def chosen_experiment(args: Any, kind: str, default: str) -> tuple[str, Any]:
    """(name, experiment) of ``--preset`` / ``--config`` (the file's stem names a ``--config``);
    a script's ``--quick`` is ``--preset quick``. ``ValueError`` for a bad file or combination."""
    if getattr(args, "quick", False):
        if getattr(args, "config", None):
            raise ValueError("--quick is --preset quick; it does not go with --config")
        args.preset = "quick"
    if getattr(args, "config", None):
        return Path(args.config).stem, load_experiment(args.config, kind)
    name = args.preset or default
    return name, load_experiment(name, kind)
