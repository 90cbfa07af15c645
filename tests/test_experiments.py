"""Experiments as files (conf/): every file loads strictly, holds the numbers the old Python
presets held, builds the same method configs, and ``--set`` reads one syntax everywhere."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from distill.methods import available_methods, make_config
from distill.task import DP_METHODS
from server.settings import RunSettings
from simulations.experiments import CONF, SCHEMAS, load_experiment, preset_names

ROOT = Path(__file__).resolve().parents[1]
CONVNET = {"width": 128, "depth": 3}  # the network an empty arch_kwargs built

# -- the presets as they were in Python before they became files (pasted, not imported) ----------

DISTILL = {
    "quick": dict(
        iterations={("dm", 0): 3, ("dc", 0): 1, ("dsa", 0): 1, ("kip", 0): 3, ("rfad", 0): 3, ("frepo", 0): 3,
                    ("bptt", 0): 2, ("mtt", 0): 2, ("cafe", 0): 1},
        settings={"dm": {"batch_real": 64}, "dc": {"batch_real": 32}, "dsa": {"batch_real": 32},
                  "kip": {"batch_real": 64}, "rfad": {"batch_real": 64, "n_models": 2},
                  "frepo": {"batch_real": 64}, "bptt": {"batch_real": 64, "inner_steps": 5, "truncate": 5},
                  "mtt": {"num_experts": 1, "expert_train_epochs": 2, "max_start_epoch": 0, "expert_epochs": 1,
                          "syn_steps": 2, "expert_cache": "bench_results/experts-quick"},
                  "cafe": {"batch_real": 64, "outer_loop": 1, "inner_loop": 1}},
        gm_loops={1: (1, 1), 10: (2, 2), 50: (2, 2)}, eval_epochs={1: 20, 10: 20, 50: 10}, pool_epochs=1),
    "cpu": dict(
        iterations={("dm", 1): 600, ("dm", 10): 600, ("dm", 50): 400,
                    ("dc", 1): 200, ("dsa", 1): 200, ("dc", 10): 40, ("dsa", 10): 40, ("dc", 50): 15, ("dsa", 50): 15,
                    ("kip", 1): 4000, ("kip", 10): 2000, ("kip", 50): 500,
                    ("rfad", 1): 1500, ("rfad", 10): 600, ("rfad", 50): 120,
                    ("frepo", 1): 5000, ("frepo", 10): 1500, ("frepo", 50): 300,
                    ("bptt", 1): 600, ("bptt", 10): 150, ("bptt", 50): 25,
                    ("mtt", 1): 300, ("mtt", 10): 200, ("mtt", 50): 60,
                    ("cafe", 1): 100, ("cafe", 10): 40, ("cafe", 50): 15},
        settings={"dc": {"batch_real": 64}, "dsa": {"batch_real": 64}, "bptt": {"inner_steps": 10, "truncate": 5},
                  "cafe": {"batch_real": 256}, "mtt": {"arch_kwargs": {"width": 32}}},
        gm_loops={1: (1, 1), 10: (10, 10), 50: (10, 10)}, eval_epochs={1: 1000, 10: 1000, 50: 500}, pool_epochs=20),
    "paper": dict(
        iterations={("dm", 0): 20000, ("dc", 0): 1000, ("dsa", 0): 1000, ("kip", 0): 5000, ("rfad", 0): 5000,
                    ("frepo", 0): 20000, ("bptt", 0): 5000, ("mtt", 0): 5000, ("cafe", 0): 1000},
        settings={}, gm_loops={1: (1, 1), 10: (10, 50), 50: (50, 10)},
        eval_epochs={1: 1000, 10: 1000, 50: 1000}, pool_epochs=50),
}
DISTILL_METHODS = ("dm", "dc", "dsa", "kip", "rfad", "frepo", "bptt", "mtt", "cafe")

PRIVACY_DEFAULT = dict(per_class=0, test_size=0, ipc=10, net={}, dm_steps=1000, dm_sample_rate=0.04, gm_iterations=30,
                       gm_outer=10, gm_inner=10, gm_sample_rate=0.04, rho_iterations=1000, nodp_batch_real=256,
                       eval_net={"width": 128}, eval_epochs=300, eval_seeds=(0, 1, 2), dpsgd_epochs=15,
                       dpsgd_net={"width": 32})
PRIVACY = {
    "full": PRIVACY_DEFAULT,
    "medium": {**PRIVACY_DEFAULT, **dict(per_class=300, net={"width": 64}, dm_steps=400, gm_iterations=10, gm_outer=5,
                                         gm_inner=5, rho_iterations=200, nodp_batch_real=64, eval_net={"width": 64},
                                         eval_seeds=(0, 1))},
    "quick": {**PRIVACY_DEFAULT, **dict(per_class=100, test_size=500, ipc=10, net={"width": 16, "depth": 2},
                                        dm_steps=20, dm_sample_rate=0.1, gm_iterations=2, gm_outer=2, gm_inner=1, gm_sample_rate=0.1,
                                        rho_iterations=20, eval_net={"width": 16, "depth": 2}, eval_epochs=20,
                                        eval_seeds=(0,), dpsgd_epochs=2, dpsgd_net={"width": 16, "depth": 2})},
}

APPS_DEFAULT = dict(ipc=10, dm_iterations=600, dm_settings={}, net={}, test_per_class=None, seeds=(0, 1, 2),
                    arch_epochs={"convnet": 300, "mlp": 300, "lenet": 300, "alexnet": 100, "resnet18": 100},
                    crossarch_random=True, nas_grid={}, nas_proxy_epochs=100, nas_pool_epochs=3, nas_pool_size=None,
                    nas_seeds=(0,), cl_buffers=("distill", "random", "herding"), cl_dm_iterations=200,
                    cl_dm_settings={}, cl_epochs=300, cl_seeds=(0,))
APPLICATIONS = {
    "quick": {**APPS_DEFAULT, **dict(
        dm_iterations=10, dm_settings={"batch_real": 64}, net={"width": 32}, test_per_class=20, seeds=(0,),
        arch_epochs={"convnet": 5, "mlp": 10, "lenet": 10, "alexnet": 1, "resnet18": 1}, crossarch_random=False,
        nas_grid={"depths": (1, 2), "widths": (16,), "norms": ("instancenorm", "none"),
                  "activations": ("relu", "sigmoid"), "poolings": ("avgpool",)},
        nas_proxy_epochs=5, nas_pool_epochs=1, nas_pool_size=1000, cl_buffers=("distill", "random"),
        cl_dm_iterations=5, cl_dm_settings={"batch_real": 32}, cl_epochs=5)},
    "medium": {**APPS_DEFAULT, **dict(
        dm_iterations=200, net={"width": 32}, seeds=(0, 1),
        arch_epochs={"convnet": 300, "mlp": 300, "lenet": 300, "alexnet": 100, "resnet18": 50},
        nas_proxy_epochs=100, nas_pool_epochs=2, cl_dm_iterations=100, cl_epochs=200)},
    "default": APPS_DEFAULT,
}

CUDA_SMOKE = {
    "dm": {"iterations": 5}, "dc": {"iterations": 2, "outer_loop": 2, "inner_loop": 2},
    "dsa": {"iterations": 2, "outer_loop": 2, "inner_loop": 2}, "kip": {"iterations": 5},
    "rfad": {"iterations": 5}, "frepo": {"iterations": 5}, "bptt": {"iterations": 3, "inner_steps": 5},
    "dp-dm": {"iterations": 5, "epsilon": 8.0}, "dpsgd-gm": {"iterations": 2, "epsilon": 8.0},
}


def same(cfg) -> dict:
    """A config as comparable data: an empty ``arch_kwargs`` is the default ConvNet it built."""
    out = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "embedder_state"}
    out["arch_kwargs"] = {**CONVNET, **out["arch_kwargs"]}
    return out


def net_of(kwargs: dict) -> tuple[int, int]:
    return kwargs.get("width", 128), kwargs.get("depth", 3)


# -- every file loads ----------------------------------------------------------------------------

FILES = sorted(CONF.glob("*/*.toml"))


def test_every_script_has_its_files():
    assert {p.parent.name for p in FILES} == set(SCHEMAS)
    assert preset_names("distill") == ["cifar10-cpu", "cifar10-gpu", "cifar10-zca-cpu", "cifar10-zca-gpu",
                                       "cpu", "mnist-cpu", "mnist-gpu", "paper", "quick"]
    assert preset_names("privacy") == ["full", "medium", "quick"]
    assert preset_names("applications") == ["default", "medium", "quick"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_file_loads_and_says_what_it_is_for(path):
    assert path.read_text().startswith("# ")
    exp = load_experiment(path)
    assert type(exp) is SCHEMAS[path.parent.name]
    assert load_experiment(f"{path.parent.name}/{path.stem}") == exp == load_experiment(path.stem, path.parent.name)


# -- the same numbers, the same configs -----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DISTILL))
def test_distill_files_build_the_old_presets_configs(name):
    from simulations.bench_distill import job_config

    old, exp = DISTILL[name], load_experiment(name, "distill")
    assert exp.pool_epochs == old["pool_epochs"]
    for ipc in (1, 10, 50):
        assert exp.epochs_at(ipc) == old["eval_epochs"][ipc]
        for method in DISTILL_METHODS:
            settings = dict(old["settings"].get(method, {}))
            if method in ("dc", "dsa"):
                settings["outer_loop"], settings["inner_loop"] = old["gm_loops"][ipc]
            iterations = old["iterations"].get((method, ipc), old["iterations"].get((method, 0), 0))
            before = make_config(method, ipc=ipc, iterations=iterations, seed=0, device="cpu", **settings)
            assert same(job_config(exp, method, ipc, device="cpu")) == same(before), (method, ipc)
    assert exp.epochs_at(5) is None  # an IPC the file does not name: the evaluator's own default


def test_quick_dm_at_ipc_10_reads_as_before():
    from simulations.bench_distill import job_config

    exp = load_experiment("distill/quick")
    cfg = job_config(exp, "dm", 10)
    assert (cfg.iterations, cfg.batch_real, exp.epochs_at(10)) == (3, 64, 20)
    assert job_config(load_experiment("distill/cpu"), "mtt", 10).arch_kwargs == {"width": 32, "depth": 3}


@pytest.mark.parametrize("name", sorted(PRIVACY))
def test_privacy_files_hold_the_old_presets(name):
    from simulations.bench_privacy import PRESETS, RHOS, row_config

    old, p = PRIVACY[name], load_experiment(name, "privacy")
    assert PRESETS[name] == p
    assert (p.per_class, p.test_size, p.ipc, p.eval_epochs, p.eval_seeds, p.dpsgd_epochs, p.rho_iterations) == (
        old["per_class"], old["test_size"], old["ipc"], old["eval_epochs"], old["eval_seeds"], old["dpsgd_epochs"],
        old["rho_iterations"])
    assert (p.net_width, p.net_depth) == net_of(old["net"])
    assert (p.eval_net_width, p.eval_net_depth) == net_of(old["eval_net"])
    assert (p.dpsgd_net_width, p.dpsgd_net_depth) == net_of(old["dpsgd_net"])
    assert (p.dm_steps, p.dm_sample_rate, p.gm_iterations, p.gm_outer, p.gm_inner, p.gm_sample_rate) == (
        old["dm_steps"], old["dm_sample_rate"], old["gm_iterations"], old["gm_outer"], old["gm_inner"],
        old["gm_sample_rate"])
    gm = {"iterations": old["gm_iterations"], "outer_loop": old["gm_outer"], "inner_loop": old["gm_inner"]}
    rows = [("dp-dm", {"epsilon": 4.0}, {"epsilon": 4.0, "iterations": old["dm_steps"],
                                         "sample_rate": old["dm_sample_rate"]}),
            ("dpsgd-gm", {"epsilon": 4.0}, {"epsilon": 4.0, **gm, "sample_rate": old["gm_sample_rate"]}),
            ("dm", {"init": "noise"}, {"init": "noise", "iterations": old["dm_steps"],
                                       "batch_real": old["nodp_batch_real"]}),
            ("dsa", {"init": "noise"}, {"init": "noise", **gm})]
    rows += [("dm", {"init": "real", "rho": rho, "iterations": p.rho_iterations},
              {"init": "real", "rho": rho, "iterations": old["rho_iterations"], "batch_real": old["nodp_batch_real"]})
             for rho in RHOS]
    for method, row, before in rows:
        assert same(row_config(method, row, p)) == same(make_config(method, ipc=old["ipc"], arch_kwargs=old["net"],
                                                                   **before)), (method, row)
    # bench_before_after.py's call: snake_case keys and a seed
    cfg = row_config("dp-dm", {"epsilon": 2.0, "seed": 7, "iterations": p.dm_steps, "sample_rate": 0.5}, p)
    assert (cfg.seed, cfg.epsilon, cfg.sample_rate, cfg.init) == (7, 2.0, 0.5, "noise")


@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_applications_files_hold_the_old_presets(name):
    from simulations.bench_applications import continual_settings, dm_config

    old, p = APPLICATIONS[name], load_experiment(name, "applications")
    for key in ("ipc", "test_per_class", "seeds", "arch_epochs", "crossarch_random", "nas_grid", "nas_proxy_epochs",
                "nas_pool_epochs", "nas_pool_size", "nas_seeds", "cl_buffers", "cl_epochs", "cl_seeds"):
        assert getattr(p, key) == old[key], key
    assert (p.net_width, p.net_depth) == net_of(old["net"])
    before = make_config("dm", ipc=old["ipc"], iterations=old["dm_iterations"], seed=0, device="cpu",
                         arch_kwargs=dict(old["net"]), **old["dm_settings"])
    assert same(dm_config(p, "cpu")) == same(before)
    cl_before = {"iterations": old["cl_dm_iterations"], "device": "cpu", "arch_kwargs": dict(old["net"]),
                 **old["cl_dm_settings"]}
    cl_after = continual_settings(dm_config(p, "cpu", continual=True))
    assert "ipc" not in cl_after and "seed" not in cl_after  # ContinualConfig refuses them
    assert same(make_config("dm", ipc=old["ipc"], seed=3, **cl_after)) == same(
        make_config("dm", ipc=old["ipc"], seed=3, **cl_before))


def test_cuda_smoke_builds_the_old_configs():
    from simulations.cuda_smoke import smoke_config

    for method in available_methods():
        before = make_config(method, ipc=2, device="cuda", seed=0, **CUDA_SMOKE.get(method, {"iterations": 2}))
        after = smoke_config(method, "cuda")
        assert same(after) == same(before), method
        assert (after.method in DP_METHODS) == (method in DP_METHODS)


def test_federated_file_plans_the_old_runs():
    from simulations.bench_federated import jobs, set_args
    from distill.task import parse_assignments

    exp = load_experiment("federated/default")
    planned = jobs(exp, list(exp.splits), list(exp.runs), {"net-width": 64})
    assert [name for name, _, _ in planned] == [f"{m}-{s}" for s in ("iid", "0.5", "0.1")
                                                for m in ("oneshot", "iterative", "fedavg")] + ["oneshot100-0.5"]
    by_name = {name: (clients, rc) for name, clients, rc in planned}
    assert by_name["fedavg-0.1"] == (10, {"fraction-evaluate": 0, "partitioner": "dirichlet", "alpha": 0.1,
                                          "algorithm": "fedavg", "num-server-rounds": 50, "net-width": 64})
    assert by_name["oneshot100-0.5"][0] == 100
    settings = RunSettings.from_run_config({}, **parse_assignments(set_args(by_name["iterative-iid"][1])[1::2]))
    assert (settings.mode, settings.num_server_rounds, settings.task.partitioner, settings.fraction_evaluate,
            settings.task.net_width) == ("iterative", 3, "iid", 0.0, 64)
    fewer = jobs(exp, ["0.1"], ["fedavg"], {}, tag="-x", large=False, rounds={"fedavg": 20})
    assert fewer == [("fedavg-x-0.1", 10, {"fraction-evaluate": 0, "partitioner": "dirichlet", "alpha": 0.1,
                                           "algorithm": "fedavg", "num-server-rounds": 20})]


def test_scale_file_holds_the_old_settings():
    exp = load_experiment("scale/default")
    assert exp.clients == (10, 100, 1000)
    assert exp.run_config == {"mode": "one-shot", "partitioner": "iid", "ipc": 1, "iterations": 20,
                              "min-class-samples": 1, "samples-per-image": 1, "server-epochs": 20,
                              "fraction-evaluate": 0, "holdout-fraction": 0}


# -- strict: a typo fails at load, naming the file and the key -----------------------------------

def write(tmp_path, kind: str, text: str) -> Path:
    path = tmp_path / kind / "x.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("kind,text,named", [
    ("distill", "pool-epoch = 3\n", "'pool-epoch'"),
    ("distill", "pool_epochs = 3\n", "'pool_epochs'"),                         # keys are kebab-case
    ("distill", "[methods.dm]\nbatch-reel = 64\n", "dm.batch-reel"),
    ("distill", "[methods.dm]\nipc-10 = { lr-imgg = 1.0 }\n", "dm.lr-imgg"),
    ("distill", "[methods.dmm]\niterations = 1\n", "'dmm'"),
    ("distill", "[methods.dm]\nbatch-real = \"many\"\n", "batch-real"),
    ("distill", "eval-epochs = { ten = 20 }\n", "eval-epochs"),
    ("distill", "[evaluator]\nlearning-rate = 0.1\n", "'learning-rate'"),
    ("distill", "[evaluator]\nbatch-size = 25.5\n", "batch-size"),
    ("distill", "[evaluator]\nlr = -1.0\n", "lr"),
    ("distill", "[evaluator]\nlr = inf\n", "lr"),
    ("distill", "[evaluator]\nmomentum = -0.5\n", "momentum"),
    ("distill", "[evaluator]\nweight-decay = -1.0\n", "weight_decay"),
    ("distill", "zca = true\nzca-eps = 0.0\n", "zca-eps"),
    ("privacy", "[methods.dp-dm]\nsample-rat = 0.1\n", "dp-dm.sample-rat"),
    ("privacy", "[methods.kip]\niterations = 1\n", "kip"),                    # no row runs it
    ("privacy", "eval-seeds = 0\n", "eval-seeds"),
    ("privacy", "[methods.dm]\nipc-10 = { iterations = 1 }\n", "ipc-10"),      # per-IPC tables: distill only
    ("applications", "[cl-methods.dm]\nbatch_rael = 1\n", "dm.batch-rael"),
    ("applications", "nas-pool-size = 1.5\n", "nas-pool-size"),
    ("federated", "large-run = \"fedavg\"\nlarge-split = \"iid\"\n[splits]\niid = { partitioner = \"iid\" }\n"
                  "[runs]\nfedavg = { algorithm = \"fedavg\", num-server-round = 5 }\n", "num-server-round"),
    ("federated", "[splits]\niid = { partitioner = \"iid\" }\n[runs]\nfedavg = { algorithm = \"fedavg\" }\n",
     "large-run"),
    ("scale", "[run-config]\nipcs = 1\n", "ipcs"),
])
def test_a_bad_key_or_value_fails_naming_the_file_and_key(tmp_path, kind, text, named):
    path = write(tmp_path, kind, "# a test file\n" + text)
    with pytest.raises(ValueError) as err:
        load_experiment(path)
    assert str(path) in str(err.value) and named in str(err.value)


def test_a_value_in_range_is_checked_by_the_method_itself(tmp_path):
    with pytest.raises(ValueError, match="rho"):
        load_experiment(write(tmp_path, "distill", "[methods.dm]\nrho = 1.5\n"))


def test_missing_keys_take_the_task_and_schema_defaults(tmp_path):
    from distill.task import DistillTask
    from simulations.bench_distill import job_config

    exp = load_experiment(write(tmp_path, "distill", "# empty\n"))
    cfg = job_config(exp, "dm", 10)
    assert (cfg.iterations, cfg.arch_kwargs, exp.pool_epochs) == (
        DistillTask.iterations, {"width": DistillTask.net_width, "depth": DistillTask.net_depth}, 20)


def test_an_unknown_preset_or_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no such experiment file"):
        load_experiment("distill/nope")
    with pytest.raises(ValueError, match="no experiment kind"):
        load_experiment(write(tmp_path, "other", "x = 1\n"))


# -- one --set syntax -------------------------------------------------------------------------------

def test_bench_distill_set_takes_run_config_keys():
    from simulations.bench_distill import job_config, method_overrides

    sets = ["frepo.lr_img=0.03", "iterations=7", "dm.lr-img=0.5", "dm.iterations=9", "mtt.net-width=16"]
    assert method_overrides(sets, "frepo") == {"lr-img": 0.03, "iterations": 7}
    assert method_overrides(sets, "dm") == {"iterations": 9, "lr-img": 0.5}
    assert method_overrides(["frepo.lr-img=0.1", "frepo.lr_img=0.2"], "frepo") == {"lr-img": 0.2}  # one key
    exp = load_experiment("distill/quick")
    frepo = job_config(exp, "frepo", 10, method_overrides(sets, "frepo"))
    assert (frepo.lr_img, frepo.iterations, frepo.batch_real) == (0.03, 7, 64)  # the file's batch-real kept
    assert job_config(exp, "mtt", 1, method_overrides(sets, "mtt")).arch_kwargs == {"width": 16, "depth": 3}
    assert job_config(exp, "dm", 1, method_overrides(["dm.param=idc"], "dm")).param == "idc"
    with pytest.raises(ValueError, match="unknown method"):
        method_overrides(["frep.lr-img=1"], "frepo")
    with pytest.raises(ValueError, match="dotted"):
        method_overrides(["lr-img=1"], "dm")
    with pytest.raises(ValueError, match="frepo.lr-imgg"):
        job_config(exp, "frepo", 1, method_overrides(["frepo.lr-imgg=1"], "frepo"))


@pytest.mark.parametrize("argv", [["--set", "dm.lr-imgg=1"], ["--set", "iterations=many"],
                                  ["--config", "missing.toml"], ["--set", "nokey"]])
def test_bench_distill_refuses_a_bad_file_or_set_before_any_work(tmp_path, argv, capsys):
    from simulations.bench_distill import main

    with pytest.raises(SystemExit) as stop:
        main(["--methods", "dm", "--ipc", "1", "--no-pool", "--out", str(tmp_path / "out"), *argv])
    assert stop.value.code == 2 and not (tmp_path / "out").exists()


def test_run_py_sends_only_the_flags_given(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    from simulations.run import overrides_from_args, parse_args

    empty = overrides_from_args(parse_args([]))
    assert set(empty) == {"runs-dir", "min-available-nodes", "min-train-nodes"}
    assert empty["runs-dir"] == str(ROOT / "runs")
    given = overrides_from_args(parse_args(["--method", "kip", "--rounds", "4", "--cpus-per-client", "2",
                                            "--name", "x", "--set", "kip.kernel=ntk", "--set", "ipc=5"]))
    assert {k: given[k] for k in ("method", "num-server-rounds", "client-threads", "run-name", "kip.kernel", "ipc")} \
        == {"method": "kip", "num-server-rounds": 4, "client-threads": 2, "run-name": "x", "kip.kernel": "ntk",
            "ipc": 5}
    assert overrides_from_args(parse_args(["--seed", "4"]))["seed"] == 4
    # what callers read (Ray's CPUs, run_backdoor.py's trigger seed): the flag, else the run-config's
    assert (parse_args([]).cpus_per_client, parse_args([]).seed) == (1, 0)
    assert (parse_args(["--set", "client-threads=3", "--set", "seed=5"]).cpus_per_client,
            parse_args(["--set", "seed=5"]).seed, parse_args(["--seed", "6", "--set", "seed=5"]).seed) == (3, 5, 6)


def test_run_py_sends_a_relative_dataset_path_as_absolute(tmp_path, monkeypatch):
    """Virtual nodes need not share the driver's working directory; a name is left alone."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    from simulations.run import overrides_from_args, parse_args

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.npz").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert overrides_from_args(parse_args(["--dataset", "data/x.npz"]))["dataset"] == str(tmp_path / "data" / "x.npz")
    assert overrides_from_args(parse_args(["--set", "dataset=data/x.npz"]))["dataset"] == str(tmp_path / "data" / "x.npz")
    assert overrides_from_args(parse_args(["--dataset", "mnist"]))["dataset"] == "mnist"


