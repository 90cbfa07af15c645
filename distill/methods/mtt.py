"""MTT: dataset distillation by matching training trajectories (Cazenavette et al., CVPR 2022).

Experts trained on real data (:mod:`distill.experts`, cached on disk) leave a trajectory of
parameters, one point per epoch. Each iteration samples an expert and a start epoch ``t``,
starts a student at the expert's ``theta*_t``, takes ``syn_steps`` differentiable SGD steps on
(DSA-augmented) synthetic batches with a learnable learning rate, and scores where it lands
against the expert ``expert_epochs`` later (eq. 13):

    ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2

The gradient reaches the images and the student learning rate (learned in log space, so it
stays positive; shipped as ``SyntheticSet.lr``). The student runs as a function of one flat
parameter vector (``torch.func.functional_call``), so an unroll costs no module copies.

Private MTT: train the experts with a DP trainer (``distill.experts.load_or_train_experts``
with ``trainer=``) and call :func:`distill_from_experts`; the images only ever see the experts.
``embedder_state`` is not used: experts start from seeded random networks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..augment import DEFAULT_STRATEGY, DSA
from ..data import LabeledImages
from ..experts import ExpertBuffer, ExpertConfig, ParamLayout, load_or_train_experts
from ..synthetic import SyntheticSet
from .base import Callback, MethodConfig, OuterLoop, check_matching, finish, generator, init_synthetic, make_network


@dataclass(frozen=True)
class MTTConfig(MethodConfig):
    """MTT settings, scaled to a CPU (the paper's CIFAR-10 IPC 10: N=30, M=2, start <= 20, 50 expert epochs).

    ``expert_epochs`` (M) and ``syn_steps`` (N): the segment matched and the student steps
    that must cover it; ``max_start_epoch``: the latest start epoch sampled (inclusive);
    ``num_experts``/``expert_train_epochs``/``expert_lr``: the buffer; ``student_lr``: the
    learnable student lr's start; ``batch_syn`` of 0: every student step sees the whole set;
    ``lr_img``/``lr_lr``: SGD (momentum ``momentum``) on the pixels and on log(student lr);
    ``expert_seed``: the buffer's seed (apart from ``seed``, so that
    every distillation seed and round reuses one buffer); ``expert_cache``: buffer directory ("" =
    ``$FEDISTILL_EXPERT_CACHE`` or ``~/.cache/fedistill/experts``; None: no file, the buffer
    stays in memory, as on a federated node that names no ``expert-cache``).
    """

    iterations: int = 200
    expert_epochs: int = 2
    syn_steps: int = 20
    max_start_epoch: int = 8
    num_experts: int = 3
    expert_train_epochs: int = 10
    expert_lr: float = 0.01
    expert_batch: int = 256
    student_lr: float = 0.01
    batch_syn: int = 0
    lr_img: float = 100.0
    lr_lr: float = 0.01
    momentum: float = 0.5
    dsa: bool = True
    dsa_strategy: str = DEFAULT_STRATEGY
    expert_seed: int = 0
    expert_cache: str | None = ""
    method: str = "mtt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expert_epochs < 1 or self.syn_steps < 1 or self.num_experts < 1 or self.max_start_epoch < 0:
            raise ValueError(f"need expert_epochs, syn_steps, num_experts >= 1 and max_start_epoch >= 0: {self}")
        if self.max_start_epoch + self.expert_epochs > self.expert_train_epochs:
            raise ValueError(f"max_start_epoch + expert_epochs = {self.max_start_epoch + self.expert_epochs} "
                             f"exceeds expert_train_epochs = {self.expert_train_epochs}")
        if not (self.lr_img > 0 and self.lr_lr > 0 and self.student_lr > 0 and self.expert_lr > 0):
            raise ValueError(f"learning rates must be > 0: {self}")
        check_matching(self.momentum, self.dsa_strategy)
        if self.batch_syn < 0 or self.expert_batch < 1 or not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"need batch_syn >= 0, expert_batch >= 1, momentum in [0, 1): {self}")

    def expert_config(self) -> ExpertConfig:
        return ExpertConfig(arch=self.arch, arch_kwargs=dict(self.arch_kwargs), num_experts=self.num_experts,
                            epochs=self.expert_train_epochs, lr=self.expert_lr, batch_size=self.expert_batch,
                            dsa=self.dsa, dsa_strategy=self.dsa_strategy, seed=self.expert_seed)


def normalized_distance(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 13: 0 when the student lands on the target, 1 when it never left the start."""
    return ((student - target) ** 2).sum() / ((start - target) ** 2).sum()


