"""DD / BPTT: distillation by unrolled training (Wang et al. 2018; Deng & Russakovsky 2022).

Each iteration draws a fresh network, trains it ``inner_steps`` full-batch SGD steps on the
synthetic set (optionally with momentum, Deng & Russakovsky's choice), and scores the trained
network on a real batch; backpropagation through the whole unrolled training (a
meta-gradient) moves the images, the inner learning rate (learned in log space, shipped as
``SyntheticSet.lr``) and, with ``learn_labels``, soft labels (Sucholutsky & Schonlau 2021).

Memory: the unroll keeps every step's activations and parameter copies, O(inner_steps x
(|S| activations + parameters)). ``truncate`` bounds it: only the last ``truncate`` steps are
differentiated, the earlier ones run without a graph (truncated BPTT, biased but much
cheaper; Deng & Russakovsky unroll 150 steps and differentiate the last 40).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..data import LabeledImages
from ..labels import LabelLogits
from ..synthetic import SyntheticSet
from .base import (Callback, OuterLoop, MethodConfig, RealSampler, finish,
                   generator, init_synthetic, make_network)
from .kip import real_batch


@dataclass(frozen=True)
class BPTTConfig(MethodConfig):
    """BPTT settings: inner loop (``inner_steps``, ``truncate`` of 0 = differentiate all steps,
    ``inner_lr`` start, ``inner_momentum``) and Adam learning rates of the outer variables."""

    lr_img: float = 0.01
    lr_lr: float = 0.01
    lr_labels: float = 0.01
    batch_real: int = 256
    inner_steps: int = 20
    truncate: int = 10
    inner_lr: float = 0.05
    inner_momentum: float = 0.5
    learn_lr: bool = True
    learn_labels: bool = False
    method: str = "bptt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner_steps < 1 or self.truncate < 0 or not 0.0 <= self.inner_momentum < 1.0:
            raise ValueError(f"need inner_steps >= 1, truncate >= 0, inner_momentum in [0, 1); got "
                             f"{self.inner_steps}, {self.truncate}, {self.inner_momentum}")
        if not (self.lr_img > 0 and self.lr_lr > 0 and self.lr_labels > 0 and self.inner_lr > 0) or self.batch_real < 1:
            raise ValueError(f"learning rates must be > 0 and batch_real >= 1: {self}")


def _leaves(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def unrolled_loss(net: torch.nn.Module, params: dict[str, torch.Tensor], syn_x: torch.Tensor,
                  syn_y: torch.Tensor, real_x: torch.Tensor, real_y: torch.Tensor, lr: torch.Tensor,
                  steps: int, momentum: float = 0.0, truncate: int = 0) -> torch.Tensor:
    """Real-batch loss of ``net`` after ``steps`` SGD steps from ``params`` on the synthetic set.

    Differentiable in ``syn_x``, ``syn_y`` (class indices or probabilities) and ``lr`` through
    the last ``truncate`` steps (all steps if 0). ``params`` are copied, never changed.
    """
    p = _leaves(params)
    vel = {k: torch.zeros_like(v) for k, v in p.items()}
    first_tracked = 0 if truncate <= 0 else max(0, steps - truncate)
    for t in range(steps):
        tracked = t >= first_tracked
        x, y, eta = (syn_x, syn_y, lr) if tracked else (syn_x.detach(), syn_y.detach(), lr.detach())
        loss = F.cross_entropy(functional_call(net, p, (x,)), y)
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=tracked)
        for (k, w), g in zip(list(p.items()), grads):
            vel[k] = momentum * vel[k] + g
            p[k] = w - eta * vel[k]
        if not tracked:  # cut the graph: earlier steps cost no memory
            p, vel = _leaves(p), {k: v.detach() for k, v in vel.items()}
    return F.cross_entropy(functional_call(net, p, (real_x,)), real_y)


def distill(real: LabeledImages, config: BPTTConfig, *, callback: Callback | None = None) -> SyntheticSet:
    gen = generator(config.seed)
    plan = init_synthetic(real, config, gen)
    sampler = RealSampler(real, config.device, gen)
    labels = LabelLogits(plan.labels, real.info.num_classes) if config.learn_labels else None
    log_lr = torch.tensor(math.log(config.inner_lr), device=config.device, requires_grad=config.learn_lr)
    groups = [{"params": plan.parameters(), "lr": config.lr_img}]
    if config.learn_lr:
        groups.append({"params": [log_lr], "lr": config.lr_lr})
    if labels is not None:
        groups.append({"params": labels.parameters(), "lr": config.lr_labels})
    opt = torch.optim.Adam(groups)
    bar = OuterLoop(config, "BPTT")
    for it in bar:
        net = make_network(config, real, seed=config.seed * 100_003 + it)
        real_x, real_y = real_batch(sampler, plan, config.batch_real)
        syn_y = labels.probs() if labels is not None else plan.labels
        loss = unrolled_loss(net, dict(net.named_parameters()), plan.images(), syn_y, real_x, real_y,
                             log_lr.exp(), config.inner_steps, config.inner_momentum, config.truncate)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{log_lr.exp().item():.4f}")
        if callback is not None:
            callback(it, loss.item())
    soft = labels.export() if labels is not None else None
    return finish(plan, real, config, iterations=bar.done, soft_labels=soft, lr=float(log_lr.detach().exp()),
                  inner_steps=config.inner_steps, truncate=config.truncate)
