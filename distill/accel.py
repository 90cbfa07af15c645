"""Opt-in ``torch.compile`` for the two loops that dominate CPU time.

Profiling a DM iteration and an evaluator step on a 2-core CPU (BENCHMARKS.md, "DM against
the reference code") shows instance norm, ReLU and average pooling over full-resolution
activations taking about a third of the time: memory traffic, not arithmetic. Inductor fuses
them into the convolutions' passes, which measured about 0.7x the seconds of eager mode for the
no-grad embeddings (DM's real branch; DP-DM, FRePo and KIP use the same function), DM's synthetic
branch and the evaluator's training step. Gradient matching's real branch (DC, DSA) runs
through it too; its speed is not measured yet.

It stays off by default: compiling costs 15-35 s per process, needs a C++ compiler, and
changes results by float rounding (about 1e-6), so a compiled run's set is reproducible on the
same machine with the same switch, not bit-identical to an eager one. Turn it on with
``use_compile(True)`` or ``FEDISTILL_COMPILE=1``; the bench scripts take ``--compile``. When
the forward graph fails to compile (no compiler, an unsupported op) it warns once and runs
eagerly; any other error is raised as it is. Inductor compiles a backward graph lazily, at the
first ``backward()``: a failure there is raised, not caught.
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
    """Turn ``torch.compile`` on or off for this process's embeddings and evaluator steps
    (turning it on again retries a compiler that failed before)."""
    _state["enabled"] = bool(enabled)
    _state["broken"] = False


def _compiler_errors() -> tuple[type[BaseException], ...]:
    """What a failed compilation raises (imported only once compiling is on: torch._dynamo is heavy)."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    return (TorchDynamoException, InductorError)


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
    except _compiler_errors() as err:
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
        except _compiler_errors() as err:
            _fallback(err)
            return net(x)

    return call
