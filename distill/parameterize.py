"""The layer between the optimiser and the synthetic images: the names callers have always used.

A method optimises ``parameters()`` and always reads the images through ``images()``, so a
parameterisation can change what is stored without the method knowing. ``factors()`` is what
a :class:`~distill.synthetic.SyntheticSet` stores and uploads (None: the images themselves).

Each parameterisation is one class in :mod:`distill.params` (one module each: plain and
KIP-rho fixed pixels, IDC, HaBa, latent codes), found by name in its registry. The functions
and tables here ask that registry; new code may ask the class itself
(``parameterisation(name).shared_networks`` and so on).

>>> p = make_parameterization(torch.zeros(4, 1, 8, 8), 0.0, torch.Generator(), "idc", {"factor": 2})
>>> tuple(p.images().shape), tuple(p.factors().arrays["base"].shape)
((4, 1, 8, 8), (1, 1, 8, 8))
"""

from __future__ import annotations

import torch

from .params import (PARAMETERISATIONS, IDC, FixedPixels, HaBa, Hallucinated, Latent, Parameterization, Pixels,
                     available_parameterisations, parameterisation, rho_composes)

OPTIONS: dict[str, dict]  # served by __getattr__ below
RHO_COMPOSES: tuple[str, ...]


def __getattr__(name: str) -> object:
    """``OPTIONS`` (name -> option defaults) and ``RHO_COMPOSES`` (the names rho composes with),
    read from the registry when asked, so a class registered later is in them too."""
    if name == "OPTIONS":
        return {key: dict(cls.options) for key, cls in PARAMETERISATIONS.items()}
    if name == "RHO_COMPOSES":
        return rho_composes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_options(name: str, options: dict | None) -> dict:
    """The options of parameterisation ``name`` merged over its defaults; ``ValueError`` if bad."""
    return parameterisation(name).check_options(options)


def real_per_base(name: str, options: dict | None) -> int:
    """Real (or noise) images one stored base is initialised from: each IDC tile gets its own."""
    return parameterisation(name).real_per_base(options)


def decoded_per_base(name: str, options: dict | None) -> int:
    """Images one stored base decodes to."""
    return parameterisation(name).decoded_per_base(options)


def make_parameterization(init: torch.Tensor, rho: float, generator: torch.Generator,
                          name: str = "pixels", options: dict | None = None) -> Parameterization:
    """The parameterisation ``name`` started from ``init``.

    ``init`` holds ``real_per_base`` full-size images (real or noise) per stored base, in base
    order; the result decodes to ``decoded_per_base`` images per base, base-major.
    """
    return parameterisation(name).build(init, rho, generator, options)


__all__ = ["OPTIONS", "RHO_COMPOSES", "FixedPixels", "HaBa", "Hallucinated", "IDC", "Latent", "Parameterization",
           "Pixels", "available_parameterisations", "check_options", "decoded_per_base", "make_parameterization",
           "parameterisation", "real_per_base"]
