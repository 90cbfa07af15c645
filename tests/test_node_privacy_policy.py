"""The node's privacy policy and lifetime ledger, tried as the server would try to get around them.

The run-config belongs to whoever starts runs; these tests play that party: a second run, a
restarted node, a larger delta, dp="none", a corrupt ledger, two runs charging at once. The cap
must hold in every case, and nothing private may be read before the ledger has been charged.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from tests.flower_fixtures import make_context, task_identity  # noqa: F401 - fixture

from client.app import app
from client.private import Declined, dp_config, private_round
from client.task import DistillTask, load_partition
from distill.data import load_dataset
from distill.methods import distill, make_config
from distill.synthetic import SetMetadata
from privacy import DP_METHODS, epsilon_of, privacy_plan
from privacy.accounting import Spend
from privacy.ledger_cli import main as ledger_cli
from privacy.node_ledger import BudgetExceeded, LedgerError, NodeLedger
from privacy.policy import NodePolicy

from .conftest import SMALL_NET

ROOT = Path(__file__).resolve().parents[1]
NODE = {"partition-id": 1, "num-partitions": 4}
DP = {"iterations": 2, "ipc": 2, "net-width": 8, "net-depth": 2, "dp": "dp-dm", "sigma": 1.0}


def _message(config: dict, round_: int = 1) -> Message:
    task = DistillTask.from_config(dict(config, round=round_))
    return Message(RecordDict({"config": ConfigRecord(task.to_config())}), dst_node_id=7,
                   message_type=MessageType.TRAIN, group_id=str(round_))


def _policy_node(tmp_path: Path, **policy) -> dict:
    return {**NODE, "policy-ledger": str(tmp_path / "ledger.json"), **{f"policy-{k}": v for k, v in policy.items()}}


def _round_epsilon(config: dict = DP, counts: bool = True) -> float:
    spends = privacy_plan(dp_config(DistillTask.from_config(config), seed=0)).spends
    return epsilon_of(spends if counts else spends[1:], 1e-5, "rdp")


def _no_read():
    raise AssertionError("private data was read before the round was admitted and charged")


def test_the_lifetime_cap_holds_across_runs(tmp_path, task_identity):  # noqa: F811
    """Three runs of one round each, with a cap of ~2.5 rounds: the third run is declined."""
    cap = epsilon_of([*privacy_plan(dp_config(DistillTask.from_config(DP), seed=0)).spends,
                      Spend(1.0, 0.04, 2)], 1e-5, "rdp") * 1.01
    node = _policy_node(tmp_path, **{"epsilon-cap": cap})
    kinds = []
    for run_id in (1, 2, 3):  # a new Flower run starts with empty context.state every time
        reply = app(_message(DP), make_context(7, node, run_id=run_id))
        kinds.append(reply.content["declined"]["kind"] if "declined" in reply.content else "accepted")
    assert kinds == ["accepted", "accepted", "budget"]
    state = json.loads((tmp_path / "ledger.json").read_text())
    assert [e["run"] for e in state["entries"]] == ["1", "2"] and "class-counts" in state["releases"]
    assert NodeLedger(tmp_path / "ledger.json", state["data_id"], "rdp", 1e-5).spent() <= cap


def test_the_cap_holds_across_a_restart(tmp_path, task_identity):  # noqa: F811
    """A fresh process (a restarted SuperNode) reads the ledger file and declines before reading data."""
    node = _policy_node(tmp_path, **{"epsilon-cap": _round_epsilon() * 1.01})
    assert "synthetic" in app(_message(DP), make_context(7, node)).content
    code = textwrap.dedent(f"""
        import json, sys
        from client.private import Declined, private_round
        from client.task import DistillTask
        task = DistillTask.from_config({json.dumps(DP)})
        def no_read():
            sys.exit("data read")
        out = private_round(task, {json.dumps(node)}, run_id=99, node_id=7, seed=0, load=no_read)
        print(out.kind if isinstance(out, Declined) else "released")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "budget"


