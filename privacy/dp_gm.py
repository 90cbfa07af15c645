"""DP gradient matching: the real-data gradient of DC is a DP-SGD gradient (PSG, Chen et al. 2022).

Per outer step the matching network's gradient on a Poisson-sampled, mixed-class real batch is
computed per example by Opacus's ``GradSampleModule`` (on a separate copy of the network, so the
synthetic gradient never runs through Opacus's hooks), each example's gradient is clipped to
``clip`` over all parameters, the sum gets ``N(0, sigma^2 clip^2)`` and is divided by the
expected batch size ``q * N`` (as Opacus's DPOptimizer; Abadi et al. 2016), with ``N`` the
noisy total of the released class counts: the exact size of the private data is never used. That is one
accountant step. The synthetic images then move ``reuse`` times to match it (DC's layer-wise
cosine distance; free: post-processing), and the network trains on the synthetic set.
Recomputing a gradient at new weights is a new query: every outer step draws a fresh sample.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from opacus import GradSampleModule

from distill.augment import DSA
from distill.data import LabeledImages
from distill.losses import gradient_match_distance
from distill.methods.base import Callback, finish, generator, init_synthetic, make_network
from distill.synthetic import SyntheticSet

from .config import DPConfig, privacy_plan, refuse_coupling_layers
from .layout import class_counts, expected_total, public_layout
from .noise import clip_and_sum_grad_samples, gaussian_noise, poisson_sample
from .randomness import noise_generator
from distill.progress import progress


@dataclass(frozen=True)
class DPGMConfig(DPConfig):
    """DP gradient-matching settings: ``iterations`` networks x ``outer_loop`` noisy gradients each."""

    lr_img: float = 0.1
    lr_net: float = 0.01
    outer_loop: int = 10
    inner_loop: int = 10
    chunk: int = 64
    method: str = "dpsgd-gm"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.outer_loop < 1 or self.inner_loop < 0 or self.chunk < 1 or not self.lr_net > 0:
            raise ValueError(f"outer_loop and chunk must be >= 1, inner_loop >= 0, lr_net > 0; got "
                             f"{self.outer_loop}, {self.inner_loop}, {self.chunk}, {self.lr_net}")

    @property
    def queries(self) -> int:
        return self.iterations * self.outer_loop


class StepSettings(Protocol):
    """What one DP-SGD gradient needs from a config (DP gradient matching, DP experts)."""

    sample_rate: float
    clip: float
    chunk: int


def noisy_gradient(gsm: GradSampleModule, real: LabeledImages, config: StepSettings, sigma: float,
                   augment, noise: torch.Generator, expected: float) -> list[torch.Tensor]:
    """One DP-SGD gradient of the mean cross-entropy at ``gsm``'s weights (one accountant step).

    ``noise`` (the secret generator) draws the Poisson sample and the noise; ``expected`` is the
    public divisor ``q * N`` (:func:`privacy.layout.expected_total`), never the exact ``q * n``.
    """
    params = [p for p in gsm.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p) for p in params]
    idx = poisson_sample(len(real), config.sample_rate, noise).to(real.images.device)
    for part in idx.split(config.chunk):  # chunks bound the memory of per-example gradients
        x, y = augment(real.images[part]), real.labels[part]
        with warnings.catch_warnings():  # torch notes that the real images need no gradient: right
            warnings.filterwarnings("ignore", "Full backward hook is firing")
            F.cross_entropy(gsm(x), y, reduction="sum").backward()
        for s, g in zip(sums, clip_and_sum_grad_samples([p.grad_sample for p in params], config.clip)):
            s.add_(g)
        gsm.zero_grad(set_to_none=True)  # also clears grad_sample
    return [(s + gaussian_noise(s.shape, sigma * config.clip, noise, s.device)) / expected for s in sums]


def _train_on_synthetic(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        config: DPGMConfig, augment) -> None:
    """DC's inner loop: a few full-batch steps of the network on the (detached) synthetic set."""
    opt = torch.optim.SGD(net.parameters(), lr=config.lr_net)
    for _ in range(config.inner_loop):
        loss = F.cross_entropy(net(augment(images.detach())), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def distill(real: LabeledImages, config: DPGMConfig, *, callback: Callback | None = None) -> SyntheticSet:
    plan_dp = privacy_plan(config)
    gen = generator(config.seed)  # public: initialisation, networks, DSA
    noise = noise_generator(config.seed, config.insecure_reproducible_noise)  # secret: sampling, noise
    counts = class_counts(real, config, noise)
    expected = expected_total(counts, config.sample_rate)
    plan = init_synthetic(public_layout(counts, config, real.info), config, gen)
    real = real.to(config.device)
    dsa = DSA(config.dsa_strategy) if config.dsa else None
    h, w = real.info.image_shape[1:]
    opt = torch.optim.SGD(plan.parameters(), lr=config.lr_img, momentum=config.momentum)
    bar = progress(range(config.iterations), "DP-GM", config.progress)
    for it in bar:
        net = refuse_coupling_layers(make_network(config, real, seed=config.seed * 100_003 + it), config.method)
        params = list(net.parameters())
        gsm = GradSampleModule(copy.deepcopy(net), loss_reduction="sum")
        total = 0.0
        for ol in range(config.outer_loop):
            gsm._module.load_state_dict(net.state_dict())
            draw = dsa.sample(1, h, w, gen) if dsa is not None else None

            def augment(x: torch.Tensor) -> torch.Tensor:  # one siamese draw for real and synthetic
                zeros = torch.zeros(x.shape[0], dtype=torch.long)
                return dsa.apply(x, draw.select(zeros)) if dsa is not None else x

            g_real = noisy_gradient(gsm, real, config, plan_dp.sigma, augment, noise, expected)
            for _ in range(config.reuse):
                syn = augment(plan.images())
                g_syn = torch.autograd.grad(F.cross_entropy(net(syn), plan.labels), params, create_graph=True)
                loss = gradient_match_distance(g_syn, g_real)
                img_params = plan.parameters()
                for p, g in zip(img_params, torch.autograd.grad(loss, img_params)):
                    p.grad = g
                opt.step()
                total += loss.item()
            if ol < config.outer_loop - 1:
                _train_on_synthetic(net, plan.images(), plan.labels, config, augment)
        value = total / (config.outer_loop * config.reuse)
        bar.set_postfix(loss=f"{value:.4f}")
        if callback is not None:
            callback(it, value)
    syn_set = finish(plan, real, config, outer_loop=config.outer_loop, inner_loop=config.inner_loop,
                     reuse=config.reuse)
    return syn_set.with_meta(privacy=plan_dp.meta(count_sigma=config.count_sigma))
