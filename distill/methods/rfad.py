"""RFAD: random-feature approximation distillation (Loo, Hasani, Amini & Rus, NeurIPS 2022).

KIP with the ConvNet's exact NNGP kernel costs O(|S|^2) network evaluations; RFAD replaces it
by random features: ``n_models`` freshly drawn random ConvNets per iteration, whose scaled
embeddings concatenated give ``phi`` with ``phi(x) . phi(y)`` ~ NNGP(x, y). Each image then
costs one forward pass per network, and the ridge regression runs in whichever of its dual
or primal forms is cheaper (:func:`distill.kernels.krr_predict_features`), so time and
memory grow linearly in |S| once |S| exceeds the feature count. The loss is KIP's squared
error, or (``loss="platt"``, the paper's choice for classification) cross-entropy of the
KRR predictions scaled by a learned temperature (Platt scaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import LabeledImages
from ..kernels import krr_predict_features, krr_squared_error, random_network_features
from ..synthetic import SyntheticSet
from .base import Callback, OuterLoop, RealSampler, finish, generator, init_synthetic, make_network
from .kip import KRRConfig, image_and_label_groups, real_batch, support_targets

LOSSES = ("platt", "mse")


@dataclass(frozen=True)
class RFADConfig(KRRConfig):
    """RFAD settings: ``n_models`` random networks per iteration; ``loss`` "platt" or "mse";
    ``platt_init``: starting temperature of the Platt scaling (learned, log-parameterised)."""

    n_models: int = 4
    loss: str = "platt"
    platt_init: float = 10.0
    learn_labels: bool = False
    method: str = "rfad"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_models < 1 or self.loss not in LOSSES or not self.platt_init > 0:
            raise ValueError(f"need n_models >= 1, loss in {LOSSES}, platt_init > 0; got {self.n_models}, "
                             f"{self.loss!r}, {self.platt_init}")


def rfad_loss(pred: torch.Tensor, real_y: torch.Tensor, num_classes: int, log_temp: torch.Tensor | None) -> torch.Tensor:
    """Platt-scaled cross-entropy ``CE(exp(log_temp) * pred, y)``, or KIP's squared error."""
    if log_temp is not None:
        return F.cross_entropy(log_temp.exp() * pred, real_y)
    return krr_squared_error(pred, real_y, num_classes)


def distill(real: LabeledImages, config: RFADConfig, *, callback: Callback | None = None) -> SyntheticSet:
    gen = generator(config.seed)
    plan = init_synthetic(real, config, gen)
    sampler = RealSampler(real, config.device, gen)
    k = real.info.num_classes
    labels, groups = image_and_label_groups(plan, config, k)
    log_temp = None
    if config.loss == "platt":
        log_temp = torch.tensor(math.log(config.platt_init), device=config.device, requires_grad=True)
        groups.append({"params": [log_temp], "lr": config.lr_labels})
    opt = torch.optim.Adam(groups)
    bar = OuterLoop(config, "RFAD")
    for it in bar:
        base = (config.seed * 100_003 + it) * 64
        nets = [make_network(config, real, seed=base + m).requires_grad_(False) for m in range(config.n_models)]
        real_x, real_y = real_batch(sampler, plan, config.batch_real)
        with torch.no_grad():
            phi_t = random_network_features(nets, real_x)
        phi_s = random_network_features(nets, plan.images())
        pred = krr_predict_features(phi_t, phi_s, support_targets(plan, labels, k), config.reg)
        loss = rfad_loss(pred, real_y, k, log_temp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if callback is not None:
            callback(it, loss.item())
    soft = labels.export() if labels is not None else None
    extra = {"platt_temperature": float(log_temp.detach().exp())} if log_temp is not None else {}
    return finish(plan, real, config, iterations=bar.done, soft_labels=soft, loss=config.loss, **extra)
