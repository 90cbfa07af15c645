"""The task protocol (distill/task.py): every method's every setting reaches its config from the
run-config, one syntax everywhere; unknown methods and settings fail at the server with the known
names; the node-side settings are out of the server's reach; one class-budget rule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from distill.methods import available_methods
from distill.task import (DP_METHODS, NODE_ONLY, DistillTask, class_budget, declared_method_keys, method_config,
                          method_settings)
from server.settings import RunSettings


def _task_for(method: str, **config: object) -> DistillTask:
    key = "dp" if method in DP_METHODS else "method"
    return RunSettings.from_run_config({key: method, **config}).task


def test_every_registered_method_has_its_table():
    assert set(declared_method_keys()) == set(available_methods())
    assert set(DP_METHODS) <= set(available_methods())


ALTERNATIVES = {"dsa_strategy": ["crop_flip"], "kernel": ["ntk", "nngp"], "loss": ["mse", "platt"]}


def _changed(key: str, default: object) -> list[object]:
    """Values other than ``default`` to try for a setting, in the run-config's types."""
    if isinstance(default, bool):
        return [not default]
    if isinstance(default, int):
        return [default + 1, default - 1, 2 * default + 2]
    if isinstance(default, float):
        return [default * 2 if default else 0.5, default / 2, default + 1.0]
    return [v for v in ALTERNATIVES.get(key, []) if v != default]


@pytest.mark.parametrize("method", available_methods())
def test_every_setting_reaches_the_method_config(method):
    """Each declared setting, set alone to a value other than its default (as the CLI sends it, a
    string), comes back typed in the method config: none is dropped on the way."""
    table = declared_method_keys()[method]
    assert table, f"{method} declares no settings"
    unreachable = []
    for key, default in table.items():
        snake = key.replace("-", "_")
        for value in _changed(snake, default):
            text = str(value).lower() if isinstance(value, bool) else str(value)
            try:
                task = _task_for(method, **{f"{method}.{key}": text})
            except ValueError:
                continue  # out of this setting's range: try the next value
            config = method_config(task, seed=3)
            assert getattr(config, snake) == value and getattr(config, snake) != default, key
            assert DistillTask.from_config(task.to_config()) == task  # the wire form round-trips
            break
        else:
            unreachable.append(key)
    assert not unreachable, f"{method}: no other value reaches {unreachable} (add one to ALTERNATIVES)"


@pytest.mark.parametrize("method,key,value,field,want", [
    ("dc", "lr-img", "0.5", "lr_img", 0.5),           # was silently dropped for every method but DM
    ("dm", "batch-real", 64, "batch_real", 64),
    ("kip", "kernel", "ntk", "kernel", "ntk"),
    ("mtt", "syn-steps", "7", "syn_steps", 7),
    ("cafe", "inner-loop", 2, "inner_loop", 2),
    ("dp-dm", "reuse", "4", "reuse", 4),
    ("dpsgd-gm", "lr-img", 1.0, "lr_img", 1.0),
])
def test_a_changed_setting_reaches_the_method(method, key, value, field, want):
    config = method_config(_task_for(method, **{f"{method}.{key}": value}), seed=0)
    assert getattr(config, field) == want


def test_settings_of_other_methods_are_checked_and_not_sent():
    task = RunSettings.from_run_config({"method": "dm", "kip.kernel": "ntk", "dm.lr-img": 0.25}).task
    wire = task.to_config()
    assert wire["dm.lr-img"] == 0.25 and not any(k.startswith("kip.") for k in wire)
    with pytest.raises(ValueError, match="kernel"):  # checked even when not the running method
        RunSettings.from_run_config({"method": "dm", "kip.kernal": "ntk"})


@pytest.mark.parametrize("config,names", [
    ({"method": "knn"}, "known"),
    ({"knn.k": 1}, "known"),
    ({"method": "kip", "kip.kernal": "ntk"}, "kernel"),
    ({"method": "dm", "dm.lr-img": "fast"}, "expected float"),
    ({"method": "dm", "dm.dsa": 1}, "expected bool"),
    ({"method": "dm", "dm.lr-img": -1.0}, "a learning rate"),
    ({"lr-img": 0.5}, "unknown run-config keys"),   # the format-1 flat key: namespaced now
    ({"method": "dm", "dm.dsa-strategy": "zzz"}, "unknown DSA operations"),
    ({"method": "dm", "dm.momentum": -1.0}, "momentum"),
    ({"method": "dc", "dc.batch-train": -1}, "a count"),
    ({"method": "kip", "kip.lr-labels": 0.0}, "a learning rate"),
    ({"dp": "dp-dm", "dp-dm.dsa-strategy": "x" * 300}, "at most 200"),
    ({"method": "dm", "dm.lr-img": 0.5, "dm.lr_img": 2.0}, "given twice"),
])
def test_unknown_or_bad_settings_fail_at_the_server_with_the_known_names(config, names):
    with pytest.raises(ValueError, match=names):
        RunSettings.from_run_config(config)


