"""CAFE: condensing a dataset by aligning features (Wang et al., CVPR 2022).

Two losses move the synthetic images, both on class-wise statistics of a network's features:

- layer-wise feature alignment: at every block of the network (``block_outputs``), the mean
  feature of each class on the synthetic images matches the mean on a real batch (squared
  error, averaged over the layer's features, summed over classes and layers);
- discrimination: the synthetic class centres at the last layer act as a classifier of the
  real features (logits = real feature . synthetic centre), scored by cross-entropy against
  the real labels, so the synthetic set keeps the classes apart, not only their means.

The bi-level part, kept simple: each iteration draws a fresh network; ``outer_loop`` times the
images take one step on ``alignment + beta * discrimination``, then the network trains
``inner_loop`` SGD steps on the (augmented) synthetic set, so later steps match features of a
network that has started to learn, as CAFE's inner loop does (the paper also stops that inner
loop adaptively on a real-data check; here its length is fixed). DSA draws are siamese: one
draw per class, shared by that class's real and synthetic images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..augment import DSA, DSAParams
from ..data import LabeledImages
from ..losses import class_means
from ..synthetic import SyntheticSet
from .base import (Callback, MatchingConfig, OuterLoop, RealSampler, finish, generator,
                   init_synthetic, make_network)
from .kip import real_batch


@dataclass(frozen=True)
class CAFEConfig(MatchingConfig):
    """CAFE settings: ``beta`` weighs the discrimination loss; ``outer_loop`` image steps per
    network with ``inner_loop`` network steps (SGD ``lr_net``, batch ``batch_train``) between them;
    ``batch_real`` real images per image step, spread over the classes.

    ``lr_img`` 10 and ``beta`` 0.01 balance the two gradients on the default ConvNet: per pixel,
    the averaged alignment gradient is ~1e-5 and the unnormalised inner-product logits make the
    discrimination gradient ~1e-3 (real init, IPC 10). Chosen from gradient scales, not swept.
    """

    lr_img: float = 10.0
    batch_real: int = 640
    beta: float = 0.01
    outer_loop: int = 5
    inner_loop: int = 5
    lr_net: float = 0.01
    batch_train: int = 256
    method: str = "cafe"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.outer_loop < 1 or self.inner_loop < 0 or self.batch_train < 1:
            raise ValueError(f"need outer_loop >= 1, inner_loop >= 0, batch_train >= 1: {self}")
        if not self.lr_net > 0 or self.beta < 0:
            raise ValueError(f"need lr_net > 0 and beta >= 0, got {self.lr_net}, {self.beta}")


def layerwise_alignment(real_means: list[torch.Tensor], syn_means: list[torch.Tensor],
                        present: torch.Tensor) -> torch.Tensor:
    """Sum over layers and present classes of the mean squared gap between class-mean features."""
    total = syn_means[0].new_zeros(())
    for r, s in zip(real_means, syn_means):
        total = total + ((r[present] - s[present]) ** 2).mean(1).sum()
    return total


def discrimination_loss(real_features: torch.Tensor, real_labels: torch.Tensor, syn_centres: torch.Tensor,
                        present: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of real features classified by inner products with the synthetic class centres.

    ``syn_centres`` is ``[K, D]`` (rows of absent classes unused); ``real_labels`` must lie in
    ``present``.
    """
    position = torch.full((syn_centres.shape[0],), -1, dtype=torch.long, device=present.device)
    position[present] = torch.arange(len(present), device=present.device)
    logits = real_features @ syn_centres[present].T
    return F.cross_entropy(logits, position[real_labels])


@torch.no_grad()
def real_statistics(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                    chunk: int = 32) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-layer class means of the real batch and its last-layer features, in cache-sized chunks."""
    sums: list[torch.Tensor] = []
    last = []
    for xc, yc in zip(x.split(chunk), y.split(chunk)):
        blocks = [b.flatten(1) for b in net.block_outputs(xc)]
        if not sums:
            sums = [b.new_zeros(num_classes, b.shape[1]) for b in blocks]
        for s, b in zip(sums, blocks):
            s.index_add_(0, yc, b)
        last.append(blocks[-1])
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1).to(sums[0].dtype)[:, None]
    return [s / counts for s in sums], torch.cat(last)


def cafe_loss(net: torch.nn.Module, syn: torch.Tensor, syn_y: torch.Tensor, real: torch.Tensor,
              real_y: torch.Tensor, num_classes: int, beta: float, dsa: DSA | None,
              gen: torch.Generator) -> torch.Tensor:
    """CAFE's loss for one image step (differentiable in ``syn``), with siamese DSA."""
    if dsa is not None:
        draw: DSAParams = dsa.sample(num_classes, real.shape[2], real.shape[3], gen)
        real, syn = dsa.apply(real, draw.select(real_y)), dsa.apply(syn, draw.select(syn_y))
    real_means, real_last = real_statistics(net, real, real_y, num_classes)
    syn_blocks = [b.flatten(1) for b in net.block_outputs(syn)]
    syn_means = [class_means(b, syn_y, num_classes) for b in syn_blocks]
    present = torch.unique(syn_y)
    loss = layerwise_alignment(real_means, syn_means, present)
    if beta > 0:
        loss = loss + beta * discrimination_loss(real_last, real_y, syn_means[-1], present)
    return loss


def train_on_synthetic(net: torch.nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor,
                       labels: torch.Tensor, steps: int, batch: int, dsa: DSA | None,
                       gen: torch.Generator) -> None:
    """``steps`` SGD steps of the network on random (augmented) batches of the synthetic set."""
    x = images.detach()
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:batch].to(x.device)
        xb = dsa(x[idx], gen) if dsa is not None else x[idx]
        loss = F.cross_entropy(net(xb), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def distill(real: LabeledImages, config: CAFEConfig, *, callback: Callback | None = None) -> SyntheticSet:
    gen = generator(config.seed)
    plan = init_synthetic(real, config, gen)
    sampler = RealSampler(real, config.device, gen)
    dsa = DSA(config.dsa_strategy) if config.dsa else None
    opt_img = torch.optim.SGD(plan.parameters(), lr=config.lr_img, momentum=config.momentum)
    k = real.info.num_classes
    bar = OuterLoop(config, "CAFE")
    for it in bar:
        net = make_network(config, real, seed=config.seed * 100_003 + it)
        opt_net = torch.optim.SGD(net.parameters(), lr=config.lr_net)
        total = 0.0
        for ol in range(config.outer_loop):
            real_x, real_y = real_batch(sampler, plan, config.batch_real)
            loss = cafe_loss(net, plan.images(), plan.labels, real_x, real_y, k, config.beta, dsa, gen)
            params = plan.parameters()  # image gradients only: the network moves in its own loop
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g
            opt_img.step()
            total += loss.item()
            if ol < config.outer_loop - 1 and config.inner_loop > 0:
                train_on_synthetic(net, opt_net, plan.images(), plan.labels, config.inner_loop,
                                   config.batch_train, dsa, gen)
        value = total / config.outer_loop
        bar.set_postfix(loss=f"{value:.4f}")
        if callback is not None:
            callback(it, value)
    return finish(plan, real, config, iterations=bar.done, beta=config.beta,
                  outer_loop=config.outer_loop, inner_loop=config.inner_loop)
