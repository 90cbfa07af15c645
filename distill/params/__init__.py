"""Parameterisations: what a method optimises and a set stores, one module each, found by name.

Each module defines one :class:`~distill.params.base.Parameterization` subclass and registers it
with ``@register``; importing this package imports every module below, so the registry is full
whoever asks first (``distill.factors`` included). To add one, write its module and name it in
:data:`MODULES` below; ``tests/test_parameterisation_contract.py`` holds every registered class
to the interface's contract.

>>> cls = parameterisation("idc")
>>> cls.decoded_per_base({"factor": 3}), cls.composes_with_rho, cls.shared_networks
(9, True, False)
"""

from __future__ import annotations

from . import pixels, idc, haba, latent
from .base import (PARAMETERISATIONS, Parameterization, available_parameterisations, factorised, parameterisation,
                   register, rho_composes)
from .haba import HaBa
from .idc import IDC
from .latent import Latent
from .pixels import FixedPixels, Pixels
from .shared import Hallucinated

MODULES = (pixels, idc, haba, latent)  # each registers its class when imported, in this order

__all__ = ["MODULES", "PARAMETERISATIONS", "FixedPixels", "HaBa", "Hallucinated", "IDC", "Latent", "Parameterization",
           "Pixels", "available_parameterisations", "factorised", "parameterisation", "register", "rho_composes"]
