"""What a parameterisation is: one class that answers every question the rest of the code asks.

A method optimises ``parameters()`` and reads the images through ``images()``; a set stores
``factors()`` (None: the images themselves). Those are the instance side. The class side says,
once, what callers would otherwise switch on the name for: the option defaults and their
bounds, whether KIP-rho composes, whether learned networks are shared by every class, how many
real images start a stored base and how many images it decodes to, how to build an instance,
and, for a factorised kind, its spec keys, its per-class array and its decoder, which
:mod:`distill.factors` dispatches to for every set it checks or decodes (uploads included).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..factors import Factors


class Parameterization:
    """Instances: what a method sees. Class attributes and classmethods: the interface below."""

    name: ClassVar[str] = ""
    # Option defaults; an option whose default is None may stay None (derived when built).
    options: ClassVar[dict] = {}
    # Inclusive bounds of every integer option and spec field (besides height and width). They
    # bound what a hostile spec may ask a receiver to decode, so they are the same on both ends.
    limits: ClassVar[dict[str, tuple[int, int]]] = {}
    composes_with_rho: ClassVar[bool] = False  # rho freezes stored pixels; does this keep them?
    why_no_rho: ClassVar[str] = "it does not keep stored pixels fixed"
    shared_networks: ClassVar[bool] = False  # learned networks shared by every class (set whole)
    # Factor format. ``base_key`` None: the images themselves are stored (no factors); else the
    # name of the per-class array (one row per stored base), and ``spec_keys`` the spec's
    # integer fields besides "kind".
    base_key: ClassVar[str | None] = None
    spec_keys: ClassVar[tuple[str, ...]] = ()

    # -- the class side ------------------------------------------------------------------------

    @classmethod
    def check_options(cls, options: dict | None) -> dict:
        """``options`` merged over the defaults; ``ValueError`` naming a bad one."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            raise ValueError(f"parameterisation {cls.name!r} has no options {unknown}; it has {sorted(cls.options)}")
        out = {**cls.options, **options}
        for key, value in out.items():
            cls._check_option(key, value)
        return out

    @classmethod
    def _check_option(cls, key: str, value: object) -> None:
        if value is None and cls.options[key] is None:
            return
        lo, hi = cls.limits[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"{cls.name} option {key}={value!r}: must be an int in [{lo}, {hi}]")

    @classmethod
    def real_per_base(cls, options: dict | None) -> int:
        """Real (or noise) full-size images one stored base is initialised from."""
        cls.check_options(options)
        return 1

    @classmethod
    def decoded_per_base(cls, options: dict | None) -> int:
        """Images one stored base decodes to."""
        cls.check_options(options)
        return 1

    @classmethod
    def build(cls, init: torch.Tensor, rho: float, generator: torch.Generator,
              options: dict | None = None) -> "Parameterization":
        """An instance started from ``init``: ``real_per_base`` images per stored base, base order.

        Every random draw comes from ``generator``, so the same seed gives the same start.
        """
        opts = cls.check_options(options)
        if rho > 0 and not cls.composes_with_rho:
            raise ValueError(f"rho > 0 does not compose with parameterisation {cls.name!r}: {cls.why_no_rho}; "
                             f"use one of {rho_composes()}")
        return cls._build(init, rho, generator, opts)

    @classmethod
    def _build(cls, init: torch.Tensor, rho: float, generator: torch.Generator, options: dict) -> "Parameterization":
        raise NotImplementedError

    # Factor format: called by distill.factors only on a spec that check_spec accepted.

    @classmethod
    def images_per_base(cls, spec: dict) -> int:
        raise NotImplementedError(f"{cls.name} stores images, not factors")

    @classmethod
    def expected_shapes(cls, spec: dict, channels: int, num_bases: int, height: int = -1,
                        width: int = -1) -> dict[str, tuple[int, ...]]:
        """Every stored array's shape; -1 where it is the image size and that is not given."""
        raise NotImplementedError(f"{cls.name} stores images, not factors")

    @classmethod
    def spec_problem(cls, spec: dict, channels: int) -> str | None:
        """Why ``spec`` cannot describe images of ``channels`` channels (beyond shapes), or None."""
        return None

    @classmethod
    def decode(cls, spec: dict, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        """The images, base-major, differentiable in every array."""
        raise NotImplementedError(f"{cls.name} stores images, not factors")

    # -- the instance side ---------------------------------------------------------------------

    def parameters(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def images(self) -> torch.Tensor:
        raise NotImplementedError

    def factors(self) -> Factors | None:
        """The stored factors, or None when the images themselves are stored."""
        return None


def downsample(images: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Area-downsampled to ``h`` x ``w`` (how a full-size start becomes a smaller stored one)."""
    return F.interpolate(images, size=(h, w), mode="area") if images.shape[-2:] != (h, w) else images


PARAMETERISATIONS: dict[str, type[Parameterization]] = {}


def register(cls: type[Parameterization]) -> type[Parameterization]:
    """Class decorator: make ``cls`` available by ``cls.name``; a taken name raises ``ValueError``."""
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"{cls.__name__} needs a name")
    if cls.name in PARAMETERISATIONS:
        raise ValueError(f"parameterisation {cls.name!r} is registered already")
    if cls.base_key is not None and not cls.spec_keys:
        raise ValueError(f"{cls.__name__} stores factors, so it needs spec_keys")
    cls.check_options({})  # its defaults must pass its own checks (and every int option have bounds)
    PARAMETERISATIONS[cls.name] = cls
    return cls


def parameterisation(name: str) -> type[Parameterization]:
    """The class registered as ``name``; ``ValueError`` naming the known ones."""
    if not isinstance(name, str) or name not in PARAMETERISATIONS:
        raise ValueError(f"unknown parameterisation {name!r}; known: {available_parameterisations()}")
    return PARAMETERISATIONS[name]


def available_parameterisations() -> list[str]:
    return sorted(PARAMETERISATIONS)


def rho_composes() -> tuple[str, ...]:
    """The names KIP-rho composes with, in registration order."""
    return tuple(n for n, c in PARAMETERISATIONS.items() if c.composes_with_rho)


def factorised() -> dict[str, type[Parameterization]]:
    """The kinds that store factors (name -> class), in registration order."""
    return {n: c for n, c in PARAMETERISATIONS.items() if c.base_key is not None}
