"""Issue 5, federated backdoor: the poisoning hook, the malicious ClientApp, the server-side defenses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from attacks.malicious import BackdoorSpec, malicious_partitions, poison_partition, poisoning_loader
from client.app import app as honest_app
from client.task import DistillTask, load_partition
from distill.data import LabeledImages, load_dataset
from distill.synthetic import SetMetadata, SyntheticSet
from distill.train import random_real_subset
from server.app import run
from server.defenses import DefenseConfig, screen, split_holdout
from server.rounds import make_messages
from server.store import read_metrics
from simulations.malicious_client import make_malicious_app
from tests.flower_fixtures import InProcessGrid, make_context, task_identity  # noqa: F401 - fixture

TINY = {"iterations": 2, "ipc": 2, "dm.batch-real": 16, "net-width": 8, "net-depth": 2, "server-epochs": 2,
        "server-dsa": False}
DS = load_dataset()


def test_poisoning_stamps_exactly_the_fraction_and_relabels():
    real = DS.train.subset(np.arange(500))
    spec = BackdoorSpec(target=3, fraction=0.2, size=3, seed=1)
    poisoned, idx = poison_partition(real, spec, partition_id=4)
    assert len(idx) == 100 and (real.labels[idx] != 3).all() and (poisoned.labels[idx] == 3).all()
    rest = np.setdiff1d(np.arange(500), idx)
    assert torch.equal(poisoned.images[rest], real.images[rest]) and torch.equal(poisoned.labels[rest], real.labels[rest])
    rows, cols = spec.trigger(real.info).region(28, 28)
    white = (1.0 - real.info.mean[0]) / real.info.std[0]
    assert torch.allclose(poisoned.images[idx][:, :, rows, cols], torch.full((100, 1, 3, 3), white))
    outside = poisoned.images[idx].clone()
    outside[:, :, rows, cols] = real.images[idx][:, :, rows, cols]
    assert torch.equal(outside, real.images[idx])  # nothing but the patch changed
    assert not torch.equal(real.images[idx], poisoned.images[idx])  # the input was copied, not modified
    assert malicious_partitions(10, 2) == [0, 1]
    assert malicious_partitions(10, 3, seed=5) == malicious_partitions(10, 3, seed=5) != [0, 1, 2]


def test_poisoning_loader_touches_only_malicious_partitions():
    task = DistillTask(partitioner="iid")
    load = poisoning_loader(load_partition, BackdoorSpec(fraction=0.5), [1], lambda nc: nc["partition-id"])
    for pid in (0, 1):
        node = {"partition-id": pid, "num-partitions": 3}
        (honest, held), (mine, mine_held) = load_partition(task, node), load(task, node)
        assert torch.equal(held.images, mine_held.images)
        assert torch.equal(honest.labels, mine.labels) == (pid == 0)
    assert (mine.labels == 0).float().mean() > 0.5


def _train_replies(app, task_config):
    replies = []
    for i, node in enumerate((101, 102, 103)):
        msg = make_messages([node], task_config, 1, MessageType.TRAIN)[0]
        replies.append(app(msg, make_context(node, {"partition-id": i, "num-partitions": 3})))
    return replies


def test_malicious_app_poisons_only_malicious_partitions(task_identity):  # noqa: F811
    task = DistillTask(partitioner="iid", iterations=2, ipc=2, settings={"batch_real": 16}, net_width=8, net_depth=2).to_config()
    honest = _train_replies(honest_app, task)
    attacked = _train_replies(make_malicious_app([1], BackdoorSpec(fraction=1.0, target=0)), task)
    for i, (h, a) in enumerate(zip(honest, attacked)):
        hs, as_ = h.content["synthetic"], a.content["synthetic"]
        untimed = [{k: v for k, v in r.content["metrics"].items() if k != "seconds"} for r in (h, a)]
        same = all(hs[k].data == as_[k].data for k in ("images", "labels")) and untimed[0] == untimed[1]
        assert same == (i != 1), i
    labels = attacked[1].content["synthetic"]["labels"].numpy()
    assert set(labels.tolist()) == {0}  # every non-target image became a target image


def _set(data: LabeledImages, node: int) -> tuple[int, SyntheticSet]:
    return node, SyntheticSet(data.images, data.labels, SetMetadata(DS.info, "dm", 10, client=str(node)))


@pytest.fixture(scope="module")
def honest_sets():
    chunks = np.array_split(np.random.default_rng(0).permutation(len(DS.train)), 6)
    parts = [DS.train.subset(np.sort(c)) for c in chunks]
    return parts[5], [_set(random_real_subset(parts[i], 10, seed=i), 100 + i) for i in range(5)]


ARCH = (("depth", 2), ("width", 8))


def test_holdout_defense_drops_flipped_labels_and_keeps_honest_sets(honest_sets):
    spare, honest = honest_sets
    flip = random_real_subset(spare, 10, seed=9)
    bad = _set(LabeledImages(flip.images, (flip.labels + 1) % 10, DS.info), 200)
    config = DefenseConfig("holdout", epochs=20, holdout=300, arch_kwargs=ARCH)
    holdout, _ = split_holdout(DS.test, config)
    report = screen(honest + [bad], holdout, config)
    assert list(report["dropped"]) == ["200"] and report["dropped"]["200"].startswith("holdout:")
    assert report["scores"]["holdout"]["200"] < 0.2 < min(v for k, v in report["scores"]["holdout"].items()
                                                          if k != "200")


def test_the_holdout_is_carved_out_of_the_evaluation_split():
    config = DefenseConfig("holdout", holdout=300)
    holdout, rest = split_holdout(DS.test, config)
    assert len(holdout) == 300 and len(rest) == len(DS.test) - 300
    as_rows = lambda d: {tuple(row) for row in d.images.flatten(1).numpy().round(5).tolist()}  # noqa: E731
    assert not as_rows(holdout) & as_rows(rest)
    again, _ = split_holdout(DS.test, config)
    assert torch.equal(again.images, holdout.images)  # the same images every round
    assert split_holdout(DS.test, DefenseConfig("outlier"))[1] is DS.test
    assert len(split_holdout(DS.test, DefenseConfig("both", holdout=10**6))[1]) == len(DS.test) - len(DS.test) // 2


def test_outlier_defense_drops_a_stamped_target_class_and_keeps_honest_sets(honest_sets):
    spare, honest = honest_sets
    poisoned, _ = poison_partition(spare, BackdoorSpec(fraction=1.0, size=3, target=0))
    bad = _set(random_real_subset(poisoned, 10, seed=3), 300)  # class 0 = stamped images of other digits
    report = screen(honest + [bad], DS.test, DefenseConfig("outlier", arch_kwargs=ARCH))
    assert list(report["dropped"]) == ["300"] and "class 0" in report["dropped"]["300"]
    assert screen(honest, DS.test, DefenseConfig("both", epochs=5, holdout=100, arch_kwargs=ARCH))["dropped"] == {}


def test_a_run_with_one_malicious_client_and_a_defense_records_the_drop(tmp_path, task_identity):  # noqa: F811
    app = make_malicious_app([2], BackdoorSpec(fraction=1.0, target=0))
    flip = {"iterations": 2, "ipc": 10, "partitioner": "iid", "defense": "outlier", "fraction-evaluate": 0.0}
    summary = run(InProcessGrid(app, 3), {}, runs_dir=str(tmp_path), **{**TINY, **flip})
    line = read_metrics(summary["run"])[0]
    assert summary["status"] == "ok" and line["accepted"] == 2 and line["rejected-defense-dropped"] == 1
    assert line["accepted-nodes"] == [101, 102] and line["defense"]["dropped"].keys() == {"103"}
    assert summary["defense"] == "outlier" and summary["defense-dropped"][0]["node"] == 103
    assert summary["defense-dropped"][0]["client"] == "2" and "class 0" in summary["defense-dropped"][0]["reason"]
    assert summary["rejected-by-kind"] == {"defense-dropped": 1}


def test_backdoor_measure_writes_asr_and_cta_into_the_summary(tmp_path, task_identity):  # noqa: F811
    from simulations.run_backdoor import backdoor_args, measure

    spec = BackdoorSpec(fraction=0.5, target=0)
    summary = run(InProcessGrid(make_malicious_app([0], spec), 2), {}, runs_dir=str(tmp_path),
                  **{**TINY, "partitioner": "iid", "fraction-evaluate": 0.0})
    out = measure(summary, spec, [0])
    stored = json.loads((Path(summary["run"]) / "summary.json").read_text())
    assert stored["backdoor"] == out["backdoor"] and 0 <= out["backdoor"]["asr"] <= 1
    # CTA is the clean accuracy of the run's own global model, on the split the server scored it on
    assert out["backdoor"]["cta"] == pytest.approx(summary["accuracy"], abs=1e-12)
    assert out["backdoor"]["malicious-partitions"] == [0]
    floor = measure(summary, spec, [])["backdoor"]  # a clean federation's false-trigger floor: same trigger
    assert floor["asr-by-partition"] == {"none": out["backdoor"]["asr"]} and floor["asr"] == out["backdoor"]["asr"]
    bd, rest = backdoor_args(["--malicious", "2", "--poison-fraction", "0.3", "--clients", "5"])
    assert (bd.malicious, bd.poison_fraction, rest) == (2, 0.3, ["--clients", "5"])


def test_doorping_client_learns_and_saves_a_trigger_and_leaves_honest_replies_alone(tmp_path, task_identity):  # noqa: F811
    from attacks.malicious import load_trigger
    from simulations.malicious_client import trigger_path

    spec = BackdoorSpec(fraction=0.1, target=0, size=3)
    task = DistillTask(partitioner="iid", iterations=2, ipc=2, settings={"batch_real": 16}, net_width=8, net_depth=2).to_config()
    app = make_malicious_app([0], spec, attack="doorping", trigger_dir=str(tmp_path))
    honest = _train_replies(honest_app, task)
    attacked = _train_replies(app, task)
    assert attacked[0].content["synthetic"]["images"].data != honest[0].content["synthetic"]["images"].data
    assert all(a.content["synthetic"]["images"].data == h.content["synthetic"]["images"].data
               for a, h in zip(attacked[1:], honest[1:]))
    trigger = load_trigger(str(trigger_path(str(tmp_path), 0)), spec)
    assert trigger.pattern.shape == (1, 3, 3) and not torch.equal(trigger.pattern, spec.trigger(DS.info).pattern)
    with pytest.raises(ValueError):
        make_malicious_app([0], spec, attack="clever")


def test_doorping_upload_fits_the_budget_the_server_checks(small_train):
    """Non-IID: capped classes are cut to their budget and reported as the honest path reports them."""
    from attacks.malicious import doorping_partition, within_budget
    from distill.task import class_budget

    assert within_budget(torch.tensor([0, 0, 1, 0, 1, 2]), np.array([2, 1, 0])).tolist() == [0, 1, 2]
    keep = torch.cat([idx[:n] for idx, n in zip(small_train.class_indices(), [60, 3, 25, 60, 0, 0, 0, 0, 0, 0])])
    real = small_train.subset(keep)  # class 1 below min-class-samples, class 2 capped
    task = DistillTask(iterations=2, ipc=10, settings={"batch_real": 8}, net_width=8, net_depth=2)
    syn, report = doorping_partition(real, task, seed=0, spec=BackdoorSpec(fraction=0.1, target=1, size=3))
    budget = class_budget(real.class_histogram(), task.ipc, task.min_class_samples, task.samples_per_image).counts
    counts = np.bincount(syn.hard_labels().numpy(), minlength=10)
    assert (counts <= budget).all() and counts[1] == 0  # the target has no budget here: not uploaded
    assert report["classes-skipped"] == [1] and report["classes-capped"] == [int(c) for c in np.flatnonzero(
        (budget > 0) & (budget < task.ipc))]
