"""What HaBa and latent codes have in common: per-class stored bases plus a few small networks
shared by every class, seeded from the method's generator and stepped at ``net_lr`` x the
images' learning rate."""

from __future__ import annotations

import math

import torch

from ..factors import Factors, check_spec
from .base import Parameterization


class _Scaled:
    """A tensor optimised as ``value / scale``: its SGD step is ``scale**2`` times the common lr."""

    def __init__(self, value: torch.Tensor, lr_scale: float) -> None:
        self.scale = math.sqrt(lr_scale)
        self.leaf = (value / self.scale).detach().requires_grad_(True)

    def value(self) -> torch.Tensor:
        return self.leaf * self.scale


def he(generator: torch.Generator, device: torch.device, *shape: int, gain: float = 1.0) -> torch.Tensor:
    """He-initialised weights of ``nets`` 3x3 convolutions, shape [nets, out, in, 3, 3]."""
    fan_in = shape[2] * shape[3] * shape[4]
    return (torch.randn(shape, generator=generator) * gain * math.sqrt(2.0 / fan_in)).to(device)


class Hallucinated(Parameterization):
    """Per-class stored bases (``base_key``) plus small networks shared by all classes.

    A subclass says how a start becomes a spec, bases and networks (:meth:`_start`). The
    networks are He-initialised with small output layers, so at the start every image is its
    base plus a small distinct perturbation per network.
    """

    shared_networks = True
    why_no_rho = "its learned networks remap every stored pixel, so none stays fixed"
    copies_key = ""  # the option (and spec key) counting the networks: images one base decodes to

    @classmethod
    def decoded_per_base(cls, options: dict | None) -> int:
        return cls.check_options(options)[cls.copies_key]

    @classmethod
    def images_per_base(cls, spec: dict) -> int:
        return spec[cls.copies_key]

    def __init__(self, init: torch.Tensor, options: dict, generator: torch.Generator) -> None:
        spec, base, nets = self._start(init, options, generator)
        self.spec = check_spec(spec)
        self.free = base.requires_grad_(True)
        self.nets = {k: _Scaled(v, options["net_lr"]) for k, v in nets.items()}

    @classmethod
    def _start(cls, init: torch.Tensor, options: dict,
               generator: torch.Generator) -> tuple[dict, torch.Tensor, dict[str, torch.Tensor]]:
        """(spec, stored bases, network tensors) started from ``init``."""
        raise NotImplementedError

    @classmethod
    def _check_option(cls, key: str, value: object) -> None:
        if key != "net_lr":
            super()._check_option(key, value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{cls.name} option net_lr must be > 0, got {value!r}")

    @classmethod
    def _build(cls, init: torch.Tensor, rho: float, generator: torch.Generator, options: dict) -> Parameterization:
        return cls(init, options, generator)

    def _arrays(self) -> dict[str, torch.Tensor]:
        return {self.base_key: self.free, **{k: v.value() for k, v in self.nets.items()}}  # type: ignore[dict-item]

    def parameters(self) -> list[torch.Tensor]:
        return [self.free] + [v.leaf for v in self.nets.values()]

    def images(self) -> torch.Tensor:
        return self.decode(self.spec, self._arrays())

    def factors(self) -> Factors:
        return Factors(self.spec, {k: v.detach().cpu().clone() for k, v in self._arrays().items()})