@pytest.mark.parametrize("change, reason", [({"delta": 0.5}, "delta"), ({"dp": "none"}, "requires DP"),
                                            ({"iterations": 50}, "iterations 50 > 10"), ({"ipc": 6}, "ipc 6 > 5"),
                                            ({"dp": "dpsgd-gm"}, "not allowed")])
def test_the_run_cannot_loosen_the_policy(change, reason, tmp_path, task_identity):  # noqa: F811
    node = _policy_node(tmp_path, **{"max-iterations": 10, "max-ipc": 5, "methods": "dp-dm"})
    config = {k: v for k, v in {**DP, **change}.items() if not (change.get("dp") == "none" and k == "sigma")}
    reply = app(_message(config), make_context(7, node))
    assert "synthetic" not in reply.content and reply.content["declined"]["kind"] == "policy"
    assert reason in reply.content["declined"]["reason"]
    m = dict(reply.content["metrics"])
    assert m["declined"] == 1 and not any(k.startswith("epsilon") for k in m)
    assert ("delta" in m) == (config.get("dp", "none") != "none")
    assert not (tmp_path / "ledger.json").exists()  # nothing charged, nothing read


def test_the_node_caps_the_threads_a_run_asks_for(tmp_path, task_identity):  # noqa: F811
    before = torch.get_num_threads()
    try:
        node = _policy_node(tmp_path, **{"max-threads": 1})
        app(_message({**DP, "client-threads": 2}), make_context(7, node))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_policy_file_and_node_config_keys_take_the_stricter_value(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"ledger": str(tmp_path / "l.json"), "epsilon-cap": 4.0, "max-delta": 1e-6,
                                "methods": ["dp-dm", "dpsgd-gm"]}))
    policy = NodePolicy.from_node_config({"privacy-policy": str(path), "policy-epsilon-cap": 8.0,
                                          "policy-max-delta": 1e-5, "policy-methods": "dp-dm,dp-mtt"})
    assert (policy.epsilon_cap, policy.max_delta, policy.methods) == (4.0, 1e-6, ("dp-dm",))
    with pytest.raises(ValueError, match="unknown policy keys"):
        NodePolicy.from_node_config({"policy-ledger": "x", "policy-epsilon-cp": 1.0})
    with pytest.raises(ValueError, match="ledger path"):
        NodePolicy.from_node_config({"policy-epsilon-cap": 1.0})
    assert NodePolicy.from_node_config(NODE) is None  # a simulated node with no policy
    # a key the node-config does not set keeps the file's value (here: DP not required, prv)
    path.write_text(json.dumps({"ledger": str(tmp_path / "l.json"), "dp-required": False, "accountant": "prv"}))
    merged = NodePolicy.from_node_config({"privacy-policy": str(path), "policy-max-ipc": 5})
    assert (merged.dp_required, merged.accountant, merged.max_ipc) == (False, "prv", 5)


@pytest.mark.parametrize("node, error", [
    ({"policy_epsilon_cap": 1.0}, "look like privacy-policy keys"),   # misspelt: never fail open
    ({"privacy_policy": "/etc/p.json"}, "look like privacy-policy keys"),
    ({"privacy-policy": ""}, "is empty"),
    ({"policy-ledger": "relative/ledger.json"}, "absolute path"),
])
def test_a_misconfigured_policy_is_an_error_not_a_node_without_one(node, error):
    with pytest.raises(ValueError, match=error):
        NodePolicy.from_node_config({**NODE, **node})


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "something else"}),
                                     json.dumps({"format": "fedistill-privacy-ledger", "version": 1,
                                                 "data_id": "x", "entries": [{"run": "1", "spends": [["a", 1, 1]]}]})])
