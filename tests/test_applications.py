"""Applications of distilled sets (issue 8): cross-architecture evaluation, NAS proxy, continual learning.

Everything runs on tiny networks, sets and test subsets: the file takes seconds; the
figures themselves come from ``simulations/bench_applications.py``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats

from distill import continual
from distill.continual import ContinualConfig, Memory, class_steps, herd, run_continual
from distill.crossarch import DEFAULT_ARCHS, cross_arch_evaluate
from distill.nas import GROUND_TRUTH, Candidate, convnet_grid, nas_proxy, rankdata, spearman
from distill.train import TrainConfig, evaluate, random_real_subset

TINY = TrainConfig(epochs=2, dsa=False)
TINY_CONVNET = {"width": 8, "depth": 1}


@pytest.fixture(scope="module")
def tiny_test(mnist):
    """100 test images, 10 per class: enough to tell networks apart, cheap for a ResNet-18."""
    return mnist.test.subset(torch.cat([i[:10] for i in mnist.test.class_indices()]))


# -- spearman ------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("levels", [3, 1000])  # 3 levels: many ties; 1000: almost none
def test_spearman_matches_scipy(seed, levels):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, levels, 30).astype(float), rng.integers(0, levels, 30).astype(float)
    y = y + 0.5 * x  # some correlation, so the value is not near 0 by construction
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    np.testing.assert_allclose(rankdata(x), stats.rankdata(x))


def test_spearman_edge_cases():
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([0.1, 0.5, 0.2], [1, 9, 4]) == pytest.approx(1.0)  # monotone, not linear
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant: undefined, as scipy says
    assert math.isnan(spearman([1, float("nan"), 3], [1, 2, 3]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        spearman([1], [1])


# -- cross-architecture --------------------------------------------------------------------

def test_cross_arch_gives_one_finite_accuracy_per_arch(small_train, tiny_test):
    few = random_real_subset(small_train, 2, seed=0)
    kwargs = {"convnet": TINY_CONVNET, "mlp": {"width": 16}}
    report = cross_arch_evaluate(few.images, few.labels, tiny_test, TINY, seeds=(0,), arch_kwargs=kwargs,
                                 epochs={"resnet18": 1, "alexnet": 1})
    assert report.archs == DEFAULT_ARCHS
    for row in report.rows():
        assert len(row["accuracies"]) == 1 and 0.0 <= row["accuracies"][0] <= 1.0
        assert math.isfinite(row["mean"]) and row["std"] == 0.0
    assert report["resnet18"].epochs == 1 and report["lenet"].epochs == TINY.epochs
    assert "| accuracy % |" in report.markdown()


def test_cross_arch_is_the_project_evaluator_over_seeds(small_train, tiny_test):
    few = random_real_subset(small_train, 2, seed=0)
    report = cross_arch_evaluate(few.images, few.labels, tiny_test, TINY, archs=("convnet", "lenet"),
                                 seeds=(0, 1), arch_kwargs={"convnet": TINY_CONVNET})
    assert [len(report[a].accuracies) for a in report.archs] == [2, 2]
    # the same numbers as distill.train.evaluate: options reach only their own network
    direct = evaluate(few.images, few.labels, tiny_test, replace(TINY, arch_kwargs=TINY_CONVNET), seeds=(0, 1))
    assert report["convnet"].accuracies == direct.accuracies
    assert report["convnet"].mean == pytest.approx(np.mean(direct.accuracies))
    again = cross_arch_evaluate(few.images, few.labels, tiny_test, TINY, archs=("lenet",), seeds=(0, 1))
    assert again["lenet"].accuracies == report["lenet"].accuracies  # same seeds, same result


def test_cross_arch_refuses_unknown_or_unused_names(small_train, tiny_test):
    x, y = small_train.images[:4], small_train.labels[:4]
    with pytest.raises(ValueError, match="vgg"):
        cross_arch_evaluate(x, y, tiny_test, TINY, archs=("vgg",))
    with pytest.raises(ValueError, match="convnet"):  # options for a network not evaluated
        cross_arch_evaluate(x, y, tiny_test, TINY, archs=("mlp",), arch_kwargs={"convnet": {"width": 8}})


# -- NAS proxy -----------------------------------------------------------------------------

def test_convnet_grid_is_the_product_of_its_options():
    grid = convnet_grid(depths=(1, 2), widths=(8, 16), norms=("instancenorm", "none"),
                        activations=("relu",), poolings=("avgpool", "maxpool"))
    assert len(grid) == 2 * 2 * 2 * 1 * 2 and len({c.name for c in grid}) == len(grid)
    assert len(convnet_grid()) == 36
    with pytest.raises(ValueError, match="swish"):
        Candidate(activation="swish")


def test_nas_proxy_ranks_and_correlates(small_train, tiny_test):
    grid = convnet_grid(depths=(1, 2), widths=(8,), norms=("instancenorm", "none"),
                        activations=("relu", "sigmoid"), poolings=("avgpool",))
    pool = random_real_subset(small_train, 10, seed=0)
    rand = random_real_subset(small_train, 2, seed=1)
    cfg = TrainConfig(epochs=3, dsa=False, batch_size=100)  # 3 SGD steps: a few ops, fast
    # a proxy that is the pool itself, trained the same way, must rank exactly as the ground truth
    proxies = {"random": (rand.images, rand.labels), "itself": (pool.images, pool.labels)}
    report = nas_proxy(proxies, pool, tiny_test, grid, proxy_config=cfg, pool_config=cfg)
    assert report.proxies == ("random", "itself")
    assert all(len(acc) == len(grid) for acc in report.accuracies.values())
    assert report.accuracies["itself"] == report.accuracies[GROUND_TRUTH]
    assert report.correlation("itself") == pytest.approx(1.0)
    assert report.correlation("random") == pytest.approx(
        stats.spearmanr(report.accuracies["random"], report.accuracies[GROUND_TRUTH]).statistic)
    truth = report.accuracies[GROUND_TRUTH]
    assert report.selected("itself") == (report.ranking(GROUND_TRUTH)[0], max(truth))
    ranked = report.ranking("random")
    acc_by_name = dict(zip([c.name for c in grid], report.accuracies["random"]))
    assert [acc_by_name[n] for n in ranked] == sorted(acc_by_name.values(), reverse=True)
    # sigmoid nets at 3 epochs barely move: the ground truth must tell the grid apart
    assert len(set(truth)) > 1
    summary = report.summary()
    assert set(summary) == {"random", "itself"} and summary["itself"]["selected_true_acc"] == max(truth)
    with pytest.raises(ValueError, match="full"):
        nas_proxy({GROUND_TRUTH: proxies["random"]}, pool, tiny_test, grid, cfg, cfg)


# -- continual learning --------------------------------------------------------------------

CL_TRAIN = TrainConfig(epochs=1, dsa=False, arch_kwargs=TINY_CONVNET)


def test_class_steps_split_mnist_into_five_pairs():
    assert class_steps(10, 2) == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert class_steps(5, 2, (4, 3, 2, 1, 0)) == [(4, 3), (2, 1), (0,)]
    with pytest.raises(ValueError):
        class_steps(4, 2, (0, 1, 1, 2))


def _record_training(monkeypatch) -> list[set[int]]:
    """Spy on every model the protocol trains: which classes its training labels hold."""
    trained: list[set[int]] = []
    real_train = continual.train_network

    def spy(net, images, labels, config, seed=0, progress=False):
        trained.append(set(labels.tolist()))
        return real_train(net, images, labels, config, seed=seed, progress=progress)

    monkeypatch.setattr(continual, "train_network", spy)
    return trained


def test_continual_never_sees_a_step_before_its_turn(small_train, tiny_test, monkeypatch):
    """Recorded: each selector call receives exactly its step's classes, in order; each model
    trains on the memory of the classes seen so far and is tested on those classes only; the
    memory holds k per seen class."""
    order = (3, 7, 0, 9, 1, 2, 8, 4, 6, 5)
    offered: list[set[int]] = []

    def recording_selector(data, k, seed):
        offered.append(set(data.labels.tolist()))
        return continual.random_memory(data, k, seed)

    trained = _record_training(monkeypatch)
    tested: list[set[int]] = []
    real_accuracy = continual.accuracy

    def spy_accuracy(net, data, *args, **kw):
        tested.append(set(data.labels.tolist()))
        return real_accuracy(net, data, *args, **kw)

    monkeypatch.setattr(continual, "accuracy", spy_accuracy)
    config = ContinualConfig(k=3, buffer="random", train=CL_TRAIN, class_order=order)
    result = run_continual(small_train, tiny_test, config, select=recording_selector)
    steps = [set(order[i:i + 2]) for i in range(0, 10, 2)]
    assert offered == steps
    seen: set[int] = set()
    for t, step in enumerate(result.steps):
        seen |= steps[t]
        assert trained[t] == seen and tested[t] == seen
        assert set(step.seen) == seen and step.memory == {c: 3 for c in sorted(seen)}
        assert 0.0 <= step.accuracy <= 1.0
    assert len(result.accuracies) == 5 and result.final == result.accuracies[-1]
    assert result.average == pytest.approx(np.mean(result.accuracies))


def test_continual_default_distills_each_step_from_its_own_data(small_train, tiny_test, monkeypatch):
    calls: list[tuple[set[int], int, int]] = []
    real_distill = continual.distill

    def recording_distill(data, config, **kw):
        calls.append((set(data.labels.tolist()), config.ipc, config.seed))
        return real_distill(data, config, **kw)

    monkeypatch.setattr(continual, "distill", recording_distill)
    trained = _record_training(monkeypatch)
    settings = {"iterations": 1, "batch_real": 8, "arch_kwargs": TINY_CONVNET}
    config = ContinualConfig(k=2, method="dm", method_settings=settings, train=CL_TRAIN, seed=1)
    result = run_continual(small_train, tiny_test, config)
    assert [c[0] for c in calls] == [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}]
    assert all(ipc == 2 for _, ipc, _ in calls) and len({s for _, _, s in calls}) == 5
    assert trained[-1] == set(range(10)) and result.steps[-1].memory == {c: 2 for c in range(10)}
    again = run_continual(small_train, tiny_test, config)
    assert again.accuracies == result.accuracies  # same config, same result


def test_memory_refuses_a_peeking_or_oversized_selection(small_train):
    x, y = small_train.images[:6], torch.tensor([0, 0, 1, 1, 2, 2])
    mem = Memory(k=2)
    with pytest.raises(ValueError, match="labels"):
        mem.add(x, y, step_classes=(0, 1))  # class 2 belongs to a later step
    mem.add(x[:4], y[:4], step_classes=(0, 1))
    with pytest.raises(ValueError, match="labels"):
        mem.add(x[:2], y[:2], step_classes=(0, 3))  # class 0 again: a step may not overwrite another
    with pytest.raises(ValueError, match="at most 2"):
        Memory(k=2).add(x[:3], torch.tensor([4, 4, 4]), step_classes=(4,))
    assert mem.counts() == {0: 2, 1: 2}


def test_herding_tracks_the_mean():
    feats = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.1, 0.0]])
    picked = herd(feats, 3)
    assert picked[0] == 4  # the row nearest the mean comes first
    assert len(set(picked.tolist())) == 3
    assert herd(feats, 5).sort().values.tolist() == [0, 1, 2, 3, 4]


def test_continual_herding_and_config_validation(small_train, tiny_test):
    result = run_continual(small_train, tiny_test, ContinualConfig(k=2, buffer="herding", train=CL_TRAIN,
                                                                   classes_per_step=5))
    assert [s.classes for s in result.steps] == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    assert result.steps[-1].memory == {c: 2 for c in range(10)}
    with pytest.raises(ValueError, match="ipc"):
        ContinualConfig(method_settings={"ipc": 5})
    with pytest.raises(ValueError, match="buffer"):
        ContinualConfig(buffer="reservoir")
    with pytest.raises(ValueError, match="no settings"):
        ContinualConfig(method_settings={"iterationz": 5})


def test_bench_applications_loads_saved_sets_by_name_and_refuses_bad_ones(mnist, tmp_path):
    """``--sets NAME=PATH``: any method's saved set joins the cross-architecture table as
    (decoded images, stored labels, soft ones kept); a malformed spec, a taken name or another
    dataset is refused."""
    from dataclasses import replace as dc_replace

    from distill.synthetic import SetMetadata, SyntheticSet
    from simulations.bench_applications import load_extra_sets

    sub = random_real_subset(mnist.train, 2, seed=0)
    path = SyntheticSet(sub.images, sub.labels, SetMetadata(mnist.info, "mtt", 2)).save(tmp_path / "mtt.npz")
    sets = load_extra_sets([f"mtt={path}"], mnist.info)
    x, y = sets["mtt"]
    assert torch.equal(x, sub.images) and torch.equal(y, sub.labels)
    soft = torch.softmax(torch.randn(len(sub), mnist.info.num_classes, generator=torch.Generator().manual_seed(0)), 1)
    kip = SyntheticSet(sub.images, soft, SetMetadata(mnist.info, "kip", 2)).save(tmp_path / "kip.npz")
    assert torch.equal(load_extra_sets([f"kip={kip}"], mnist.info)["kip"][1], soft)  # learned labels kept
    for bad in (["mtt"], [f"dm={path}"], [f"a={path}", f"a={path}"]):
        with pytest.raises(SystemExit):
            load_extra_sets(bad, mnist.info)
    other = SyntheticSet(sub.images, sub.labels, SetMetadata(dc_replace(mnist.info, name="other"), "dm", 2))
    with pytest.raises(SystemExit, match="distilled from"):
        load_extra_sets([f"x={other.save(tmp_path / 'o.npz')}"], mnist.info)


def test_bench_applications_no_baselines_evaluates_only_the_saved_sets(mnist, tmp_path):
    """``--no-baselines``: no DM distillation, no random subset; the table, JSON and plot hold
    only the named sets, over the seeds given."""
    import json

    from distill.synthetic import SetMetadata, SyntheticSet
    from simulations.bench_applications import main

    sub = random_real_subset(mnist.train, 1, seed=0)
    path = SyntheticSet(sub.images, sub.labels, SetMetadata(mnist.info, "cafe", 1)).save(tmp_path / "c.npz")
    out = tmp_path / "out"
    assert main(["--quick", "--parts", "crossarch", "--no-baselines", "--seeds", "3",
                 "--sets", f"cafe={path}", "--out", str(out)]) == 0
    report = json.loads((out / "quick.json").read_text())
    assert list(report["crossarch"]) == ["cafe"] and report["dm"]["iterations"] == 0
    assert all(len(r["accuracies"]) == 1 for r in report["crossarch"]["cafe"])
    assert (out / "quick_crossarch.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["--quick", "--no-baselines", "--out", str(out)])  # nothing to evaluate
