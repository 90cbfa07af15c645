"""What every distillation method shares: common settings, initialisation, real-batch sampling."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..augment import DEFAULT_STRATEGY, DSA
from ..data import LabeledImages
from ..networks import seeded_network
from ..parameterize import (RHO_COMPOSES, Parameterization, check_options, decoded_per_base,
                            make_parameterization, real_per_base)
from ..synthetic import SetMetadata, SyntheticSet
from ..progress import progress

INITS = ("real", "noise")
Callback = Callable[[int, float], None]  # (iteration, loss) after each outer iteration


@dataclass(frozen=True)
class MethodConfig:
    """Settings every method has. Subclasses add their own fields and set ``method``."""

    ipc: int = 10
    iterations: int = 200
    init: str = "real"
    seed: int = 0
    device: str = "cpu"
    arch: str = "convnet"
    arch_kwargs: dict = field(default_factory=dict)
    progress: bool = False
    # FedDM-style iterative federation: start every matching network from this state (the
    # global model) instead of a fresh random one, perturbed by Gaussian noise of
    # ``embedder_noise`` x each tensor's std so that iterations still see different networks.
    embedder_state: dict | None = field(default=None, compare=False, repr=False)
    embedder_noise: float = 0.1
    # KIP-rho corruption: this fraction of every image's pixels is frozen random noise.
    rho: float = 0.0
    # What is optimised and stored (distill/parameterize.py): "pixels", or a factorised set
    # ("idc", "haba", "latent") where ``ipc`` counts stored bases per class, each decoding to
    # several images; ``param_kwargs`` are its options (e.g. {"factor": 2}).
    param: str = "pixels"
    param_kwargs: dict = field(default_factory=dict)
    # Wall-clock budget for the outer loop: stop after the iteration that crosses it and ship
    # what is there (a client with a round deadline, a benchmark with a device lease). The
    # set's metadata records the iterations actually run.
    time_limit_s: float | None = None
    method: str = "base"

    def __post_init__(self) -> None:
        if self.ipc < 1:
            raise ValueError(f"ipc must be >= 1, got {self.ipc}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not 0.0 <= self.rho < 1.0:
            raise ValueError(f"rho must be in [0, 1), got {self.rho}")
        check_options(self.param, self.param_kwargs)
        if self.rho > 0 and self.param not in RHO_COMPOSES:
            raise ValueError(f"rho > 0 does not compose with param {self.param!r} (learned networks remap "
                             f"every stored pixel); use one of {RHO_COMPOSES}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0 or None, got {self.time_limit_s}")


@dataclass(frozen=True)
class MatchingConfig(MethodConfig):
    """Settings of the methods that move images to match statistics of real batches."""

    lr_img: float = 1.0
    momentum: float = 0.5
    batch_real: int = 256
    dsa: bool = True
    dsa_strategy: str = DEFAULT_STRATEGY

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lr_img > 0 or self.batch_real < 1:
            raise ValueError(f"lr_img must be > 0 and batch_real >= 1, got {self.lr_img}, {self.batch_real}")
        check_matching(self.momentum, self.dsa_strategy)


def check_matching(momentum: float, dsa_strategy: str) -> None:
    """SGD momentum in [0, 1) and a DSA strategy of known operations: refused when the config is
    built (at the server, for a federated task), not when the optimiser is."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    DSA(dsa_strategy)  # raises on unknown operations


@dataclass
class SyntheticPlan:
    """The synthetic images under optimisation (through a parameterisation) and their classes."""

    param: Parameterization  # what the optimiser updates; ``images()`` decodes
    labels: torch.Tensor     # int64 [N], one per decoded image
    classes: list[int]       # classes present in the real data
    slices: dict[int, slice]  # rows of each class in ``images`` (decoded)

    def parameters(self) -> list[torch.Tensor]:
        return self.param.parameters()

    def images(self) -> torch.Tensor:
        return self.param.images()


def init_synthetic(real: LabeledImages, config: MethodConfig, gen: torch.Generator) -> SyntheticPlan:
    """``min(ipc, n_c)`` stored images (bases) for each class c present in ``real``, from real
    samples or noise, decoded through ``config.param``.

    Capping at ``n_c`` keeps a barely-held class from being spread over more synthetic images
    than it has real ones; classes absent from ``real`` get none. A factorised base starts from
    ``real_per_base`` real images (IDC: one per tile), drawn without repetition while the class
    has enough. Labels and slices are those of the decoded images (base-major, so per class
    contiguous).
    """
    per_real = real_per_base(config.param, config.param_kwargs)
    per_out = decoded_per_base(config.param, config.param_kwargs)
    rows, labels, slices, classes = [], [], {}, []
    start = 0
    for c, idx in enumerate(real.class_indices()):
        k = min(config.ipc, len(idx))
        if k == 0:
            continue
        if config.init == "real":
            pick = _real_picks(idx, k * per_real, gen)
            rows.append(real.images[pick.to(real.images.device)].detach().cpu().clone())
        else:
            rows.append(torch.randn(k * per_real, *real.info.image_shape, generator=gen))
        labels.append(torch.full((k * per_out,), c, dtype=torch.long))
        slices[c] = slice(start, start + k * per_out)
        classes.append(c)
        start += k * per_out
    if not rows:
        raise ValueError("real data is empty: nothing to distill")
    param = make_parameterization(torch.cat(rows).to(config.device), config.rho, gen,
                                  config.param, config.param_kwargs)
    return SyntheticPlan(param, torch.cat(labels).to(config.device), classes, slices)


