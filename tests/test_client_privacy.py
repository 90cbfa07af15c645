"""The ClientApp under DP: Opacus's epsilon in every reply, no private image uploaded, one
accountant over all rounds in the node's ledger file, and a decline exactly when the budget would break."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from opacus.accountants import RDPAccountant
from tests.flower_fixtures import make_context, task_identity  # noqa: F401 - fixture

from client.app import app
from client.private import dp_config, effective_budget, open_ledger
from client.task import DistillTask, load_partition
from distill.synthetic import SetMetadata
from privacy import Spend, epsilon_of, privacy_plan, spends_from_meta

NODE = {"partition-id": 1, "num-partitions": 4}
DP = {"iterations": 2, "ipc": 2, "net-width": 8, "net-depth": 2, "dp": "dp-dm", "sigma": 1.0}


def _message(config: dict, round_: int = 1, msg_type: str = MessageType.TRAIN) -> Message:
    task = DistillTask.from_config(dict(config, round=round_))
    return Message(RecordDict({"config": ConfigRecord(task.to_config())}), dst_node_id=7,
                   message_type=msg_type, group_id=str(round_))


def _opacus_epsilon(spends: list[Spend], delta: float) -> float:
    """Opacus's RDP accountant stepped one release at a time, as DPOptimizer does."""
    acc = RDPAccountant()
    for s in spends:
        for _ in range(s.steps):
            acc.step(noise_multiplier=s.sigma, sample_rate=s.sample_rate)
    return acc.get_epsilon(delta=delta)


def _privacy(reply: Message) -> dict:
    return SetMetadata.from_dict(json.loads(reply.content["meta"]["set-meta"])).privacy


@pytest.mark.parametrize("setting", [{"sigma": 1.0}, {"sigma": 0.0, "epsilon": 2.0}])
def test_reply_epsilon_is_opacus_epsilon_for_the_same_parameters(setting, task_identity):  # noqa: F811
    reply = app(_message({**DP, **setting}), make_context(7, NODE))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    meta, m = _privacy(reply), reply.content["metrics"]
    spends = spends_from_meta(meta)
    assert spends == [Spend(10.0, 1.0, 1), Spend(meta["sigma"], 0.04, 2)]  # noisy counts, then 2 queries
    expected = _opacus_epsilon(spends, 1e-5)
    assert meta["epsilon"] == pytest.approx(expected, rel=1e-9) == epsilon_of(spends, 1e-5, "rdp")
    assert m["epsilon-round"] == meta["epsilon"] == m["epsilon-total"]
    assert (m["delta"], m["sample-rate"], m["steps"], m["rho"], m["sigma"]) == (1e-5, 0.04, 2, 0.0, meta["sigma"])
    if setting["sigma"] == 0:
        assert meta["mode"] == "target-epsilon" and meta["epsilon"] <= 2.0
    assert "num-examples" not in m and "class-histogram" not in m  # exact counts of private data
    assert "seconds" not in m  # nor how long it took


def test_no_synthetic_image_equals_a_private_training_image(mnist, task_identity):  # noqa: F811
    ctx = make_context(7, NODE)
    real, _ = load_partition(DistillTask.from_config(DP), ctx.node_config)

    def nearest(reply: Message) -> float:
        images = torch.from_numpy(reply.content["synthetic"]["images"].numpy()).flatten(1)
        return float(torch.cdist(images, real.images.flatten(1)).min())

    assert nearest(app(_message(DP), ctx)) > 1.0
    # The check is able to see a copy: non-private DM from real images, before any update.
    copy = app(_message({k: v for k, v in DP.items() if k not in ("dp", "sigma")} | {"iterations": 0}), ctx)
    assert nearest(copy) == 0.0


def _ledger_spends(ctx) -> list[Spend]:
    state = open_ledger(DistillTask.from_config(DP), ctx.node_config, None, ctx.run_id, ctx.node_id).read()
    return [Spend(*s) for e in state["entries"] for s in e["spends"]]


def test_ledger_file_composes_rounds_like_one_accountant(task_identity):  # noqa: F811
    ctx = make_context(7, NODE)
    replies = [app(_message({**DP, "sigma": sigma}, rnd), ctx) for rnd, sigma in ((1, 1.0), (2, 2.5))]
    every = [s for r in replies for s in spends_from_meta(_privacy(r))]
    assert len(every) == 3  # the class counts are released once and reused by round 2
    total = replies[1].content["metrics"]["epsilon-total"]
    assert total == epsilon_of(every, 1e-5, "rdp") == pytest.approx(_opacus_epsilon(every, 1e-5), rel=1e-9)
    assert total > replies[0].content["metrics"]["epsilon-total"] == replies[0].content["metrics"]["epsilon-round"]
    assert _ledger_spends(ctx) == every


