"""Plain pixels, and KIP-rho's fixed pixels (the form pixels take when ``rho`` > 0).

``FixedPixels`` is KIP-rho's corruption (Nguyen et al., NeurIPS 2021): a fraction ``rho`` of
every stored pixel is drawn at random once and never changes. It is a reparameterisation, not
a masked gradient, so momentum, weight decay, Adam's state or any in-place update cannot move a
frozen pixel: ``torch.where`` selects the stored frozen value bit for bit in every read.
"""

from __future__ import annotations

import torch

from .base import Parameterization, register


@register
class Pixels(Parameterization):
    """The plain parameterisation: the images are the parameters."""

    name = "pixels"
    composes_with_rho = True

    def __init__(self, init: torch.Tensor) -> None:
        self.free = init.detach().clone().requires_grad_(True)

    @classmethod
    def _build(cls, init: torch.Tensor, rho: float, generator: torch.Generator, options: dict) -> Parameterization:
        return FixedPixels(init, rho, generator) if rho > 0 else Pixels(init)

    def parameters(self) -> list[torch.Tensor]:
        return [self.free]

    def images(self) -> torch.Tensor:
        return self.free


class FixedPixels(Pixels):
    """KIP-rho: pixels where ``mask`` is set are random noise, frozen forever.

    The frozen values are standard normal in the normalised space, drawn from ``generator``;
    the rest start from ``init`` and are optimised. No formal privacy guarantee: an
    obfuscation layer (see docs/privacy.md).
    """

    def __init__(self, init: torch.Tensor, rho: float, generator: torch.Generator) -> None:
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"rho must be in [0, 1), got {rho}")
        super().__init__(init)
        shape = tuple(init.shape)
        self.mask = (torch.rand(shape, generator=generator) < rho).to(init.device)
        self.frozen = torch.randn(shape, generator=generator).to(init.device)

    def images(self) -> torch.Tensor:
        return torch.where(self.mask, self.frozen, self.free)
