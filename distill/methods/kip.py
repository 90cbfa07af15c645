"""KIP: kernel inducing points (Nguyen, Chen & Lee, ICLR 2021; Nguyen et al., NeurIPS 2021).

The synthetic set is the support of a kernel ridge regressor; each iteration scores it on a
batch of real data (the survey's eq. 8, ``1/2 ||y_t - K_ts (K_ss + lambda I)^-1 y_s||^2``) and
moves the images, and optionally the labels, down the gradient. The kernel is the ConvNet's
NNGP by random features (a fresh random network each iteration, ``n_models`` of them) or the
empirical NTK of a fresh random network (``kernel="ntk"``; heavier: per-sample parameter
gradients with double backward). The reference code uses the exact infinite-width kernels
of neural-tangents (JAX); here both are Monte-Carlo estimates of them, in torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..data import LabeledImages
from ..kernels import (empirical_ntk_features, krr_predict_features, krr_squared_error, one_hot_targets,
                       random_network_features)
from ..labels import LabelLogits
from ..synthetic import SyntheticSet
from .base import (Callback, OuterLoop, MethodConfig, RealSampler, SyntheticPlan, finish, generator,
                   init_synthetic, make_network)

KERNELS = ("nngp", "ntk")
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class KRRConfig(MethodConfig):
    """Settings shared by the kernel-ridge-regression methods (KIP, RFAD, FRePo).

    ``lr_img``/``lr_labels``: Adam learning rates for the images and label logits;
    ``batch_real``: real images scored per iteration (spread evenly over the classes);
    ``reg``: ridge as a fraction of the mean kernel diagonal; ``learn_labels``: learn soft
    labels (stored as distributions) instead of keeping the one-hot classes.
    """

    lr_img: float = 0.01
    lr_labels: float = 0.01
    batch_real: int = 256
    reg: float = 1e-4
    learn_labels: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.lr_img > 0 and self.lr_labels > 0 and self.reg >= 0) or self.batch_real < 1:
            raise ValueError(f"need lr_img, lr_labels > 0, reg >= 0, batch_real >= 1; got {self.lr_img}, "
                             f"{self.lr_labels}, {self.reg}, {self.batch_real}")


@dataclass(frozen=True)
class KIPConfig(KRRConfig):
    """KIP settings: ``kernel`` "nngp" (random features of ``n_models`` networks) or "ntk"."""

    kernel: str = "nngp"
    n_models: int = 1
    method: str = "kip"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel not in KERNELS or self.n_models < 1:
            raise ValueError(f"kernel must be one of {KERNELS} and n_models >= 1, got {self.kernel!r}, {self.n_models}")


def real_batch(sampler: RealSampler, plan: SyntheticPlan, batch_real: int) -> tuple[torch.Tensor, torch.Tensor]:
    """About ``batch_real`` real images, balanced over the classes the plan holds, and their labels."""
    per_class = max(1, batch_real // len(plan.classes))
    xs = [sampler.class_batch(c, per_class) for c in plan.classes]
    ys = [torch.full((len(x),), c, dtype=torch.long, device=x.device) for c, x in zip(plan.classes, xs)]
    return torch.cat(xs), torch.cat(ys)


def image_and_label_groups(plan: SyntheticPlan, config: KRRConfig,
                           num_classes: int) -> tuple[LabelLogits | None, list[dict]]:
    """Learnable labels (when configured) and the optimiser groups for images and labels."""
    labels = LabelLogits(plan.labels, num_classes) if config.learn_labels else None
    groups = [{"params": plan.parameters(), "lr": config.lr_img}]
    if labels is not None:
        groups.append({"params": labels.parameters(), "lr": config.lr_labels})
    return labels, groups


def support_targets(plan: SyntheticPlan, labels: LabelLogits | None, num_classes: int) -> torch.Tensor:
    """Regression targets of the synthetic images: learned distributions or one-hot, centred."""
    if labels is None:
        return one_hot_targets(plan.labels, num_classes)
    return labels.probs() - 1.0 / num_classes


def kernel_features(config: KIPConfig, real: LabeledImages, seed: int) -> FeatureFn:
    """This iteration's feature map: ``phi(x) . phi(y)`` is the (estimated) kernel."""
    nets = [make_network(config, real, seed=seed + m) for m in range(config.n_models)]
    for net in nets:
        net.requires_grad_(False)
    if config.kernel == "ntk":
        return lambda x: empirical_ntk_features(nets[0], x)
    return lambda x: random_network_features(nets, x)


def krr_loss(phi: FeatureFn, images: torch.Tensor, y_s: torch.Tensor, real_x: torch.Tensor,
             real_y: torch.Tensor, num_classes: int, reg: float) -> torch.Tensor:
    """Eq. 8: mean over real rows of half the squared error of the KRR prediction."""
    with torch.no_grad():
        phi_t = phi(real_x)
    pred = krr_predict_features(phi_t, phi(images), y_s, reg)
    return krr_squared_error(pred, real_y, num_classes)


def distill(real: LabeledImages, config: KIPConfig, *, callback: Callback | None = None) -> SyntheticSet:
    gen = generator(config.seed)
    plan = init_synthetic(real, config, gen)
    sampler = RealSampler(real, config.device, gen)
    k = real.info.num_classes
    labels, groups = image_and_label_groups(plan, config, k)
    opt = torch.optim.Adam(groups)
    bar = OuterLoop(config, "KIP")
    for it in bar:
        phi = kernel_features(config, real, seed=(config.seed * 100_003 + it) * 16)
        real_x, real_y = real_batch(sampler, plan, config.batch_real)
        loss = krr_loss(phi, plan.images(), support_targets(plan, labels, k), real_x, real_y, k, config.reg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if callback is not None:
            callback(it, loss.item())
    soft = labels.export() if labels is not None else None
    return finish(plan, real, config, iterations=bar.done, soft_labels=soft, kernel=config.kernel)