@pytest.mark.parametrize("key", ["expert-cache", "insecure-reproducible-noise", "released-counts", "device",
                                 "seed", "arch-kwargs", "time-limit-s"])
def test_node_side_settings_are_out_of_the_servers_reach(key):
    method = "dp-mtt"
    assert key.replace("-", "_") in NODE_ONLY and key.replace("-", "_") not in method_settings(method)
    with pytest.raises(ValueError, match="unknown setting"):
        DistillTask.from_config({"dp": method, f"{method}.{key}": "x"})  # what a hostile server could send


def test_method_config_refuses_a_task_setting_passed_as_node_side():
    with pytest.raises(ValueError, match="not node-side"):
        method_config(DistillTask(), seed=0, lr_img=3.0)


def test_dp_config_carries_the_task_dp_spec_and_noise_init():
    task = DistillTask(dp="dp-dm", epsilon=2.0, delta=1e-6, clip=0.5, sample_rate=0.01, accountant="prv")
    config = method_config(task, seed=0)
    assert (config.init, config.epsilon, config.delta, config.clip, config.sample_rate, config.accountant) == \
        ("noise", 2.0, 1e-6, 0.5, 0.01, "prv")
    assert config.insecure_reproducible_noise is False


def test_class_budget_counts_capped_and_skipped():
    b = class_budget(np.array([0, 3, 12, 50, 19]), ipc=10, min_class_samples=10, samples_per_image=2)
    assert b.counts.tolist() == [0, 0, 6, 10, 9]
    assert (b.capped, b.skipped) == ([2, 4], [1])


@pytest.mark.parametrize("method", available_methods())
def test_a_flat_method_spec_builds_the_same_config_through_the_task(method):
    """Audits and benchmarks give flat specs; through the task they mean what make_config made of them."""
    from distill.methods import make_config
    from distill.task import config_from_settings

    spec = {"ipc": 2, "iterations": 3, "arch_kwargs": {"width": 8, "depth": 1}, "seed": 5}
    assert config_from_settings(method, spec) == make_config(method, **spec)
    assert config_from_settings(method, {}) == make_config(method)


@pytest.mark.parametrize("method", available_methods())
def test_a_method_is_registered_private_exactly_when_its_config_is_a_dp_config(method):
    """A DP method left unmarked would run as method= on the non-private path: no ledger, exact counts."""
    from distill.methods import make_config, private_methods
    from privacy import DPConfig

    assert isinstance(make_config(method), DPConfig) == (method in private_methods())
    assert (method in DP_METHODS) == (method in private_methods())


def test_a_client_keeps_experts_in_memory_unless_its_node_names_a_cache(tmp_path, monkeypatch, small_train):
    """The server cannot make a node write files: MTT's expert buffer goes to disk only where the
    node-config names a directory (expert-cache), never to the default cache."""
    from client.task import distill_partition, node_method_settings

    monkeypatch.setenv("FEDISTILL_EXPERT_CACHE", str(tmp_path / "default"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    task = DistillTask.from_config({"method": "mtt", "ipc": 1, "iterations": 1, "net-width": 8, "net-depth": 1,
                                    "min-class-samples": 1, "mtt.num-experts": 1, "mtt.expert-train-epochs": 2,
                                    "mtt.max-start-epoch": 0, "mtt.expert-epochs": 1, "mtt.syn-steps": 2,
                                    "mtt.expert-seed": 11})
    assert node_method_settings(task, {}) == {"expert_cache": None}
    distill_partition(small_train, task, seed=0, node=node_method_settings(task, {}))
    assert not any(p.is_file() for p in tmp_path.rglob("*")), "a file was written without the node's consent"
    node = node_method_settings(task, {"expert-cache": str(tmp_path / "mine")})
    distill_partition(small_train, task, seed=0, node=node)
    assert len(list((tmp_path / "mine").glob("*.npz"))) == 1
    assert node_method_settings(DistillTask(), {"expert-cache": "x"}) == {}  # DM keeps no buffer


@pytest.mark.parametrize("argv,method,settings", [
    ([], "dm", {}),
    (["--method", "kip", "--set", "kip.kernel=ntk"], "kip", {"kernel": "ntk"}),
    (["--set", "dp=dp-dm", "--set", "epsilon=2"], "dp-dm", {"epsilon": 2.0}),
    (["--set", "net-width=64", "--set", "dm.lr-img=0.5"], "dm", {"arch_kwargs": {"width": 64, "depth": 3},
                                                                  "lr_img": 0.5}),
])
def test_python_m_distill_runs_the_methods_own_defaults_plus_what_was_set(argv, method, settings):
    """A central distillation is not a federation's task: unset, it is the method config's default."""
    from distill.cli import build_parser, central_config
    from distill.methods import make_config

    config = central_config(build_parser().parse_args(["distill", *argv, "--out", "x.npz"]))
    assert config == make_config(method, progress=True, **settings)