def test_a_corrupt_ledger_releases_nothing(content, tmp_path):
    node = _policy_node(tmp_path)
    (tmp_path / "ledger.json").write_text(content)
    with pytest.raises(LedgerError, match="releases nothing|corrupt"):
        private_round(DistillTask.from_config(DP), node, run_id=1, node_id=7, seed=0, load=_no_read)


def test_a_ledger_never_moves_to_other_data(tmp_path):
    ledger = NodeLedger(tmp_path / "l.json", "sha256:aaa", "rdp", 1e-5)
    ledger.charge([Spend(2.0, 0.1, 10)], run="1", round=1, method="dp-dm")
    with pytest.raises(LedgerError, match="guards data"):
        NodeLedger(tmp_path / "l.json", "sha256:bbb", "rdp", 1e-5).spent()


def _charge_many(path: str, cap: float, attempts: int, out: "mp.Queue") -> None:
    ledger = NodeLedger(path, "sha256:race", "rdp", 1e-5, cap=cap)
    paid = 0
    for i in range(attempts):
        try:
            ledger.charge([Spend(1.0, 0.05, 20)], run=str(mp.current_process().pid), round=i, method="dp-dm")
            paid += 1
        except BudgetExceeded:
            pass
    out.put(paid)


def test_renaming_the_run_does_not_reset_its_budget(tmp_path, task_identity):  # noqa: F811
    """A server that sends a new run-key every round still meets the run's privacy-budget."""
    budget = _round_epsilon() * 1.01  # one round fits
    replies = [app(_message({**DP, "privacy-budget": budget, "run-key": f"fresh-{i}"}, round_=i + 1),
                   make_context(7, NODE, run_id=5)) for i in range(2)]
    assert "synthetic" in replies[0].content and replies[1].content["declined"]["kind"] == "budget"