def test_make_demo_runs_the_same_settings_as_before(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    from simulations.run import overrides_from_args, parse_args

    demo = ("--clients 10 --partitioner dirichlet --alpha 0.5 --method dm --ipc 10 --mode one-shot --name demo "
            "--set server-epochs=100").split()
    assert " ".join(demo) in (ROOT / "Makefile").read_text()
    before = {"algorithm": "fedistill", "mode": "one-shot", "num-server-rounds": 3, "dataset": "mnist10k",
              "partitioner": "dirichlet", "alpha": 0.5, "method": "dm", "ipc": 10, "seed": 0, "client-threads": 1,
              "runs-dir": str(ROOT / "runs"), "run-name": "demo", "min-available-nodes": 10, "min-train-nodes": 2,
              "server-epochs": 100}  # what run.py sent before its flags defaulted to None
    after = overrides_from_args(parse_args(demo))
    assert len(after) < len(before)
    assert RunSettings.from_run_config({}, **after) == RunSettings.from_run_config({}, **before)


def test_no_script_builds_a_method_config_itself_and_the_sweep_uses_kebab_keys():
    for path in (ROOT / "simulations").glob("*.py"):
        assert "make_config(" not in path.read_text(), path.name
    sweep = (ROOT / "simulations" / "device_sweep.sh").read_text()
    assert "--set frepo.lr-img=0.03" in sweep and "lr_img" not in sweep



def test_the_loaders_docstring_example_runs():
    import doctest

    import simulations.experiments as module

    result = doctest.testmod(module)
    assert result.attempted >= 2 and result.failed == 0


# -- the papers' protocol presets ------------------------------------------------------------------

PROTOCOL = ["mnist-cpu", "mnist-gpu", "cifar10-cpu", "cifar10-gpu", "cifar10-zca-cpu", "cifar10-zca-gpu"]


@pytest.mark.parametrize("name", PROTOCOL)
def test_protocol_presets_evaluate_as_the_papers(name):
    """DC/DSA/DM's evaluate_synset: ConvNet-3 x 128 (instance norm), SGD lr 0.01 /10 at half,
    momentum 0.9, weight decay 5e-4, batch 256, DSA, 1000 epochs at IPC 1 and 10."""
    from distill.train import TrainConfig

    exp = load_experiment(f"distill/{name}")
    for ipc in (1, 10):
        cfg = exp.train_config(ipc)
        assert (cfg.arch, cfg.arch_kwargs, cfg.epochs) == ("convnet", {}, 1000)
        assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.dsa) == (0.01, 0.9, 5e-4, 256, True)
    assert (TrainConfig().arch, exp.net) == ("convnet", {"net-width": 128, "net-depth": 3})
    dataset = "mnist70k.npz" if name.startswith("mnist") else "cifar10-jpeg.tar.gz"
    assert exp.data_source.endswith("shared/data/" + dataset) and exp.data_source.startswith("/")
    assert exp.zca == ("zca" in name) and exp.zca_eps == 0.1   # KIP/FRePo/MTT's CIFAR-10 space only


