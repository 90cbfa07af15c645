"""KIP-rho's frozen pixels stay bit-identical under any optimiser state (obfuscation, not DP)."""

import pytest
import torch

from distill.parameterize import FixedPixels, make_parameterization

OPTIMISERS = {
    "adam-wd": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=1e-2),
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
}


@pytest.mark.parametrize("name", sorted(OPTIMISERS))
@pytest.mark.parametrize("rho", [0.5, 0.9])
def test_frozen_pixels_bit_identical_after_many_steps(name, rho):
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(20, 1, 28, 28, generator=gen)
    param = make_parameterization(init, rho, gen)
    assert isinstance(param, FixedPixels)
    frozen_before = param.images()[param.mask].clone()
    target = torch.randn(init.shape, generator=gen)
    opt = OPTIMISERS[name](param.parameters())
    for _ in range(200):
        loss = ((param.images() - target) ** 2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # an in-place clamp on the stored parameters cannot reach them either
            param.parameters()[0].clamp_(-3, 3)
    images = param.images()
    assert torch.equal(images[param.mask], frozen_before)
    assert abs(param.mask.float().mean().item() - rho) < 0.02
    free = ~param.mask
    assert (images[free] - init[free]).abs().mean() > 0.1  # the free pixels did move


def test_frozen_values_are_noise_not_the_initialisation():
    """With a real-image init the frozen pixels must still be noise, never private pixels."""
    gen = torch.Generator().manual_seed(1)
    init = torch.full((4, 1, 8, 8), 7.0)  # stands for a private image: far from N(0, 1)
    param = make_parameterization(init, 0.5, gen)
    assert (param.images()[param.mask] != 7.0).all()
