"""The server under DP: privacy figures validated, budget and policy declines recorded with their
reason, per-client epsilon in metrics.jsonl and summary.json, built from validated figures only."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from client.app import app as client_app
from client.private import dp_config
from client.task import DistillTask
from distill.data import load_dataset
from distill.synthetic import SetMetadata
from distill.store_format import model_path
from privacy import epsilon_of, privacy_plan
from server.app import run
from server.rounds import RoundResult, RunState, _validated, round_record
from server.store import client_privacy, privacy_summary, read_metrics
from server.validate import (DECLINE_KINDS, KINDS, Declined, Expectation, Rejected, RunPrivacy, check_declined,
                             check_figures, check_privacy, check_recorded)
from tests.flower_fixtures import InProcessGrid, stored_model_accuracy, task_identity  # noqa: F401 - fixture

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
        check_declined(RecordDict({"declined": ConfigRecord({"kind": "budget", "reason": "x" * 1000})}), DP_RUN)
    assert err.value.kind == "declined-budget" and len(err.value.detail) < 400
    with pytest.raises(Rejected) as err:
        check_declined(RecordDict({"declined": ConfigRecord({"kind": "bored"})}), DP_RUN)
    assert err.value.kind == "malformed"


def test_policy_declines_are_a_rejection_kind_of_their_own():
    assert DECLINE_KINDS["policy"] == "declined-policy" and "declined-policy" in KINDS
    assert set(DECLINE_KINDS.values()) <= set(KINDS)


DP_RUN, PLAIN_RUN = RunPrivacy("dp-dm", 1e-5, 0.0), RunPrivacy("none", 1e-5, 0.0)
BUDGET = {"declined": 1, "epsilon-total": 2.0, "epsilon-planned": 3.5, "delta": 1e-5, "privacy-budget": 3.0}


@pytest.mark.parametrize("kind, metrics, run, figures", [
    ("budget", BUDGET, DP_RUN, {k: v for k, v in BUDGET.items() if k != "declined"}),
    ("budget", {**BUDGET, "epsilon-planned": 2.0}, DP_RUN, {k: v for k, v in BUDGET.items() if k != "declined"}
     | {"epsilon-planned": 2.0}),                                      # planned == total: possible
    ("policy", {"declined": 1, "delta": 1e-5}, DP_RUN, {"delta": 1e-5}),
    ("policy", {"declined": 1}, PLAIN_RUN, {}),                        # a non-DP run: no figures at all
])
def test_honest_declines_keep_their_validated_figures(kind, metrics, run, figures):
    content = RecordDict({"declined": ConfigRecord({"kind": kind, "reason": "r"}), "metrics": MetricRecord(metrics)})
    with pytest.raises(Declined) as err:
        check_declined(content, run)
    assert err.value.kind == f"declined-{kind}" and err.value.figures == figures and err.value.refused == ""


# Forged decline figures: each one makes the decline's figures unrecordable (the decline stands).
FORGED_DECLINES = [
    ("budget", {"declined": 1, "epsilon-total": 1e300, "delta": 0.9}, PLAIN_RUN, "without DP"),
    ("policy", {"declined": 1, "epsilon-total": 1.0}, PLAIN_RUN, "without DP"),  # never an epsilon without DP
    ("policy", {"declined": 1, "delta": 1e-5}, PLAIN_RUN, "without DP"),
    ("policy", {"declined": 1, "sigma": 1.0}, PLAIN_RUN, "without DP"),
    ("budget", {**BUDGET, "epsilon-total": float("nan")}, DP_RUN, "finite"),
    ("budget", {**BUDGET, "epsilon-planned": float("inf")}, DP_RUN, "finite"),
    ("budget", {**BUDGET, "epsilon-total": -1.0}, DP_RUN, ">= 0"),
    ("budget", {**BUDGET, "privacy-budget": -3.0}, DP_RUN, ">= 0"),
    ("budget", {**BUDGET, "epsilon-planned": 1.0}, DP_RUN, "below epsilon-total"),
    ("budget", {**BUDGET, "delta": 1e-3}, DP_RUN, "the run's delta"),
    ("budget", {**BUDGET, "delta": 0.9}, DP_RUN, "the run's delta"),
    ("budget", {**BUDGET, "delta": 1.5}, DP_RUN, "in (0, 1)"),
    ("budget", {k: v for k, v in BUDGET.items() if k != "epsilon-planned"}, DP_RUN, "missing"),
    ("budget", {**BUDGET, "epsilon-round": 0.5}, DP_RUN, "more"),     # not a figure a decline carries
    ("policy", {"declined": 1, "delta": 1e-5, "epsilon-total": 9.0}, DP_RUN, "more"),
]


@pytest.mark.parametrize("kind, metrics, run, why", FORGED_DECLINES)
def test_a_decline_with_forged_figures_is_still_a_decline_but_its_figures_are_refused(kind, metrics, run, why):
    content = RecordDict({"declined": ConfigRecord({"kind": kind, "reason": "r"}), "metrics": MetricRecord(metrics)})
    with pytest.raises(Declined) as err:
        check_declined(content, run)
    assert err.value.kind == f"declined-{kind}" and err.value.figures == {}
    assert why in err.value.refused


def test_a_bool_is_not_a_privacy_figure():
    content = RecordDict({"declined": ConfigRecord({"kind": "budget", "reason": "r"}),
                          "metrics": ConfigRecord({**BUDGET, "privacy-budget": True})})  # ConfigRecord takes bools
    with pytest.raises(Declined) as err:
        check_declined(content, DP_RUN)
    assert err.value.figures == {} and "finite real numbers" in err.value.refused
    with pytest.raises(Rejected, match="finite"):
        check_figures({"steps": True}, DP_RUN)


@pytest.mark.parametrize("figures", [{"steps": 2.5}, {"steps": -1}, {"sample-rate": 0.0}, {"sample-rate": 1.5},
                                     {"sigma": -0.1}, {"clip": -1.0}, {"rho": 1.0}, {"rho": 0.5},
                                     {"epsilon-round": -0.5}])
def test_impossible_single_figures_are_refused(figures):
    with pytest.raises(Rejected) as err:
        check_figures(figures, DP_RUN)
    assert err.value.kind == "privacy"


def test_rho_is_the_one_figure_a_run_without_dp_may_report():
    kip = RunPrivacy("none", 1e-5, 0.5)
    assert check_figures({"rho": 0.5}, kip) == {"rho": 0.5}
    exp = Expectation(INFO, "dm", ipc=2, round=1, rho=0.5)
    meta = SetMetadata(INFO, "dm", 2, privacy={"rho": 0.5})
    check_privacy(meta, MetricRecord({"rho": 0.5}), exp)
    for forged in ({"epsilon-round": 1.0}, {"epsilon-total": 1e300, "delta": 0.9}, {"sigma": 1.0}, {"delta": 1e-5}):
        with pytest.raises(Rejected, match="without DP") as err:  # an accepted non-DP set is refused
            check_privacy(meta, MetricRecord({"rho": 0.5, **forged}), exp)
        assert err.value.kind == "privacy"
    with pytest.raises(Rejected, match="without DP"):  # so is its metadata claiming a guarantee
        check_privacy(SetMetadata(INFO, "dm", 2, privacy={"rho": 0.5, "epsilon": 1.0}), MetricRecord({}), exp)


def test_an_accepted_dp_set_needs_a_known_accountant():
    with pytest.raises(Rejected, match="accountant"):
        check_privacy(_meta(accountant="trust-me"), _metrics(GOOD), EXP)


def _reply(content: RecordDict) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=102,
                          message_type="train", group_id="1")
    return Message(content, reply_to=instruction)


def test_the_round_records_only_validated_decline_figures_and_counts_forged_ones(task_identity):  # noqa: F811
    """The reported bug: a decline with epsilon 1e300 and delta 0.9 in a run without DP."""
    exp = Expectation(INFO, "dm", ipc=2, round=1)
    result = RoundResult(1, 2)
    forged = RecordDict({"declined": ConfigRecord({"kind": "budget", "reason": "r"}),
                         "metrics": MetricRecord({"declined": 1, "epsilon-total": 1e300, "delta": 0.9})})
    honest = RecordDict({"declined": ConfigRecord({"kind": "policy", "reason": "dp required"}),
                         "metrics": MetricRecord({"declined": 1})})
    assert _validated(_reply(forged), 102, exp, result) is None and _validated(_reply(honest), 103, exp, result) is None
    assert result.rejected == {"declined-budget": 1, "declined-policy": 1} and result.privacy == {}
    record = round_record(result, RunState())
    assert "privacy" not in record and record["rejected-declined-policy"] == 1
    assert len(record["privacy-figures-refused"]) == 1 and "forged privacy figures" in record[
        "privacy-figures-refused"][0] and "node 102" in record["privacy-figures-refused"][0]
    summary = privacy_summary([record], PLAIN_RUN)
    assert summary == {"privacy": {}, "epsilon-max": None, "privacy-figures-refused": 1}
    assert "1e+300" not in json.dumps(summary)


def test_a_dp_round_records_valid_decline_figures(task_identity):  # noqa: F811
    result = RoundResult(1, 1)
    content = RecordDict({"declined": ConfigRecord({"kind": "budget", "reason": "r"}), "metrics": MetricRecord(BUDGET)})
    _validated(_reply(content), 101, EXP, result)
    assert result.privacy == {101: {"epsilon-total": 2.0, "epsilon-planned": 3.5, "delta": 1e-5,
                                    "privacy-budget": 3.0, "status": "declined"}}
    assert result.figures_refused == []
    summary = privacy_summary([round_record(result, RunState())], DP_RUN)
    assert summary["privacy"]["101"]["rounds-declined"] == 1 and summary["epsilon-max"] == 2.0


HONEST_ENTRY = {"epsilon-round": 1.0, "epsilon-total": 1.0, "delta": 1e-5, "sigma": 1.0, "sample-rate": 0.04,
                "steps": 2, "clip": 1.0, "rho": 0.0, "privacy-budget": 0.0, "accountant": "rdp", "status": "accepted"}


@pytest.mark.parametrize("run, entry", [
    (PLAIN_RUN, {"epsilon-total": 1e300, "delta": 0.9, "status": "declined"}),
    (PLAIN_RUN, {"rho": 0.0, "accountant": "rdp", "status": "accepted"}),          # no accountant without DP
    (DP_RUN, {**HONEST_ENTRY, "epsilon-total": float("nan")}),
    (DP_RUN, {**HONEST_ENTRY, "epsilon-total": -5.0}),
    (DP_RUN, {**HONEST_ENTRY, "epsilon-total": True}),
    (DP_RUN, {**HONEST_ENTRY, "delta": 0.9}),
    (DP_RUN, {**HONEST_ENTRY, "delta": 1e-3}),
    (DP_RUN, {"epsilon-total": 5.0, "epsilon-planned": 4.0, "delta": 1e-5, "privacy-budget": 0.0,
              "status": "declined"}),
    (DP_RUN, {**HONEST_ENTRY, "status": "paid"}),
    (DP_RUN, {**HONEST_ENTRY, "accountant": "x" * 10_000}),
    (DP_RUN, {**HONEST_ENTRY, "note": "hello"}),
    (DP_RUN, ["not", "a", "mapping"]),
])
def test_the_summary_is_built_only_from_validated_figures(run, entry):
    """Records read back from a run store (resume) are checked again: a forged entry is left out."""
    honest = {k: v for k, v in HONEST_ENTRY.items() if run.dp != "none" or k in ("rho", "status")}
    records = json.loads(json.dumps([{"round": 1, "privacy": {"101": entry, "102": honest}}]))  # as on disk
    with pytest.raises(Rejected):
        check_recorded(records[0]["privacy"]["101"], run)
    summary = privacy_summary(records, run)
    assert set(summary["privacy"]) == {"102"} and summary["privacy-figures-refused"] == 1
    assert summary["epsilon-max"] == (1.0 if run.dp != "none" else None)
    assert client_privacy(records, run) == summary["privacy"]


def test_dp_run_records_per_client_epsilon_and_budget_declines(tmp_path, task_identity):  # noqa: F811
    """3 clients, dp-dm, iterative; the budget pays for one round, so all decline the second."""
    one_round = privacy_plan(dp_config(DistillTask.from_config(TASK), seed=0)).epsilon
    summary = run(InProcessGrid(client_app, 3), {}, runs_dir=str(tmp_path), mode="iterative",
                  **{"num-server-rounds": 2, "privacy-budget": one_round}, **TINY)
    assert summary["status"] == "ok" and summary["dp"] == "dp-dm"
    first, second = read_metrics(summary["run"])
    assert first["accepted"] == 3 and first["rejected"] == 0
    assert first["accuracy"] == stored_model_accuracy(summary["run"], model_path(1))
    assert all(f["status"] == "accepted" and f["epsilon-total"] == one_round and f["delta"] == 1e-5
               and f["accountant"] == "rdp" for f in first["privacy"].values())
    assert second["accepted"] == 0 and second["rejected-declined-budget"] == 3
    assert all("privacy budget exceeded" in r for r in second["rejection-reasons"])
    assert {f["status"] for f in second["privacy"].values()} == {"declined"}
    on_disk = json.loads((tmp_path / next(p.name for p in tmp_path.iterdir()) / "summary.json").read_text())
    assert on_disk["privacy"] == summary["privacy"] == client_privacy([first, second], DP_RUN)
    assert summary["privacy-figures-refused"] == 0
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


def test_a_forged_decline_in_a_run_without_dp_never_reaches_summary_json(tmp_path, task_identity):  # noqa: F811
    """End to end: the reported bug (epsilon 1e300, delta 0.9 in a non-DP run's summary.json)."""
    def forge(node: int, reply: Message) -> Message:
        if node == 102 and "synthetic" in reply.content:
            for key in list(reply.content):
                del reply.content[key]
            reply.content["declined"] = ConfigRecord({"kind": "budget", "reason": "budget exceeded"})
            reply.content["metrics"] = MetricRecord({"declined": 1, "epsilon-total": 1e300, "delta": 0.9})
        return reply

    plain = {"iterations": 2, "ipc": 2, "net-width": 8, "net-depth": 2, "server-epochs": 2, "server-dsa": False,
             "fraction-evaluate": 0.0}
    summary = run(InProcessGrid(client_app, 3, tamper=forge), {}, runs_dir=str(tmp_path), **plain)
    (record,) = read_metrics(summary["run"])
    assert record["accepted"] == 2 and record["rejected-declined-budget"] == 1 and "privacy" not in record
    assert "node 102: forged privacy figures" in record["privacy-figures-refused"][0]
    on_disk = (tmp_path / next(p.name for p in tmp_path.iterdir()) / "summary.json").read_text()
    assert json.loads(on_disk)["privacy"] == {} and json.loads(on_disk)["epsilon-max"] is None
    assert json.loads(on_disk)["privacy-figures-refused"] == 1 and "1e+300" not in on_disk


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