@pytest.mark.parametrize("name", ["mnist-gpu", "cifar10-gpu"])
def test_gpu_presets_run_the_papers_budgets(name):
    from simulations.bench_distill import job_config

    exp = load_experiment(f"distill/{name}")
    for ipc in (1, 10, 50):
        dm = job_config(exp, "dm", ipc)
        assert (dm.iterations, dm.batch_real, dm.lr_img, dm.dsa) == (20000, 256, 1.0, True)
    loops = {ipc: job_config(exp, "dsa", ipc).loops for ipc in (1, 10, 50)}
    assert loops == {1: (1, 1), 10: (10, 50), 50: (50, 10)}
    assert job_config(exp, "dsa", 10).iterations == 1000


def test_mtt_cifar_gpu_preset_has_the_papers_segments():
    from simulations.bench_distill import job_config

    exp = load_experiment("distill/cifar10-zca-gpu")
    got = {ipc: (c.syn_steps, c.expert_epochs, c.max_start_epoch, c.expert_train_epochs)
           for ipc in (1, 10, 50) for c in [job_config(exp, "mtt", ipc)]}
    assert got == {1: (50, 2, 2, 50), 10: (30, 2, 20, 50), 50: (30, 2, 40, 50)}


def test_a_relative_dataset_is_from_the_repository_root_and_a_name_stays(tmp_path):
    from simulations.experiments import ROOT

    rel = load_experiment(write(tmp_path, "distill", 'dataset = "data/x.npz"\n'))
    assert rel.data_source == str(ROOT / "data" / "x.npz")
    assert load_experiment(write(tmp_path, "distill", 'dataset = "mnist"\n')).data_source == "mnist"
    home = load_experiment(write(tmp_path, "distill", 'dataset = "~/x.npz"\n')).data_source
    assert home == str(Path.home() / "x.npz")