def _real_picks(idx: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` of a class's real indices, without repetition while the class has enough."""
    order = torch.cat([torch.randperm(len(idx), generator=gen) for _ in range(-(-n // len(idx)))])
    return idx[order[:n]]


def initial_sources(real: LabeledImages, config: MethodConfig) -> torch.Tensor:
    """For a real-initialised pixel set: the index into ``real`` each synthetic image starts from,
    in the set's row order.

    Every method seeds ``generator(config.seed)`` and calls :func:`init_synthetic` first, so this
    replays its draws; an attacker who controls distillation (``attacks.doorping``) uses it to find
    the synthetic images that started as its poisoned real ones.
    """
    if config.init != "real" or config.param != "pixels":
        raise ValueError(f"sources exist for init='real' and param='pixels' only, got {config.init!r}, {config.param!r}")
    gen = generator(config.seed)
    picks = [_real_picks(idx, min(config.ipc, len(idx)), gen) for idx in real.class_indices() if len(idx)]
    if not picks:
        raise ValueError("real data is empty: nothing to distill")
    return torch.cat(picks)


class RealSampler:
    """Random per-class batches of real data, drawn from a seeded generator."""

    def __init__(self, real: LabeledImages, device: str, gen: torch.Generator) -> None:
        self.images = real.images.to(device)
        self.by_class = [idx.to(device) for idx in real.class_indices()]
        self.gen = gen

    def class_batch(self, c: int, n: int) -> torch.Tensor:
        idx = self.by_class[c]
        pick = torch.randperm(len(idx), generator=self.gen)[:n].to(idx.device)
        return self.images[idx[pick]]


def make_network(config: MethodConfig, real: LabeledImages, seed: int) -> torch.nn.Module:
    """A fresh random network, or the configured embedder state plus seeded noise."""
    info = real.info
    net = seeded_network(config.arch, info.channels, info.num_classes, (info.height, info.width),
                         seed=seed, device=config.device, **config.arch_kwargs)
    if config.embedder_state is not None:
        net.load_state_dict(config.embedder_state)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for t in net.parameters():
                if config.embedder_noise > 0 and t.numel() > 1:
                    noise = torch.randn(t.shape, generator=gen).to(t.device)
                    t.add_(noise * config.embedder_noise * t.std())
    return net


class OuterLoop:
    """The outer iterations behind a progress bar, cut short when ``time_limit_s`` runs out.

    At least one iteration always runs; ``done`` counts those that finished.
    """

    def __init__(self, config: MethodConfig, desc: str) -> None:
        self.bar = progress(range(config.iterations), desc, config.progress)
        limit = config.time_limit_s
        self.deadline = None if limit is None else time.monotonic() + limit
        self.done = 0

    def __iter__(self) -> Iterator[int]:
        try:
            for it in self.bar:
                if it > 0 and self.deadline is not None and time.monotonic() >= self.deadline:
                    break
                yield it
                self.done = it + 1
        finally:
            self.bar.close()

    def set_postfix(self, **values: object) -> None:
        self.bar.set_postfix(**values)


def finish(plan: SyntheticPlan, real: LabeledImages, config: MethodConfig, *,
           soft_labels: torch.Tensor | None = None, lr: float | None = None,
           iterations: int | None = None, **extra) -> SyntheticSet:
    """Package the optimised images as a :class:`SyntheticSet` with provenance metadata.

    ``soft_labels`` (float32 [N, K] distributions) replace the hard labels when a method learns
    them; ``lr`` is a learned training learning rate to ship with the set; ``iterations`` is
    how many outer iterations ran (default: all configured).
    """
    privacy = {"rho": config.rho} if config.rho > 0 else {}
    if config.param != "pixels":
        extra = {"param": config.param, **extra}
    meta = SetMetadata(dataset=real.info, method=config.method, ipc=config.ipc, seed=config.seed,
                       iterations=config.iterations if iterations is None else iterations,
                       privacy=privacy, extra={"init": config.init, **extra})
    labels = plan.labels.cpu().clone() if soft_labels is None else soft_labels.detach().float().cpu().clone()
    factors = plan.param.factors()
    if factors is not None:
        return SyntheticSet.from_factors(factors, labels, meta, lr=lr)
    return SyntheticSet(plan.images().detach().cpu().clone(), labels, meta, lr=lr)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
