"""DP experts for trajectory matching: MTT made private by post-processing.

MTT (Cazenavette et al. 2022) touches real data only through its expert trajectories. Train
those experts with DP-SGD (Abadi et al. 2016: Poisson-sampled batches, per-example gradients
from Opacus's ``GradSampleModule`` clipped to ``clip``, Gaussian noise ``sigma * clip``) and
record every epoch's parameters: the whole buffer is then one DP release, and everything MTT
does with it afterwards is post-processing, as in the DP-MTT line of work (e.g. Loo et al.'s
and Chen et al.'s private trajectory matching). The accountant counts every step of every
expert: ``num_experts x expert_train_epochs x ceil(1 / sample_rate)`` draws, plus the noisy
class counts that size the synthetic set (``privacy/layout.py``).

The buffer is cached under a tag that names its privacy settings, so a DP buffer and a plain
one never share an entry; reusing a cached DP buffer in a later round is post-processing of
the same release (the ledger still charges each round's plan: conservative).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from opacus import GradSampleModule
from torch import nn

from distill.augment import DSA
from distill.data import LabeledImages
from distill.experts import ExpertConfig, ExpertTrainer, load_or_train_experts
from distill.methods.base import Callback
from distill.methods.mtt import MTTConfig, distill_from_experts
from distill.synthetic import SyntheticSet

from .config import DPConfig, privacy_plan, refuse_coupling_layers
from .dp_gm import noisy_gradient
from .layout import class_counts, expected_total, public_layout
from .randomness import noise_generator


@dataclass(frozen=True)
class DPMTTConfig(MTTConfig, DPConfig):
    """MTT on DP-SGD experts. ``sample_rate`` is the experts' Poisson rate; ``epsilon`` covers
    the whole buffer (all experts, all epochs) and the noisy class counts; ``chunk`` bounds the
    memory of per-example gradients."""

    init: str = "noise"  # MTTConfig's inherited "real" would otherwise win over DPConfig's
    chunk: int = 64
    method: str = "dp-mtt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(1.0 / self.sample_rate)

    @property
    def queries(self) -> int:
        return self.num_experts * self.expert_train_epochs * self.steps_per_epoch

    def cache_tag(self, sigma: float) -> str:
        """Every setting the buffer's noise depends on (the run seed too), readable in the file name.

        Secret-noise and insecure buffers never share an entry; a node reusing its own cached
        secret-noise buffer reuses one DP release (post-processing).
        """
        kind = "insecure" if self.insecure_reproducible_noise else "secret"
        return (f"dp-{kind}-{self.accountant}-s{sigma:.6g}-q{self.sample_rate:g}-c{self.clip:g}"
                f"-spe{self.steps_per_epoch}-k{self.chunk}-n{self.seed}")


def dp_sgd_trainer(config: DPMTTConfig, sigma: float, noise: torch.Generator, expected: float) -> ExpertTrainer:
    """An expert trainer for :mod:`distill.experts`: ``steps_per_epoch`` noisy steps per epoch.

    ``noise`` (secret) draws every Poisson sample and every noise vector; ``expected`` is the
    public divisor ``q * N`` from the noisy class counts.
    """

    def train(net: nn.Module, data: LabeledImages, experts: ExpertConfig, gen: torch.Generator,
              checkpoint: Callable[[], None]) -> dict:
        refuse_coupling_layers(net, config.method)
        data = data.to(next(net.parameters()).device)  # the expert's device (CUDA too)
        gsm = GradSampleModule(copy.deepcopy(net), loss_reduction="sum")  # hooks stay off ``net``
        params = [p for p in gsm.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=experts.lr, momentum=experts.momentum)
        dsa = DSA(experts.dsa_strategy) if experts.dsa else None
        # Augmentation is public (data-independent); it also follows the run's seed.
        gen = torch.Generator().manual_seed(gen.initial_seed() * 1_000_003 + config.seed)

        def augment(x: torch.Tensor) -> torch.Tensor:  # per example: fine under DP
            return dsa(x, gen) if dsa is not None else x

        for _ in range(experts.epochs):
            for _ in range(config.steps_per_epoch):
                grads = noisy_gradient(gsm, data, config, sigma, augment, noise, expected)
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
                opt.zero_grad(set_to_none=True)
            net.load_state_dict(gsm._module.state_dict())
            checkpoint()
        return {"sigma": sigma, "sample_rate": config.sample_rate, "clip": config.clip,
                "steps": experts.epochs * config.steps_per_epoch}

    return train


def distill(real: LabeledImages, config: DPMTTConfig, *, callback: Callback | None = None) -> SyntheticSet:
    plan_dp = privacy_plan(config)
    noise = noise_generator(config.seed, config.insecure_reproducible_noise)  # secret: counts, sampling, noise
    counts = class_counts(real, config, noise)
    layout = public_layout(counts, config, real.info)
    trainer = dp_sgd_trainer(config, plan_dp.sigma, noise, expected_total(counts, config.sample_rate))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Full backward hook is firing")
        buffer = load_or_train_experts(real, config.expert_config(), trainer=trainer,
                                       tag=config.cache_tag(plan_dp.sigma), directory=config.expert_cache or None,
                                       persist=config.expert_cache is not None, device=config.device)
    # From here on only the buffer and the noisy layout are used: post-processing.
    syn = distill_from_experts(layout, config, buffer, callback=callback)
    return syn.with_meta(privacy=plan_dp.meta(count_sigma=config.count_sigma))
