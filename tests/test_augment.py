import pytest
import torch

from distill.augment import DSA, OPERATIONS


def _batch(n=6, c=3, h=16, w=16, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("op", OPERATIONS)
def test_same_draw_transforms_real_and_synthetic_alike(op):
    dsa = DSA(op)
    real, syn = _batch(seed=1), _batch(seed=1)[:3].clone()
    params = dsa.sample(len(real), 16, 16, torch.Generator().manual_seed(3))
    out_real = dsa.apply(real, params)
    out_syn = dsa.apply(syn, params.select(torch.arange(3)))
    torch.testing.assert_close(out_syn, out_real[:3])
    # and pairing by index: synthetic row 0 can take real row 4's parameters
    out_pair = dsa.apply(real[4:5], params.select(torch.tensor([4])))
    torch.testing.assert_close(out_pair, out_real[4:5])


@pytest.mark.parametrize("op", OPERATIONS)
def test_each_operation_changes_images_and_is_differentiable(op):
    dsa = DSA(op)
    x = _batch().requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    changed = False
    for _ in range(5):
        y = dsa(x, gen)
        changed |= not torch.allclose(y, x)
    assert changed
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_single_mode_draws_one_operation_and_seed_reproduces():
    dsa = DSA()
    p1 = dsa.sample(4, 8, 8, torch.Generator().manual_seed(7))
    p2 = dsa.sample(4, 8, 8, torch.Generator().manual_seed(7))
    assert len(p1.ops) == 1 and p1.ops[0][0] == p2.ops[0][0]
    assert all(torch.equal(p1.ops[0][1][k], p2.ops[0][1][k]) for k in p1.ops[0][1])
    assert len(DSA(mode="multiple").sample(4, 8, 8, torch.Generator()).ops) == len(OPERATIONS)


def test_bad_strategy_and_short_params_are_refused():
    with pytest.raises(ValueError, match="unknown DSA"):
        DSA("color_blur")
    dsa = DSA("flip")
    params = dsa.sample(2, 8, 8, torch.Generator())
    with pytest.raises(ValueError, match="params drawn for 2"):
        dsa.apply(torch.zeros(3, 1, 8, 8), params)