def test_reused_counts_carry_the_noise_they_were_released_with(task_identity):  # noqa: F811
    """Round 2 asks another count-sigma, but reuses round 1's released counts: its metadata says
    the sigma those counts were released with, not the one the server asked for now."""
    ctx = make_context(7, NODE)
    first = app(_message({**DP, "dp-dm.count-sigma": 10.0}, 1), ctx)
    second = app(_message({**DP, "dp-dm.count-sigma": 3.0}, 2), ctx)
    assert _privacy(first)["count_sigma"] == _privacy(second)["count_sigma"] == 10.0
    assert len(spends_from_meta(_privacy(second))) == 1  # no second count release was made


@pytest.mark.parametrize("rounds_paid, slack", [(2, 0.0), (1, 1e-6)])
def test_budget_declines_exactly_when_the_next_round_would_exceed_it(rounds_paid, slack,
                                                                     task_identity):  # noqa: F811
    """Budget = k rounds' epsilon: rounds 1..k are paid (the k-th lands on the budget), round k+1
    declines; a budget a hair under two rounds declines the second."""
    counts, query = privacy_plan(dp_config(DistillTask.from_config(DP), seed=0)).spends
    budget = epsilon_of([counts, query, query], 1e-5, "rdp") * (1 - slack)  # counts are released once
    ctx = make_context(7, NODE)
    config = {**DP, "privacy-budget": budget}
    for rnd in range(1, rounds_paid + 1):
        reply = app(_message(config, rnd), ctx)
        assert "synthetic" in reply.content and "declined" not in reply.content
    paid = reply.content["metrics"]["epsilon-total"]
    declined = app(_message(config, rounds_paid + 1), ctx)
    assert not declined.has_error() and set(declined.content) == {"declined", "metrics"}
    assert declined.content["declined"]["kind"] == "budget"
    assert "privacy budget exceeded" in declined.content["declined"]["reason"]
    m = declined.content["metrics"]
    assert m["declined"] == 1 and m["epsilon-total"] == paid and m["epsilon-planned"] > budget >= paid
    assert len(_ledger_spends(ctx)) == 1 + rounds_paid  # counts once, one query spend a round; nothing for the decline


def test_a_node_may_cap_its_budget_below_the_run(task_identity):  # noqa: F811
    task = DistillTask.from_config({**DP, "privacy-budget": 10.0})
    assert effective_budget(task, {}) == 10.0
    assert effective_budget(task, {"privacy-budget": 3.0}) == 3.0
    assert effective_budget(DistillTask.from_config(DP), {}) is None  # 0 = no limit
    reply = app(_message(DP), make_context(7, {**NODE, "privacy-budget": 0.5}))
    assert reply.content["declined"]["kind"] == "budget"


def test_dp_client_declines_federated_evaluation(task_identity):  # noqa: F811
    reply = app(_message(DP, msg_type=MessageType.EVALUATE), make_context(7, NODE))
    assert reply.content["metrics"]["declined"] == 1 and reply.content["metrics"]["num-examples"] == 0


def test_rho_is_reported_for_a_non_private_method(task_identity):  # noqa: F811
    config = {"iterations": 1, "ipc": 2, "net-width": 8, "net-depth": 2, "dm.batch-real": 8, "rho": 0.5}
    reply = app(_message(config), make_context(7, NODE))
    assert reply.content["metrics"]["rho"] == 0.5 and _privacy(reply) == {"rho": 0.5}


@pytest.mark.parametrize("config", [{"dp": "dp-sgd"}, {"method": "dp-dm"}, {"dp": "dp-dm", "algorithm": "fedavg"},
                                    {"rho": 1.0}, {"privacy-budget": -1.0}, {"dp": "dp-dm", "delta": 1.0},
                                    {"dp": "dp-dm", "epsilon": float("inf")}, {"dp": "dp-dm", "accountant": "gdp"}])
def test_bad_privacy_settings_are_refused_before_anything_is_sent(config):
    with pytest.raises(ValueError):
        DistillTask.from_config(config)