def student_endpoint(net: torch.nn.Module, layout: ParamLayout, start: torch.Tensor, images: torch.Tensor,
                     labels: torch.Tensor, lr: torch.Tensor, steps: int, batch: int, dsa: DSA | None,
                     gen: torch.Generator) -> torch.Tensor:
    """Flat parameters after ``steps`` SGD steps from ``start`` on synthetic batches.

    Differentiable in ``images`` and ``lr`` (second order through every step). Batches walk
    through seeded permutations of the set, one fresh DSA draw per step, as the reference does.
    """
    w = start.detach().clone().requires_grad_(True)
    order: list[torch.Tensor] = []
    for _ in range(steps):
        if not order:
            order = list(torch.randperm(len(images), generator=gen).split(batch or len(images)))
        idx = order.pop(0).to(images.device)
        x = dsa(images[idx], gen) if dsa is not None else images[idx]
        loss = F.cross_entropy(functional_call(net, layout.unflatten(w), (x,)), labels[idx])
        (grad,) = torch.autograd.grad(loss, w, create_graph=True)
        w = w - lr * grad
    return w


def distill(real: LabeledImages, config: MTTConfig, *, callback: Callback | None = None) -> SyntheticSet:
    buffer = load_or_train_experts(real, config.expert_config(), directory=config.expert_cache or None,
                                   persist=config.expert_cache is not None, device=config.device)
    return distill_from_experts(real, config, buffer, callback=callback)


def distill_from_experts(real: LabeledImages, config: MTTConfig, buffer: ExpertBuffer, *,
                         callback: Callback | None = None) -> SyntheticSet:
    """MTT's outer loop on a given buffer (e.g. one trained by a DP trainer)."""
    if buffer.epochs < config.max_start_epoch + config.expert_epochs:
        raise ValueError(f"buffer has {buffer.epochs} epochs, need max_start_epoch + expert_epochs = "
                         f"{config.max_start_epoch + config.expert_epochs}")
    gen = generator(config.seed)
    plan = init_synthetic(real, config, gen)
    net = make_network(config, real, seed=config.seed)  # its weights are never used, only its graph
    if ParamLayout.of(net) != buffer.layout:
        raise ValueError("expert buffer's parameter layout does not match the configured network")
    dsa = DSA(config.dsa_strategy) if config.dsa else None
    log_lr = torch.tensor(math.log(config.student_lr), device=config.device, requires_grad=True)
    opt_img = torch.optim.SGD(plan.parameters(), lr=config.lr_img, momentum=config.momentum)
    opt_lr = torch.optim.SGD([log_lr], lr=config.lr_lr, momentum=config.momentum)
    trajectories = buffer.trajectories.to(config.device)
    bar = OuterLoop(config, "MTT")
    for it in bar:
        e = int(torch.randint(buffer.num_experts, (1,), generator=gen))
        t = int(torch.randint(config.max_start_epoch + 1, (1,), generator=gen))
        start, target = trajectories[e, t], trajectories[e, t + config.expert_epochs]
        end = student_endpoint(net, buffer.layout, start, plan.images(), plan.labels, log_lr.exp(),
                               config.syn_steps, config.batch_syn, dsa, gen)
        loss = normalized_distance(end, start, target)
        opt_img.zero_grad(set_to_none=True)
        opt_lr.zero_grad(set_to_none=True)
        loss.backward()
        opt_img.step()
        opt_lr.step()
        value = loss.item()
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{log_lr.exp().item():.4f}")
        if callback is not None:
            callback(it, value)
    return finish(plan, real, config, iterations=bar.done, lr=float(log_lr.detach().exp()),
                  syn_steps=config.syn_steps, expert_epochs=config.expert_epochs,
                  num_experts=buffer.num_experts)
