"""FRePo: neural feature regression with pooling (Zhou, Nezhadarya & Ba, NeurIPS 2022).

Kernel ridge regression on the conjugate kernel ``K = f(x) f(y)^T`` of a *trained* network's
features ``f`` (its embedding before the classifier). A pool of ``pool_size`` networks is
trained online on the synthetic set itself: each iteration picks one, holds its feature
extractor fixed for ``syn_steps`` updates of the images (and labels) through the KRR loss on
a real batch, then trains it one step on the synthetic set. A network is re-initialised
after ``max_online_steps`` steps, so the pool always spans early and late training; the
pool starts staggered over that range. Only the last layer's solution is closed-form, so no
unrolled inner loop is needed: the cost per iteration is one forward/backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import LabeledImages
from ..kernels import krr_predict_features, krr_squared_error
from ..networks import embed_in_chunks
from ..synthetic import SyntheticSet
from .base import Callback, OuterLoop, RealSampler, finish, generator, init_synthetic, make_network
from .kip import KRRConfig, image_and_label_groups, real_batch, support_targets


@dataclass(frozen=True)
class FRePoConfig(KRRConfig):
    """FRePo settings: the model pool (size, lifetime in online steps, SGD learning rate of its
    online training) and ``syn_steps``, image updates per fixed feature extractor."""

    pool_size: int = 10
    max_online_steps: int = 100
    lr_net: float = 0.01
    syn_steps: int = 1
    method: str = "frepo"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool_size < 1 or self.max_online_steps < 1 or self.syn_steps < 1 or not self.lr_net > 0:
            raise ValueError(f"need pool_size, max_online_steps, syn_steps >= 1 and lr_net > 0; got "
                             f"{self.pool_size}, {self.max_online_steps}, {self.syn_steps}, {self.lr_net}")


class ModelPool:
    """Networks trained online on the synthetic set, each reborn after ``lifetime`` steps."""

    def __init__(self, config: FRePoConfig, real: LabeledImages) -> None:
        self.config, self.real = config, real
        self.births = 0
        self.nets = [self._new() for _ in range(config.pool_size)]
        self.opts = [torch.optim.SGD(n.parameters(), lr=config.lr_net, momentum=0.9) for n in self.nets]
        self.ages = [i * config.max_online_steps // config.pool_size for i in range(config.pool_size)]

    def _new(self) -> torch.nn.Module:
        self.births += 1
        return make_network(self.config, self.real, seed=self.config.seed * 100_003 + 7919 * self.births)

    def train_step(self, i: int, images: torch.Tensor, targets: torch.Tensor) -> None:
        """One SGD step of network ``i`` on the (detached) synthetic set; rebirth when too old."""
        loss = F.cross_entropy(self.nets[i](images.detach()), targets.detach())
        self.opts[i].zero_grad(set_to_none=True)
        loss.backward()
        self.opts[i].step()
        self.ages[i] += 1
        if self.ages[i] >= self.config.max_online_steps:
            self.nets[i] = self._new()
            self.opts[i] = torch.optim.SGD(self.nets[i].parameters(), lr=self.config.lr_net, momentum=0.9)
            self.ages[i] = 0


def feature_krr_loss(net: torch.nn.Module, images: torch.Tensor, y_s: torch.Tensor, real_x: torch.Tensor,
                     real_y: torch.Tensor, num_classes: int, reg: float) -> torch.Tensor:
    """KRR loss with the conjugate kernel of ``net``'s features (differentiable in images and y_s)."""
    phi_t = embed_in_chunks(net, real_x)
    pred = krr_predict_features(phi_t, net.embed(images), y_s, reg)
    return krr_squared_error(pred, real_y, num_classes)


def distill(real: LabeledImages, config: FRePoConfig, *, callback: Callback | None = None) -> SyntheticSet:
    gen = generator(config.seed)
    plan = init_synthetic(real, config, gen)
    sampler = RealSampler(real, config.device, gen)
    k = real.info.num_classes
    labels, groups = image_and_label_groups(plan, config, k)
    variables = plan.parameters() + (labels.parameters() if labels is not None else [])
    opt = torch.optim.Adam(groups)
    pool = ModelPool(config, real)
    bar = OuterLoop(config, "FRePo")
    for it in bar:
        i = int(torch.randint(config.pool_size, (1,), generator=gen))
        total = 0.0
        for _ in range(config.syn_steps):  # the feature extractor stays fixed meanwhile
            real_x, real_y = real_batch(sampler, plan, config.batch_real)
            loss = feature_krr_loss(pool.nets[i], plan.images(), support_targets(plan, labels, k),
                                    real_x, real_y, k, config.reg)
            opt.zero_grad(set_to_none=True)
            for v, g in zip(variables, torch.autograd.grad(loss, variables)):
                v.grad = g  # grads for the images/labels only, never the pool network
            opt.step()
            total += loss.item()
        train_targets = labels.probs() if labels is not None else plan.labels
        pool.train_step(i, plan.images(), train_targets)
        value = total / config.syn_steps
        bar.set_postfix(loss=f"{value:.4f}")
        if callback is not None:
            callback(it, value)
    soft = labels.export() if labels is not None else None
    return finish(plan, real, config, iterations=bar.done, soft_labels=soft, pool_size=config.pool_size)