def test_two_processes_charging_at_once_never_overspend(tmp_path):
    one = epsilon_of([Spend(1.0, 0.05, 20)], 1e-5, "rdp")
    fits = max(k for k in range(1, 40) if epsilon_of([Spend(1.0, 0.05, 20 * k)], 1e-5, "rdp") <= 5.0)
    assert fits >= 4 and one < 5.0
    path, ctx = str(tmp_path / "ledger.json"), mp.get_context("fork")
    out = ctx.Queue()
    workers = [ctx.Process(target=_charge_many, args=(path, 5.0, fits, out)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    paid = [out.get(timeout=5) for _ in workers]
    assert sum(paid) == fits  # each wanted `fits` charges; together exactly `fits` fit under the cap
    ledger = NodeLedger(path, "sha256:race", "rdp", 1e-5)
    assert len(ledger.read()["entries"]) == fits and ledger.spent() <= 5.0


def test_released_class_counts_are_kept_and_reused_at_no_cost(tmp_path, task_identity):  # noqa: F811
    node = _policy_node(tmp_path)
    first = app(_message(DP), make_context(7, node, run_id=1))
    second = app(_message(DP), make_context(7, node, run_id=2))
    spends = [json.loads(SetMetadata.from_dict(json.loads(r.content["meta"]["set-meta"])).privacy["spends"])
              for r in (first, second)]
    assert len(spends[0]) == 2 and len(spends[1]) == 1  # the second run makes no count release
    assert second.content["metrics"]["epsilon-round"] < first.content["metrics"]["epsilon-round"]


def test_ledger_cli_prints_the_spending_per_run_and_in_total(tmp_path, capsys):
    path = tmp_path / "l.json"
    data = tmp_path / "data.bin"
    data.write_bytes(b"private")
    assert ledger_cli(["init", str(path), "--data", str(data)]) == 0
    state = json.loads(path.read_text())
    ledger = NodeLedger(path, state["data_id"], "rdp", 1e-5)
    ledger.charge([Spend(1.0, 0.05, 20)], run="run-a", round=1, method="dp-dm")
    ledger.charge([Spend(1.0, 0.05, 20)], run="run-b", round=1, method="dp-dm")
    capsys.readouterr()
    assert ledger_cli(["show", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["runs"]) == {"run-a", "run-b"}
    assert report["epsilon_total"] == pytest.approx(epsilon_of([Spend(1.0, 0.05, 40)], 1e-5, "rdp"))
    assert ledger_cli(["show", str(path)]) == 0 and "lifetime total" in capsys.readouterr().out
    path.write_text("garbage")
    assert ledger_cli(["show", str(path)]) == 2


# --- nothing private outside the accountant --------------------------------------------------

def _npz(tmp_path: Path, name: str) -> Path:
    ds = load_dataset()
    raw = lambda split: ((split.images * 0.3081 + 0.1307).clamp(0, 1) * 255).round().to(torch.uint8)[:, 0]  # noqa: E731
    path = tmp_path / name
    np.savez(path, x_train=raw(ds.train)[:300].numpy(), y_train=ds.train.labels[:300].numpy(),
             x_test=raw(ds.test)[:50].numpy(), y_test=ds.test.labels[:50].numpy())
    return path


def test_under_dp_statistics_are_declared_never_computed_from_private_data(tmp_path, task_identity):  # noqa: F811
    path = _npz(tmp_path, "hospital.npz")  # no known dataset: its stats would come from the data
    node = {"data-path": str(path)}
    task = DistillTask.from_config(DP)
    computed = load_partition(task, node)[0].info  # the non-private path may compute them
    with pytest.raises(ValueError, match="must be public"):
        load_partition(task, node, public_only=True)
    with pytest.raises(ValueError, match="must be public"):  # Flower turns it into an error reply
        app(_message(DP), make_context(7, node))
    declared = {**node, "data-mean": "0.5", "data-std": "0.25", "num-classes": 10}
    reply = app(_message(DP), make_context(7, declared))
    info = SetMetadata.from_dict(json.loads(reply.content["meta"]["set-meta"])).dataset
    assert (info.mean, info.std, info.num_classes) == ((0.5,), (0.25,), 10)
    assert info.mean != computed.mean and info.std != computed.std


def test_every_dp_method_refuses_batchnorm(small_train, tmp_path):
    for method in DP_METHODS:
        with pytest.raises(ValueError, match="BatchNorm"):
            make_config(method, arch_kwargs={**SMALL_NET, "norm": "batchnorm"}, sigma=1.0)
    from privacy.config import refuse_coupling_layers  # also at the network, whatever built it
    from distill.networks import seeded_network

    net = seeded_network("convnet", 1, 10, (28, 28), seed=0, norm="batchnorm", **SMALL_NET)
    with pytest.raises(ValueError, match="BatchNorm"):
        refuse_coupling_layers(net, "dp-dm")
    cfg = make_config("dp-dm", ipc=1, iterations=1, arch_kwargs=SMALL_NET, sigma=1.0, count_sigma=2.0,
                      count_threshold=5.0)
    assert distill(small_train, cfg).images.shape[0] == 10  # the accepted norm still runs


def test_the_client_app_refuses_insecure_noise(tmp_path, task_identity):  # noqa: F811
    with pytest.raises(ValueError, match="insecure noise is for tests only"):
        app(_message(DP), make_context(7, {**NODE, "insecure-reproducible-noise": True}))
    with pytest.raises(ValueError, match="unknown task keys"):
        DistillTask.from_config({**DP, "insecure-reproducible-noise": True})
    assert dp_config(DistillTask.from_config(DP), seed=0).insecure_reproducible_noise is False


def test_no_private_read_before_a_decline(tmp_path):
    node = _policy_node(tmp_path, **{"epsilon-cap": 0.01})
    out = private_round(DistillTask.from_config(DP), node, run_id=1, node_id=7, seed=0, load=_no_read)
    assert isinstance(out, Declined) and out.kind == "budget" and out.metrics["epsilon-planned"] > 0.01
