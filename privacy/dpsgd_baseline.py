"""The baseline a user would run instead: the network itself trained with DP-SGD (Abadi et al. 2016).

Opacus's front door does everything: ``PrivacyEngine.make_private_with_epsilon`` calibrates
sigma for (epsilon, delta) over the planned epochs, wraps the model for per-sample gradients,
clips and noises in the optimiser and Poisson-samples the batches. A DP synthetic set must be
compared with this at equal (epsilon, delta) on the same data.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from distill.data import LabeledImages
from distill.networks import seeded_network

from .accounting import ACCOUNTANTS
from .randomness import noise_generator


@dataclass(frozen=True)
class DPSGDConfig:
    """DP-SGD training settings; defaults are the notes' baseline (ConvNet width 32, 15 epochs)."""

    epsilon: float = 8.0
    delta: float = 1e-5
    clip: float = 1.0
    epochs: int = 15
    batch_size: int = 256
    lr: float = 0.5
    momentum: float = 0.0
    arch: str = "convnet"
    arch_kwargs: dict = field(default_factory=lambda: {"width": 32})
    accountant: str = "rdp"
    seed: int = 0
    device: str = "cpu"
    insecure_reproducible_noise: bool = False  # tests only: noise replayable from ``seed``

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon must be finite and > 0, got {self.epsilon}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or not self.clip > 0:
            raise ValueError(f"epochs, batch_size, lr and clip must be positive: {self}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; known: {list(ACCOUNTANTS)}")


@dataclass(frozen=True)
class DPSGDResult:
    """The trained network (plain ``nn.Module``, hooks removed) and what it spent."""

    net: torch.nn.Module
    epsilon: float
    delta: float
    sigma: float
    sample_rate: float
    steps: int
    accountant: str


def train_dpsgd(train: LabeledImages, config: DPSGDConfig) -> DPSGDResult:
    """Train a fresh seeded network on ``train`` with Opacus DP-SGD at ``config.epsilon``."""
    info = train.info
    net = seeded_network(config.arch, info.channels, info.num_classes, (info.height, info.width),
                         seed=config.seed, device=config.device, **config.arch_kwargs)
    # Opacus's DPDataLoader Poisson-samples with this loader's generator: secret, like the noise.
    sampling = noise_generator(config.seed + 1, config.insecure_reproducible_noise)
    loader = DataLoader(TensorDataset(train.images, train.labels), batch_size=config.batch_size,
                        shuffle=True, generator=sampling)
    opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Secure RNG turned off")  # documented in docs/privacy.md
        warnings.filterwarnings("ignore", "Optimal order is the largest alpha")  # calibration's search
        engine = PrivacyEngine(accountant=config.accountant)
        model, opt, loader = engine.make_private_with_epsilon(
            module=net, optimizer=opt, data_loader=loader, target_epsilon=config.epsilon,
            target_delta=config.delta, epochs=config.epochs, max_grad_norm=config.clip,
            noise_generator=noise_generator(config.seed, config.insecure_reproducible_noise, config.device))
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Full backward hook is firing")
        for _ in range(config.epochs):
            for xb, yb in loader:  # Poisson batches: size varies around q * N
                loss = F.cross_entropy(model(xb.to(config.device)), yb.to(config.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    steps = sum(n for _, _, n in engine.accountant.history)
    return DPSGDResult(net=model.to_standard_module().eval(), epsilon=float(engine.get_epsilon(config.delta)),
                       delta=config.delta, sigma=float(opt.noise_multiplier),
                       sample_rate=float(loader.sample_rate), steps=int(steps), accountant=config.accountant)
