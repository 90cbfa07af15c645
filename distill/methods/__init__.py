"""Distillation methods behind one signature: ``distill(real_data, config) -> SyntheticSet``.

>>> cfg = make_config("dm", ipc=1, iterations=2)
>>> type(cfg).__name__, cfg.method
('DMConfig', 'dm')
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from ..data import LabeledImages
from ..synthetic import SyntheticSet
from . import dm, gm
from .base import Callback, MethodConfig

DistillFn = Callable[..., SyntheticSet]
Entry = tuple[type[MethodConfig], dict[str, Any], DistillFn]
Lazy = str  # "module:attribute", imported on first use

# name -> (config class, fixed config values, distill function); a lazy entry holds "module:attr" strings
_REGISTRY: dict[str, tuple[type[MethodConfig] | Lazy, dict[str, Any], DistillFn | Lazy]] = {}
_PRIVATE: set[str] = set()  # names registered private=True


def register(name: str, config_cls: type[MethodConfig] | Lazy, fn: DistillFn | Lazy, *, force: bool = False,
             private: bool = False, **fixed: Any) -> None:
    """Make a method available by name; ``fixed`` pins config fields (e.g. DSA = DC + ``dsa=True``).

    ``config_cls`` and ``fn`` may be ``"module:attribute"`` strings, imported when the method is first
    used: a package that builds on ``distill`` (``privacy``) lists its methods here without
    ``distill`` importing it, and without its users importing it for a side effect. A name
    registered already raises ``ValueError`` unless ``force`` (a silent overwrite would change
    what a config means). ``private``: an example-level DP method (:func:`private_methods`).
    """
    if name in _REGISTRY and not force:
        raise ValueError(f"method {name!r} is registered already; pass force=True to replace it")
    _REGISTRY[name] = (config_cls, {"method": name, **fixed}, fn)
    _PRIVATE.discard(name)
    if private:
        _PRIVATE.add(name)


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def private_methods() -> list[str]:
    """The methods registered ``private=True``: example-level DP (a client runs them under its
    privacy ledger and policy, a task names them with ``dp=``, never ``method=``)."""
    return sorted(_PRIVATE)


def _resolve(target: Any) -> Any:
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _lookup(name: str) -> Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {available_methods()}")
    config_cls, fixed, fn = _REGISTRY[name]
    if isinstance(config_cls, str) or isinstance(fn, str):
        config_cls, fn = _resolve(config_cls), _resolve(fn)
        _REGISTRY[name] = (config_cls, fixed, fn)
    return config_cls, fixed, fn  # type: ignore[return-value]


def config_fields(name: str) -> dict[str, dataclasses.Field]:
    """The settable fields of a method's config (for CLIs and run-config translation)."""
    cls, fixed, _ = _lookup(name)
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in fixed}


def make_config(name: str, **settings: Any) -> MethodConfig:
    """Build a method's config by name; unknown settings raise ``ValueError`` naming them."""
    cls, fixed, _ = _lookup(name)
    allowed = config_fields(name)
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"method {name!r} has no settings {unknown}; it has {sorted(allowed)}")
    return cls(**{**settings, **fixed})


def distill(real_data: LabeledImages, config: MethodConfig, *,
            callback: Callback | None = None) -> SyntheticSet:
    """Distill ``real_data`` with the method named by ``config.method``."""
    _, _, fn = _lookup(config.method)
    if len(real_data) == 0:
        raise ValueError("real_data is empty: nothing to distill")
    return fn(real_data, config, callback=callback)


register("dm", dm.DMConfig, dm.distill)
register("dc", gm.GMConfig, gm.distill, dsa=False)
register("dsa", gm.GMConfig, gm.distill, dsa=True)
from . import bptt, frepo, kip, rfad  # noqa: E402  (meta-learning family, issue 7)

register("kip", kip.KIPConfig, kip.distill)
register("rfad", rfad.RFADConfig, rfad.distill)
register("frepo", frepo.FRePoConfig, frepo.distill)
register("bptt", bptt.BPTTConfig, bptt.distill)
from . import cafe, mtt  # noqa: E402  (trajectory and feature matching, issue 8)

register("mtt", mtt.MTTConfig, mtt.distill)
register("cafe", cafe.CAFEConfig, cafe.distill)
# Example-level DP methods live in privacy/ (which builds on distill, never the reverse): named
# here, imported on first use (Opacus with them).
register("dp-dm", "privacy.dp_dm:DPDMConfig", "privacy.dp_dm:distill", private=True)
register("dpsgd-gm", "privacy.dp_gm:DPGMConfig", "privacy.dp_gm:distill", private=True)
register("dp-mtt", "privacy.dp_experts:DPMTTConfig", "privacy.dp_experts:distill", private=True)

__all__ = ["available_methods", "private_methods", "config_fields", "distill", "make_config", "register", "MethodConfig"]
