"""DP-DM: distribution matching (Zhao & Bilen, WACV 2023) under example-level DP.

Each iteration draws a fresh random network and a Poisson sample of the client's data; the
real side of DM's loss becomes a Gaussian mechanism: per-example embeddings row-clipped to
``clip``, summed per class, ``N(0, sigma^2 clip^2)`` added to every class's sum, divided by the
*expected* class count ``q * n_c`` (never the actual Poisson count, as Opacus's DPOptimizer does).
The class counts ``n_c`` are private too: they are released once with noise ``count_sigma``
(:mod:`privacy.layout`), which also decides which classes get synthetic images, and that
release joins the same accountant. Synthetic images start from noise and their embeddings are clipped the same way,
so both sides of the loss live in the same space. Everything after the noisy releases is
post-processing; ``reuse`` synthetic updates per release cost nothing more. Sampling and noise
come from the node's secret generator (:mod:`privacy.randomness`); the networks, DSA draws and
the noise initialisation stay seeded by the public seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.augment import DSA
from distill.data import LabeledImages
from distill.losses import class_means, mean_embedding_distance
from distill.methods.base import Callback, finish, generator, init_synthetic, make_network
from distill.networks import embed_in_chunks
from distill.synthetic import SyntheticSet

from .config import DPConfig, privacy_plan, refuse_coupling_layers
from .layout import class_counts, public_layout
from .noise import clip_rows, noisy_class_sums, poisson_sample
from .randomness import noise_generator
from distill.progress import progress


@dataclass(frozen=True)
class DPDMConfig(DPConfig):
    """DP-DM settings.

    ``lr_img`` is 100, not DM's 1: clipping to ``clip = 1`` scales the embeddings (norm ~15-20
    for the ConvNet) down, and the loss with them by their squared norm.
    """

    lr_img: float = 100.0
    method: str = "dp-dm"


def noisy_real_means(net: torch.nn.Module, real: LabeledImages, counts: torch.Tensor,
                     config: DPDMConfig, sigma: float, dsa: DSA | None, draw,
                     noise: torch.Generator) -> torch.Tensor:
    """One DP release: ``[K, D]`` noisy class means of clipped embeddings of a Poisson sample.

    ``noise`` (secret) draws the sample and the noise; ``draw`` (DSA, public) only augments.
    """
    k = real.info.num_classes
    idx = poisson_sample(len(real), config.sample_rate, noise).to(real.images.device)
    x, y = real.images[idx], real.labels[idx].to(real.images.device)
    if dsa is not None and len(idx):
        x = dsa.apply(x, draw.select(y))
    dim = net.embed(real.images[:1]).shape[1]
    feats = embed_in_chunks(net, x) if len(idx) else x.new_zeros(0, dim)
    sums = noisy_class_sums(feats, y, k, config.clip, sigma, noise)
    expected = (config.sample_rate * counts.clamp_min(1.0)).to(sums.device)
    return sums / expected[:, None]


def distill(real: LabeledImages, config: DPDMConfig, *, callback: Callback | None = None) -> SyntheticSet:
    plan_dp = privacy_plan(config)
    gen = generator(config.seed)  # public: initialisation, networks, DSA
    noise = noise_generator(config.seed, config.insecure_reproducible_noise)  # secret: sampling, noise
    counts = class_counts(real, config, noise)
    plan = init_synthetic(public_layout(counts, config, real.info), config, gen)
    real = real.to(config.device)
    kept = torch.as_tensor(plan.classes, device=config.device)
    dsa = DSA(config.dsa_strategy) if config.dsa else None
    opt = torch.optim.SGD(plan.parameters(), lr=config.lr_img, momentum=config.momentum)
    k, (h, w) = real.info.num_classes, real.info.image_shape[1:]
    bar = progress(range(plan_dp.steps), "DP-DM", config.progress)
    for it in bar:
        net = refuse_coupling_layers(make_network(config, real, seed=config.seed * 100_003 + it), config.method)
        for p in net.parameters():
            p.requires_grad_(False)
        draw = dsa.sample(k, h, w, gen) if dsa is not None else None
        with torch.no_grad():
            target = noisy_real_means(net, real, counts, config, plan_dp.sigma, dsa, draw, noise)[kept]
        for _ in range(config.reuse):
            syn = plan.images()
            if dsa is not None:
                syn = dsa.apply(syn, draw.select(plan.labels))
            syn_means = class_means(clip_rows(net.embed(syn), config.clip), plan.labels, k)[kept]
            loss = mean_embedding_distance(target, syn_means)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        value = loss.item() / len(plan.classes)
        bar.set_postfix(loss=f"{value:.4f}")
        if callback is not None:
            callback(it, value)
    syn_set = finish(plan, real, config, reuse=config.reuse, count_sigma=config.count_sigma)
    return syn_set.with_meta(privacy=plan_dp.meta(count_sigma=config.count_sigma))
