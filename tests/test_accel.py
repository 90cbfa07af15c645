"""The opt-in ``torch.compile`` path: same results as eager (to float rounding), and a compiler
failure falls back to eager with a warning instead of killing a run. The tests that compile are
slow (15-35 s of compilation each) and left out of the default run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill import accel
from distill.augment import DSA
from distill.methods.dm import dm_step
from distill.methods.gm import class_gradient_distance
from distill.networks import embed_in_chunks, seeded_network
from distill.train import TrainConfig, train_network


@pytest.fixture
def compiled():
    accel.use_compile(True)
    yield
    accel.use_compile(False)


def _net(seed: int = 0, width: int = 32) -> torch.nn.Module:
    return seeded_network("convnet", 1, 10, (28, 28), seed=seed, width=width)


def test_off_by_default_and_eager_is_plain_embed():
    assert not accel.compile_enabled()
    net, x = _net(), torch.randn(70, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(embed_in_chunks(net, x), net.embed(x).reshape(70, -1))
    assert accel.forward_fn(net) is net


def _failing_compile(message: str):
    from torch._dynamo.exc import TorchDynamoException

    def broken(*args, **kwargs):
        def fail(*a, **k):
            raise TorchDynamoException(message)
        return fail
    return broken


def test_compiler_failure_warns_once_and_runs_eagerly(compiled, monkeypatch):
    monkeypatch.setattr(accel, "_compiled_embed", None)
    monkeypatch.setattr(torch, "compile", _failing_compile("no C++ compiler"))
    net, x = _net(), torch.randn(70, 1, 28, 28)  # three chunks: one warning
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler") as caught:
        out = embed_in_chunks(net, x)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    with torch.no_grad():
        assert torch.equal(out, net.embed(x).reshape(70, -1))
    assert not accel.compile_enabled()  # later calls go straight to eager
    assert accel.forward_fn(net) is net
    accel.use_compile(True)  # switching on again retries
    assert accel.compile_enabled()


def test_a_failing_compiled_forward_falls_back_for_training(compiled, monkeypatch):
    monkeypatch.setattr(torch, "compile", _failing_compile("unsupported op"))
    net, x = _net(), torch.randn(4, 1, 28, 28)
    forward = accel.forward_fn(net)
    with pytest.warns(RuntimeWarning, match="unsupported op"):
        out = forward(x)
    assert torch.equal(out, net(x))


def test_an_error_that_is_not_the_compilers_is_raised(compiled, monkeypatch):
    def broken(*args, **kwargs):
        def fail(*a, **k):
            raise ValueError("a real bug")
        return fail

    monkeypatch.setattr(accel, "_compiled_embed", None)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ValueError, match="a real bug"):
        embed_in_chunks(_net(), torch.randn(4, 1, 28, 28))
    assert accel.compile_enabled()


@pytest.mark.slow
def test_compiled_dm_loss_matches_eager(compiled):
    """The DM loss and its gradient in the synthetic images, with the real branch compiled."""
    gen_args = dict(num_classes=10)
    real = torch.randn(10 * 40, 1, 28, 28)
    real_y = torch.arange(10).repeat_interleave(40)
    syn0 = torch.randn(10, 1, 28, 28)
    syn_y = torch.arange(10)

    def loss_and_grad(enabled: bool, seed: int) -> tuple[float, torch.Tensor]:
        accel.use_compile(enabled)
        syn = syn0.clone().requires_grad_(True)
        loss = dm_step(_net(seed), syn, syn_y, real, real_y, dsa=DSA(), gen=torch.Generator().manual_seed(3), **gen_args)
        loss.backward()
        return loss.item(), syn.grad

    for seed in (0, 1):  # a second network reuses the compiled graph
        eager_loss, eager_grad = loss_and_grad(False, seed)
        comp_loss, comp_grad = loss_and_grad(True, seed)
        assert comp_loss == pytest.approx(eager_loss, rel=1e-4)
        assert torch.allclose(comp_grad, eager_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_compiled_training_step_matches_eager(compiled):
    """One evaluator step: the same loss and weight gradients, to float rounding. (Over many
    steps the two runs drift apart as any two float orders do, so a trained network is only
    compared by its predictions.)"""
    x, y = torch.randn(64, 1, 28, 28), torch.arange(64) % 10

    def grads(enabled: bool) -> tuple[float, list[torch.Tensor]]:
        accel.use_compile(enabled)
        net = _net()
        loss = F.cross_entropy(accel.forward_fn(net)(x), y)
        loss.backward()
        return loss.item(), [p.grad for p in net.parameters()]

    (le, ge), (lc, gc) = grads(False), grads(True)
    assert lc == pytest.approx(le, rel=1e-5)
    for a, b in zip(ge, gc):  # conv biases before a norm have ~0 gradient: hence the absolute floor
        assert (a - b).norm() <= 1e-4 * a.norm() + 1e-6
    cfg = TrainConfig(epochs=20, batch_size=32)
    accel.use_compile(False)
    eager = train_network(_net(), x, y, cfg, seed=0)
    accel.use_compile(True)
    comp = train_network(_net(), x, y, cfg, seed=0)
    with torch.no_grad():
        agree = (eager(x).argmax(1) == comp(x).argmax(1)).float().mean().item()
    assert agree >= 0.95


@pytest.mark.slow
def test_compiled_gradient_matching_real_branch_matches_eager(compiled):
    """DC/DSA's real branch through the compiled forward: the same matching loss and image gradient."""
    net = _net()
    params = list(net.parameters())
    real, syn0 = torch.randn(32, 1, 28, 28), torch.randn(4, 1, 28, 28)

    def loss_and_grad(forward) -> tuple[float, torch.Tensor]:
        syn = syn0.clone().requires_grad_(True)
        loss = class_gradient_distance(net, params, real, syn, 3, DSA(), torch.Generator().manual_seed(1), forward)
        (grad,) = torch.autograd.grad(loss, syn)
        return loss.item(), grad

    eager_loss, eager_grad = loss_and_grad(None)
    comp_loss, comp_grad = loss_and_grad(accel.forward_fn(net))
    assert comp_loss == pytest.approx(eager_loss, rel=1e-4)
    assert (comp_grad - eager_grad).norm() <= 1e-3 * eager_grad.norm()
