import torch

from distill import TrainConfig, distill, evaluate, make_config, random_real_subset
from distill.cli import main as cli_main

from .conftest import SMALL_NET


def test_tiny_distill_and_evaluate_beats_chance(mnist, small_train):
    syn = distill(small_train, make_config("dm", ipc=2, iterations=5, batch_real=32, arch_kwargs=SMALL_NET))
    result = evaluate(syn.images, syn.labels, mnist.test, TrainConfig(epochs=30, arch_kwargs=SMALL_NET), seeds=(0, 1))
    assert result.mean > 0.4  # chance is 0.1


def test_random_real_subset_is_ipc_per_class(mnist):
    sub = random_real_subset(mnist.train, 3, seed=1)
    assert sub.class_histogram().tolist() == [3] * 10


def test_soft_labels_train(mnist, small_train):
    soft = torch.nn.functional.one_hot(small_train.labels[:50], 10).float()
    cfg = TrainConfig(epochs=2, arch="mlp", dsa=False)
    result = evaluate(small_train.images[:50], soft, mnist.test, cfg, seeds=(0,))
    assert 0.0 <= result.mean <= 1.0


def test_cli_distill_evaluate_show(tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert cli_main(["distill", "--ipc", "1", "--iterations", "1", "--set", "batch_real=16",
                     "--set", 'arch_kwargs={"width": 8, "depth": 1}', "--out", str(out)]) == 0
    assert cli_main(["evaluate", str(out), "--epochs", "2", "--seeds", "1", "--arch", "mlp", "--json"]) == 0
    assert cli_main(["show", str(out)]) == 0
    assert (tmp_path / "s.png").stat().st_size > 100
    assert cli_main(["distill", "--set", "nope=1", "--out", str(out)]) == 2
    assert "no setting" in capsys.readouterr().err
