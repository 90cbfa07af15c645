"""The server under DP: privacy figures validated, budget declines recorded with their reason,
per-client epsilon in metrics.jsonl and summary.json."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from client.app import app as client_app
from client.private import dp_config
from client.task import DistillTask
from distill.data import load_dataset
from distill.synthetic import SetMetadata
from privacy import epsilon_of, privacy_plan
from server.app import run
from server.store import client_privacy, read_metrics
from server.validate import Expectation, Rejected, check_declined, check_privacy
from tests.flower_fixtures import InProcessGrid, task_identity  # noqa: F401 - fixture

INFO = load_dataset().info
EXP = Expectation(INFO, "dp-dm", ipc=2, round=1, dp="dp-dm", delta=1e-5, rho=0.0)
GOOD = {"epsilon": 3.0, "delta": 1e-5, "sigma": 1.0, "sample_rate": 0.04, "steps": 2, "rho": 0.0,
        "accountant": "rdp"}
TASK = {"iterations": 2, "ipc": 2, "net-width": 8, "net-depth": 2, "dp": "dp-dm", "sigma": 1.0}
TINY = {**TASK, "server-epochs": 2, "server-dsa": False}


def _metrics(privacy: dict, **changes) -> MetricRecord:
    m = {"epsilon-round": privacy["epsilon"], "epsilon-total": privacy["epsilon"], "delta": privacy["delta"],
         "sigma": privacy["sigma"], "sample-rate": privacy["sample_rate"], "steps": privacy["steps"],
         "rho": privacy["rho"]}
    return MetricRecord({**m, **changes})


def _meta(**changes) -> SetMetadata:
    return SetMetadata(INFO, "dp-dm", 2, privacy={**GOOD, **changes})


def test_well_formed_privacy_figures_pass():
    check_privacy(_meta(), _metrics(GOOD, **{"epsilon-total": 5.0}), EXP)


@pytest.mark.parametrize("meta, metrics", [
    ({"epsilon": float("inf")}, {}), ({"epsilon": float("nan")}, {}), ({"delta": 1.5}, {}), ({"delta": 0.0}, {}),
    ({"delta": 1e-6}, {}),                       # contradicts the run's delta
    ({"rho": 0.5}, {}),                          # contradicts the run's rho
    ({"sample_rate": 0.0}, {}), ({"sigma": -1.0}, {}),
    ({"epsilon": None}, {}),                     # missing
    ({}, {"epsilon-round": 1.0}),                # metrics disagree with the set's metadata
    ({}, {"epsilon-total": 1.0}),                # a total below this round's spend
    ({}, {"epsilon-total": float("inf")}),
])
def test_malformed_privacy_figures_are_rejected(meta, metrics):
    with pytest.raises(Rejected) as err:
        check_privacy(_meta(**meta), _metrics({**GOOD, **{k: v for k, v in meta.items() if v is not None}},
                                              **metrics), EXP)
    assert err.value.kind == "privacy" and err.value.detail


def test_non_private_rho_must_match_the_run():
    exp = Expectation(INFO, "dm", ipc=2, round=1, rho=0.5)
    check_privacy(SetMetadata(INFO, "dm", 2, privacy={"rho": 0.5}), MetricRecord({}), exp)
    with pytest.raises(Rejected, match="rho"):
        check_privacy(SetMetadata(INFO, "dm", 2), MetricRecord({}), exp)


def test_a_decline_is_a_rejection_with_its_reason_and_unknown_kinds_are_malformed():
    with pytest.raises(Rejected) as err:
        check_declined(RecordDict({"declined": ConfigRecord({"kind": "budget", "reason": "x" * 1000})}))
    assert err.value.kind == "declined-budget" and len(err.value.detail) < 400
    with pytest.raises(Rejected) as err:
        check_declined(RecordDict({"declined": ConfigRecord({"kind": "bored"})}))
    assert err.value.kind == "malformed"


def test_dp_run_records_per_client_epsilon_and_budget_declines(tmp_path, task_identity):  # noqa: F811
    """3 clients, dp-dm, iterative; the budget pays for one round, so all decline the second."""
    one_round = privacy_plan(dp_config(DistillTask.from_config(TASK), seed=0)).epsilon
    summary = run(InProcessGrid(client_app, 3), {}, runs_dir=str(tmp_path), mode="iterative",
                  **{"num-server-rounds": 2, "privacy-budget": one_round}, **TINY)
    assert summary["status"] == "ok" and summary["dp"] == "dp-dm"
    first, second = read_metrics(summary["run"])
    assert first["accepted"] == 3 and first["rejected"] == 0 and 0 <= first["accuracy"] <= 1
    assert all(f["status"] == "accepted" and f["epsilon-total"] == one_round and f["delta"] == 1e-5
               and f["accountant"] == "rdp" for f in first["privacy"].values())
    assert second["accepted"] == 0 and second["rejected-declined-budget"] == 3
    assert all("privacy budget exceeded" in r for r in second["rejection-reasons"])
    assert {f["status"] for f in second["privacy"].values()} == {"declined"}
    on_disk = json.loads((tmp_path / next(p.name for p in tmp_path.iterdir()) / "summary.json").read_text())
    assert on_disk["privacy"] == summary["privacy"] == client_privacy([first, second])
    assert len(summary["privacy"]) == 3 and summary["epsilon-max"] == one_round
    for c in summary["privacy"].values():
        assert (c["rounds-participated"], c["rounds-declined"], c["delta"]) == (1, 1, 1e-5)
        assert c["epsilon-total"] == one_round == epsilon_of(
            privacy_plan(dp_config(DistillTask.from_config(TASK), seed=1)).spends, 1e-5)


def test_a_tampered_privacy_claim_is_rejected_and_the_round_goes_on(tmp_path, task_identity):  # noqa: F811
    def tamper(node: int, reply: Message) -> Message:
        if node == 102 and "meta" in reply.content:  # train replies only
            meta = json.loads(reply.content["meta"]["set-meta"])
            meta["privacy"]["epsilon"] = float("nan")
            reply.content["meta"] = ConfigRecord({"set-meta": json.dumps(meta)})
        return reply

    summary = run(InProcessGrid(client_app, 3, tamper=tamper), {}, runs_dir=str(tmp_path), **TINY)
    (record,) = read_metrics(summary["run"])
    assert record["accepted"] == 2 and record["rejected-privacy"] == 1 and summary["status"] == "ok"
    assert set(record["privacy"]) == {"101", "103"}


def test_simulation_flags_map_to_the_privacy_run_config_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    from simulations.run import overrides_from_args, parse_args

    args = parse_args(["--dp", "dpsgd-gm", "--epsilon", "4", "--delta", "1e-6", "--clip", "2", "--sigma", "0",
                       "--rho", "0.5", "--privacy-budget", "10"])
    out = overrides_from_args(args)
    assert {k: out[k] for k in ("dp", "epsilon", "delta", "clip", "sigma", "rho", "privacy-budget")} == {
        "dp": "dpsgd-gm", "epsilon": 4.0, "delta": 1e-6, "clip": 2.0, "sigma": 0.0, "rho": 0.5,
        "privacy-budget": 10.0}
    assert "dp" not in overrides_from_args(parse_args([]))  # unset flags keep the run-config defaults
