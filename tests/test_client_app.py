"""The ClientApp on hand-built Messages: a well-formed synthetic set, capped/skipped classes, FedAvg, evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from tests.flower_fixtures import make_context, task_identity  # noqa: F401 - fixture

from client.app import app
from client.local import build_network
from client.task import DistillTask, load_partition
from distill.partition import client_seed
from distill.task import class_budget
from distill.synthetic import SetMetadata, SyntheticSet
from distill.train import accuracy_and_loss

TINY = {"iterations": 2, "ipc": 3, "dm.batch-real": 16, "net-width": 8}


def _message(config: dict, msg_type: str = MessageType.TRAIN, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord(DistillTask.from_config(config).to_config())})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, dst_node_id=7, message_type=msg_type, group_id="1")


def test_train_reply_is_a_well_formed_synthetic_set(task_identity):  # noqa: F811
    ctx = make_context(7, {"partition-id": 1, "num-partitions": 4})
    reply = app(_message(TINY), ctx)
    assert not reply.has_error()
    arrays = {k: a.numpy() for k, a in reply.content["synthetic"].items()}
    assert set(arrays) == {"images", "labels"}
    assert arrays["images"].dtype == np.float32 and arrays["images"].shape[1:] == (1, 28, 28)
    assert arrays["labels"].dtype == np.int64 and len(arrays["labels"]) == len(arrays["images"])
    assert np.bincount(arrays["labels"], minlength=10).max() <= TINY["ipc"]
    meta = SetMetadata.from_dict(json.loads(reply.content["meta"]["set-meta"]))
    assert (meta.method, meta.ipc, meta.client, meta.round) == ("dm", 3, "1", 1)
    m = reply.content["metrics"]
    assert m["bytes-uploaded"] == sum(a.nbytes for a in arrays.values())
    assert len(m["class-histogram"]) == 10 and m["num-examples"] == sum(m["class-histogram"])
    assert m["seconds"] > 0 and m["classes-capped"] >= 0 and m["classes-skipped"] >= 0


def test_class_budget_caps_and_skips_barely_held_classes():
    hist = np.array([100, 12, 5, 0, 3])
    assert class_budget(hist, ipc=10, min_class_samples=4, samples_per_image=2).counts.tolist() == [10, 6, 2, 0, 0]


def test_skipped_classes_are_reported(task_identity):  # noqa: F811
    # Dirichlet(0.1): a client holds a few classes well and several barely; absent ones are not "skipped"
    ctx = make_context(7, {"partition-id": 0, "num-partitions": 10})
    config = dict(TINY, partitioner="dirichlet", alpha=0.1, **{"min-class-samples": 40})
    task = DistillTask.from_config(config)
    real, _ = load_partition(task, ctx.node_config)
    hist = real.class_histogram()
    reply = app(_message(config), ctx)
    m = reply.content["metrics"]
    assert m["classes-skipped"] == int(((hist > 0) & (hist < 40)).sum())
    labels = reply.content["synthetic"]["labels"].numpy()
    assert set(labels.tolist()) == set(np.flatnonzero(hist >= 40).tolist())


def test_client_seed_depends_on_run_seed_partition_and_round():
    seeds = {client_seed(s, p, r) for s in (0, 1) for p in (0, 1) for r in (1, 2)}
    assert len(seeds) == 8 and client_seed(0, 1, 1) == client_seed(0, 1, 1)


def test_local_data_path_replaces_the_partition(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "site.npz"
    np.savez(path, x_train=rng.integers(0, 255, (40, 28, 28), dtype=np.uint8), y_train=np.arange(40) % 10,
             x_test=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8), y_test=np.arange(10))
    train, held = load_partition(DistillTask(), {"data-path": str(path)})
    assert (len(train), len(held)) == (40, 10)


def test_fedavg_train_and_evaluate_round_trip_the_model(task_identity):  # noqa: F811
    ctx = make_context(7, {"partition-id": 2, "num-partitions": 8})
    task = DistillTask.from_config(dict(TINY, algorithm="fedavg"))
    net = build_network(task, load_partition(task, ctx.node_config)[0].info)
    reply = app(_message(dict(TINY, algorithm="fedavg"), arrays=ArrayRecord(net.state_dict())), ctx)
    state = reply.content["arrays"].to_torch_state_dict()
    assert state.keys() == net.state_dict().keys()
    assert reply.content["metrics"]["num-examples"] > 0
    ev = app(_message(TINY, MessageType.EVALUATE, arrays=ArrayRecord(state)), ctx)
    _, held = load_partition(task, ctx.node_config)
    net.load_state_dict(state)  # the node scores the model it was sent, on its held-out data
    assert ev.content["metrics"]["num-examples"] == len(held) > 0
    assert ev.content["metrics"]["accuracy"] == accuracy_and_loss(net, held)[0]


def test_unknown_task_key_is_refused():
    with pytest.raises(ValueError, match="bogus"):
        DistillTask.from_config({"bogus": 1})


def test_keep_bases_cuts_each_class_to_its_budget_and_keeps_the_networks():
    import torch

    from client.task import keep_bases
    from distill.data import load_dataset
    from distill.parameterize import make_parameterization

    info = load_dataset().info
    plan = make_parameterization(torch.randn(5, 1, 28, 28), 0.0, torch.Generator().manual_seed(0), "haba",
                                 {"hallucinators": 2})
    labels = torch.tensor([0, 0, 0, 1, 1]).repeat_interleave(2)  # 3 bases of class 0, 2 of class 1
    meta = SetMetadata(info, "dm", 3)
    syn = SyntheticSet.from_factors(plan.factors(), labels, meta)
    budget = np.array([1, 2] + [0] * 8)
    cut = keep_bases(syn, budget, meta)
    assert cut.factors.num_bases == 3 and cut.labels.tolist() == [0, 0, 1, 1, 1, 1]
    assert torch.equal(cut.factors.arrays["enc_w"], syn.factors.arrays["enc_w"])
    assert torch.equal(cut.images, torch.cat([syn.images[:2], syn.images[6:]]))


def test_param_run_config_keys_are_checked():
    assert DistillTask.from_config({"param": "idc", "param-kwargs": '{"factor": 2}'}).param_options == {"factor": 2}
    assert DistillTask(param_kwargs={"factor": 3}, param="idc").param_kwargs == '{"factor": 3}'
    for bad in ({"param": "jpeg"}, {"param": "idc", "param-kwargs": "[2]"}, {"param": "idc", "param-kwargs": "{x"},
                {"param": "idc", "param-kwargs": '{"hallucinators": 2}'}, {"param": "haba", "rho": 0.5},
                {"param": "idc", "dp": "dp-dm"}):
        with pytest.raises(ValueError):
            DistillTask.from_config(bad)
