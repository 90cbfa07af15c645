"""DC and DSA: gradient matching (Zhao, Mopuri & Bilen, ICLR 2021; Zhao & Bilen, ICML 2021).

Per outer iteration a fresh network is drawn; ``outer_loop`` times, the synthetic images move
so that each class's training gradient on them matches the gradient on a real batch of that
class (layer-wise cosine distance), then the network trains ``inner_loop`` epochs on the
synthetic set. DSA is DC plus siamese augmentation of both batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import accel
from ..augment import DSA
from ..data import LabeledImages
from ..losses import gradient_match_distance
from ..synthetic import SyntheticSet
from .base import (Callback, OuterLoop, MatchingConfig, RealSampler, finish,
                   generator, init_synthetic, make_network)

# (outer_loop, inner_loop) per ipc, from the DC paper's released settings.
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def default_loops(ipc: int) -> tuple[int, int]:
    """The paper's loops for its ipc values; nearest listed ipc otherwise."""
    nearest = min(LOOPS, key=lambda k: (abs(k - ipc), k))
    return LOOPS[nearest]


@dataclass(frozen=True)
class GMConfig(MatchingConfig):
    """DC / DSA settings; ``outer_loop``/``inner_loop`` of 0 take the paper's per-ipc values."""

    lr_img: float = 0.1
    dsa: bool = False
    lr_net: float = 0.01
    batch_train: int = 256
    outer_loop: int = 0
    inner_loop: int = 0
    method: str = "dc"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.outer_loop < 0 or self.inner_loop < 0 or not self.lr_net > 0:
            raise ValueError(f"loops must be >= 0 and lr_net > 0, got {self.outer_loop}, "
                             f"{self.inner_loop}, {self.lr_net}")

    @property
    def loops(self) -> tuple[int, int]:
        outer, inner = default_loops(self.ipc)
        return (self.outer_loop or outer, self.inner_loop or inner)


def class_gradient_distance(net: torch.nn.Module, params: list[torch.Tensor], real: torch.Tensor,
                            syn: torch.Tensor, c: int, dsa: DSA | None,
                            gen: torch.Generator, real_forward: Callable | None = None) -> torch.Tensor:
    """Gradient-matching loss of one class (differentiable in ``syn``). ``real_forward`` runs the
    real branch (first-order only, so it may be compiled: ``distill.accel.forward_fn``)."""
    if dsa is not None:  # one siamese draw for the class: both batches see the same transformation
        draw = dsa.sample(1, real.shape[2], real.shape[3], gen)
        real = dsa.apply(real, draw.select(torch.zeros(real.shape[0], dtype=torch.long)))
        syn = dsa.apply(syn, draw.select(torch.zeros(syn.shape[0], dtype=torch.long)))
    y_real = torch.full((real.shape[0],), c, device=real.device)
    y_syn = torch.full((syn.shape[0],), c, device=syn.device)
    g_real = torch.autograd.grad(F.cross_entropy((real_forward or net)(real), y_real), params)
    g_syn = torch.autograd.grad(F.cross_entropy(net(syn), y_syn), params, create_graph=True)
    return gradient_match_distance(g_syn, [g.detach() for g in g_real])


def _train_on_synthetic(net: torch.nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor,
                        labels: torch.Tensor, epochs: int, batch: int, dsa: DSA | None,
                        gen: torch.Generator) -> None:
    x, y = images.detach(), labels
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            idx = idx.to(x.device)
            xb = dsa(x[idx], gen) if dsa is not None else x[idx]
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def distill(real: LabeledImages, config: GMConfig, *, callback: Callback | None = None) -> SyntheticSet:
    gen = generator(config.seed)
    plan = init_synthetic(real, config, gen)
    sampler = RealSampler(real, config.device, gen)
    dsa = DSA(config.dsa_strategy) if config.dsa else None
    opt_img = torch.optim.SGD(plan.parameters(), lr=config.lr_img, momentum=config.momentum)
    outer_loop, inner_loop = config.loops
    bar = OuterLoop(config, config.method.upper())
    for it in bar:
        net = make_network(config, real, seed=config.seed * 100_003 + it)
        params = list(net.parameters())
        opt_net = torch.optim.SGD(params, lr=config.lr_net)
        real_forward = accel.forward_fn(net)
        total = 0.0
        for ol in range(outer_loop):
            images = plan.images()
            loss = images.new_zeros(())
            for c in plan.classes:
                real_c = sampler.class_batch(c, config.batch_real)
                syn_c = images[plan.slices[c]]
                loss = loss + class_gradient_distance(net, params, real_c, syn_c, c, dsa, gen, real_forward)
            # grads w.r.t. the image parameters only: no second-order work on the network's weights
            params_img = plan.parameters()
            for p, g in zip(params_img, torch.autograd.grad(loss, params_img)):
                p.grad = g
            opt_img.step()
            total += loss.item()
            if ol == outer_loop - 1:
                break
            _train_on_synthetic(net, opt_net, plan.images(), plan.labels, inner_loop,
                                config.batch_train, dsa, gen)
        value = total / (outer_loop * len(plan.classes))
        bar.set_postfix(loss=f"{value:.4f}")
        if callback is not None:
            callback(it, value)
    return finish(plan, real, config, iterations=bar.done, outer_loop=outer_loop, inner_loop=inner_loop)
