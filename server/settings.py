"""Run settings: the kebab-case run-config, read once, validated, split into server and task parts.

``[tool.flwr.app.config]`` in pyproject.toml holds the same defaults as these dataclasses
(a test keeps them in sync); ``flwr.simulation.run_simulation`` passes an empty run-config,
so the defaults must also live here. The task part is :class:`distill.task.DistillTask`, the
wire schema of a train message: the server validates it before any message goes out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from distill.task import DistillTask, declared_method_keys, split_keys

SERVER_SET = {"round", "run_key"}  # task fields the server fills in for each message, never run-config keys

from .defenses import DefenseConfig
from .store import safe_run_name
from .updates import WEIGHTINGS

MODES = ("one-shot", "iterative")
TOO_FEW_REPLIES = ("continue", "stop")


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs: server-side fields plus the task sent to clients."""

    mode: str = "one-shot"
    num_server_rounds: int = 3
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    fraction_evaluate: float = 1.0
    wait_for_nodes: float = 300.0
    round_timeout: float = 1800.0
    min_replies: int = 1
    on_too_few_replies: str = "continue"
    server_epochs: int = 300
    server_lr: float = 0.01
    server_batch_size: int = 64
    server_dsa: bool = True
    max_abs_pixel: float = 100.0
    run_name: str = ""
    runs_dir: str = "runs"
    resume: str = ""
    # Server-side defenses over accepted sets (server/defenses.py, docs/attacks.md)
    defense: str = "none"
    defense_z: float = 3.0
    defense_min_gap: float = 0.25
    defense_epochs: int = 30
    defense_holdout: int = 500
    defense_fail: str = "closed"
    # Bounds on what nodes report about the global model (server/updates.py)
    max_examples: int = 100_000
    max_abs_weight: float = 1000.0
    evaluate_weighting: str = "unweighted"
    task: DistillTask = field(default_factory=DistillTask)

    def __post_init__(self) -> None:
        self.defense_config()  # refuses a bad defense setting before any message goes out
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.on_too_few_replies not in TOO_FEW_REPLIES:
            raise ValueError(f"on-too-few-replies must be one of {TOO_FEW_REPLIES}, got {self.on_too_few_replies!r}")
        if not 0.0 < self.fraction_train <= 1.0 or not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ValueError(f"fractions must be in (0, 1] (train) and [0, 1] (evaluate): {self}")
        if min(self.num_server_rounds, self.min_train_nodes, self.min_available_nodes, self.min_replies,
               self.server_epochs, self.server_batch_size) < 1:
            raise ValueError(f"rounds, node minimums, min-replies, epochs and batch size must be >= 1: {self}")
        if self.evaluate_weighting not in WEIGHTINGS:
            raise ValueError(f"evaluate-weighting must be one of {WEIGHTINGS}, got {self.evaluate_weighting!r}")
        if self.max_examples < 1 or not self.max_abs_weight > 0:
            raise ValueError(f"max-examples must be >= 1 and max-abs-weight > 0, got {self.max_examples}, "
                             f"{self.max_abs_weight}")
        if self.run_name and not safe_run_name(self.run_name):
            raise ValueError(f"run-name {self.run_name[:80]!r} must be 1-64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit, without '..' (it names a folder under runs-dir)")
        if not self.max_abs_pixel > 0 or not self.round_timeout > 0:
            raise ValueError(f"max-abs-pixel and round-timeout must be > 0: {self}")

    def defense_config(self) -> DefenseConfig:
        return DefenseConfig(self.defense, self.defense_z, self.defense_min_gap, self.defense_epochs,
                             self.defense_holdout, self.task.seed, tuple(sorted(self.task.arch_kwargs.items())),
                             self.defense_fail)

    @property
    def rounds(self) -> int:
        """One-shot fedistill is one round by definition; otherwise ``num-server-rounds``."""
        if self.task.algorithm == "fedistill" and self.mode == "one-shot":
            return 1
        return self.num_server_rounds

    @property
    def name(self) -> str:
        if self.run_name:
            return self.run_name
        kind = self.mode if self.task.algorithm == "fedistill" else "fedavg"
        return f"{self.task.algorithm}-{kind}" if kind != "fedavg" else "fedavg"

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], **overrides: Any) -> "RunSettings":
        """Defaults, overlaid by ``run_config`` (kebab-case; method settings dotted, ``dm.lr-img``),
        overlaid by ``overrides``.

        Unknown keys, methods and method settings raise ``ValueError`` naming the known ones: a
        typo never silently runs defaults, and never reaches a client.
        """
        plain, nested = split_keys({**dict(run_config), **overrides})
        merged = {str(k).replace("-", "_"): v for k, v in plain.items()}
        server_keys = {f.name for f in fields(cls)} - {"task"}
        task_keys = {f.name for f in fields(DistillTask)} - SERVER_SET  # the server sets these
        unknown = sorted(set(merged) - server_keys - task_keys)
        if unknown:
            raise ValueError(f"unknown run-config keys {[k.replace('_', '-') for k in unknown]}")
        dotted = {f"{method}.{key}": v for method, values in nested.items() for key, v in values.items()}
        task = DistillTask.from_config({**{k: v for k, v in merged.items() if k in task_keys}, **dotted})
        return cls(task=task, **{k: v for k, v in merged.items() if k in server_keys})

    def to_dict(self) -> dict[str, Any]:
        """Flat kebab-case view (what config.json records): the method's settings dotted."""
        out = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self) if f.name != "task"}
        task = {k: v for k, v in self.task.to_config().items() if k.replace("-", "_") not in SERVER_SET}
        return {**out, **task}


def default_run_config() -> dict[str, Any]:
    """The plain defaults as a kebab-case mapping (without the method tables)."""
    return {k: v for k, v in RunSettings().to_dict().items() if "." not in k}


def declared_run_config() -> dict[str, Any]:
    """pyproject.toml's ``[tool.flwr.app.config]`` as it must read: the plain defaults and one
    table per registered method (:func:`distill.task.declared_method_keys`). A test keeps them
    equal; ``python -m server.settings`` prints the TOML to paste."""
    return {**default_run_config(), **declared_method_keys()}


def declared_toml() -> str:
    """:func:`declared_run_config` as TOML text."""
    def value(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = ["[tool.flwr.app.config]"]
    declared = declared_run_config()
    lines += [f"{k} = {value(v)}" for k, v in declared.items() if not isinstance(v, dict)]
    for method, table in declared.items():
        if isinstance(table, dict):
            lines += ["", f"[tool.flwr.app.config.{method}]"] + [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(declared_toml(), end="")
