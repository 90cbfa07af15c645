"""Opt-in ``torch.compile`` for the two loops that dominate CPU time.

Profiling a DM iteration and an evaluator step on a 2-core CPU (BENCHMARKS.md, "Where a DM
iteration goes") shows the convolutions at well under peak and the instance norm, ReLU and
average pooling at full resolution costing a third of the time between them: memory traffic,
not arithmetic. Inductor fuses norm, activation and pooling into one pass, which measured
about 0.7x the seconds of eager mode for both the no-grad embedding of real batches (DM, DSA's
and CAFE's real branch, DP-DM, FRePo, KIP's features) and the evaluator's training step.

It stays off by default: compiling costs 15-35 s per process, needs a C++ compiler, and
changes results by float rounding (about 1e-6), so a compiled run's set is reproducible on the
same machine with the same switch, not bit-identical to an eager one. Turn it on with
``use_compile(True)`` or ``FEDISTILL_COMPILE=1``; the bench scripts take ``--compile``. When
compilation fails (no compiler, an unsupported op) it warns once and runs eagerly.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
from torch import nn

COMPILE_ENV = "FEDISTILL_COMPILE"
_state = {"enabled": os.environ.get(COMPILE_ENV, "").strip().lower() in ("1", "true", "yes", "on"),
          "broken": False}


def use_compile(enabled: bool = True) -> None:
    """Turn ``torch.compile`` on or off for this process's embeddings and evaluator steps."""
    _state["enabled"] = bool(enabled)


def compile_enabled() -> bool:
    return bool(_state["enabled"]) and not _state["broken"]


def _embed(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.embed(x)


_compiled_embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None


def _fallback(err: Exception) -> None:
    _state["broken"] = True
    warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); running eagerly",
                  RuntimeWarning, stacklevel=3)


def embed(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net.embed(x)``, compiled when enabled. One compiled function serves every network of a
    class: parameters are graph inputs, so DM's fresh network per iteration reuses the graph."""
    global _compiled_embed
    if not compile_enabled():
        return net.embed(x)
    if _compiled_embed is None:
        _compiled_embed = torch.compile(_embed)
    try:
        return _compiled_embed(net, x)
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
        _fallback(err)
        return net.embed(x)


def forward_fn(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The callable a training loop should use for ``net(x)``: compiled when enabled (autograd
    flows through it as through ``net``), else ``net`` itself."""
    if not compile_enabled():
        return net
    compiled = torch.compile(net)

    def call(x: torch.Tensor) -> torch.Tensor:
        if _state["broken"]:
            return net(x)
        try:
            return compiled(x)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
            _fallback(err)
            return net(x)

    return call
