"""Expert trajectories for MTT: networks trained on real data, parameters saved every epoch.

An :class:`ExpertBuffer` holds ``E`` experts' flattened parameters after each of ``T`` epochs
(and at the start), float32 ``[E, T + 1, P]``, with the layout (parameter names and shapes) and
the settings that made it. It is stored as one ``.npz`` read with ``allow_pickle=False``
(metadata as JSON in a unicode array, as :mod:`distill.synthetic` does) and cached per
(dataset fingerprint, network, trainer, seed, epochs, learning rate, ...) so that repeated
distillations, and every client of a federation on the same machine, reuse the experts.

The trainer is a hook: :func:`sgd_trainer` is the paper's (plain SGD, DSA on every batch), and a
DP-SGD trainer passed from ``privacy/`` makes MTT private by post-processing (the images only
ever see the experts). ``distill/`` itself never imports Opacus.

>>> shapes = ParamLayout((("w", (2, 3)), ("b", (2,))))
>>> {k: tuple(v.shape) for k, v in shapes.unflatten(torch.arange(8.0)).items()}
{'w': (2, 3), 'b': (2,)}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import DEFAULT_STRATEGY, DSA
from .data import LabeledImages
from .networks import seeded_network
from .npzfile import load_npz_safely, save_npz_atomic

CACHE_ENV = "FEDISTILL_EXPERT_CACHE"
DEFAULT_CACHE = Path("~/.cache/fedistill/experts")
FORMAT = 1


@dataclass(frozen=True)
class ExpertConfig:
    """How experts are trained; every field is part of the cache key.

    Defaults are the MTT paper's buffer settings (SGD lr 0.01, no momentum, no weight decay,
    batch 256, DSA), with fewer experts and epochs to suit a CPU.
    """

    arch: str = "convnet"
    arch_kwargs: dict = field(default_factory=dict)
    num_experts: int = 3
    epochs: int = 12
    lr: float = 0.01
    momentum: float = 0.0
    batch_size: int = 256
    dsa: bool = True
    dsa_strategy: str = DEFAULT_STRATEGY
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"num_experts, epochs and batch_size must be >= 1: {self}")
        if not self.lr > 0 or not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"need lr > 0 and momentum in [0, 1), got {self.lr}, {self.momentum}")


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a network's parameters, in ``named_parameters()`` order."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, net: nn.Module) -> "ParamLayout":
        return cls(tuple((name, tuple(p.shape)) for name, p in net.named_parameters()))

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.entries)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` shaped as the parameters, for ``torch.func.functional_call``."""
        sizes = [int(np.prod(shape)) for _, shape in self.entries]
        return {name: chunk.view(shape)
                for (name, shape), chunk in zip(self.entries, flat.split(sizes))}


def flatten_params(net: nn.Module) -> torch.Tensor:
    """All parameters of ``net`` as one detached float32 CPU vector (``ParamLayout`` order)."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).float().cpu()


@dataclass
class ExpertBuffer:
    """``trajectories`` float32 ``[E, T + 1, P]``: expert ``e``'s parameters after epoch ``t``."""

    trajectories: torch.Tensor
    layout: ParamLayout
    meta: dict

    def __post_init__(self) -> None:
        t = self.trajectories
        if t.dtype != torch.float32 or t.ndim != 3 or t.shape[2] != self.layout.size:
            raise ValueError(f"trajectories must be float32 [E, T+1, {self.layout.size}], "
                             f"got {t.dtype} {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError("trajectories contain NaN or Inf")

    @property
    def num_experts(self) -> int:
        return int(self.trajectories.shape[0])

    @property
    def epochs(self) -> int:
        return int(self.trajectories.shape[1]) - 1

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename): a crash or a racing client never leaves half a file."""
        meta = {"format": FORMAT, "layout": [[n, list(s)] for n, s in self.layout.entries], **self.meta}
        return save_npz_atomic(path, {"trajectories": self.trajectories.numpy(),
                                      "meta_json": np.asarray(json.dumps(meta))})

    @classmethod
    def load(cls, path: str | Path) -> "ExpertBuffer":
        """Read a buffer saved by :meth:`save`; pickled (object) arrays are refused."""
        arrays = load_npz_safely(path)
        if sorted(arrays) != ["meta_json", "trajectories"]:
            raise ValueError(f"{path}: expected keys trajectories, meta_json; got {sorted(arrays)}")
        meta = json.loads(str(arrays["meta_json"]))
        if meta.pop("format", None) != FORMAT:
            raise ValueError(f"{path}: unknown expert-buffer format")
        layout = ParamLayout(tuple((str(n), tuple(int(d) for d in s)) for n, s in meta.pop("layout")))
        return cls(torch.from_numpy(arrays["trajectories"].copy()), layout, meta)


# A trainer trains ``net`` in place on ``data`` for ``config.epochs`` epochs, calling
# ``checkpoint()`` after each epoch, with randomness from ``gen``; it returns metadata to store
# with the buffer (e.g. a DP trainer's epsilon).
ExpertTrainer = Callable[[nn.Module, LabeledImages, ExpertConfig, torch.Generator, Callable[[], None]], dict]


def sgd_trainer(net: nn.Module, data: LabeledImages, config: ExpertConfig, gen: torch.Generator,
                checkpoint: Callable[[], None]) -> dict:
    """The paper's expert training: SGD on shuffled batches, a fresh DSA draw per batch."""
    aug = DSA(config.dsa_strategy) if config.dsa else None
    opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum)
    device = next(net.parameters()).device
    x, y = data.images.to(device), data.labels.to(device)
    net.train()
    for _ in range(config.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(config.batch_size):
            idx = idx.to(device)
            xb = aug(x[idx], gen) if aug is not None else x[idx]
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        checkpoint()
    return {}


def train_experts(data: LabeledImages, config: ExpertConfig, *, trainer: ExpertTrainer = sgd_trainer,
                  device: str = "cpu") -> ExpertBuffer:
    """Train ``config.num_experts`` experts from seeded random networks and record their trajectories."""
    info = data.info
    runs, extra = [], []
    for e in range(config.num_experts):
        seed = config.seed * 1_000_003 + e
        net = seeded_network(config.arch, info.channels, info.num_classes, (info.height, info.width),
                             seed=seed, device=device, **config.arch_kwargs)
        snapshots = [flatten_params(net)]
        extra.append(trainer(net, data, config, torch.Generator().manual_seed(seed),
                             lambda: snapshots.append(flatten_params(net))))
        if len(snapshots) != config.epochs + 1:
            raise ValueError(f"trainer checkpointed {len(snapshots) - 1} epochs, expected {config.epochs}")
        runs.append(torch.stack(snapshots))
        layout = ParamLayout.of(net)
    return ExpertBuffer(torch.stack(runs), layout, {"config": asdict(config), "trainer": extra})


def fingerprint(data: LabeledImages) -> str:
    """SHA-256 of the images, labels and dataset description: the data part of the cache key."""
    h = hashlib.sha256(json.dumps(data.info.to_dict(), sort_keys=True).encode())
    h.update(data.images.detach().cpu().float().contiguous().numpy().tobytes())
    h.update(data.labels.detach().cpu().long().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_dir(override: str | Path | None = None) -> Path:
    """Where buffers live: ``override``, else ``$FEDISTILL_EXPERT_CACHE``, else ``~/.cache/fedistill/experts``."""
    chosen = override or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser()


def cache_path(data: LabeledImages, config: ExpertConfig, tag: str = "sgd",
               directory: str | Path | None = None) -> Path:
    """The buffer's file: readable prefix (dataset, arch, tag) + hash of everything in the key."""
    key = json.dumps({"data": fingerprint(data), "config": asdict(config), "tag": tag, "format": FORMAT},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in f"{data.info.name}-{config.arch}-{tag}")
    return cache_dir(directory) / f"{safe}-{digest}.npz"


def load_or_train_experts(data: LabeledImages, config: ExpertConfig, *, trainer: ExpertTrainer = sgd_trainer,
                          tag: str = "sgd", directory: str | Path | None = None, persist: bool = True,
                          device: str = "cpu") -> ExpertBuffer:
    """The cached buffer for (data, config, tag), training and caching it on a miss.

    A custom ``trainer`` needs its own ``tag`` (e.g. ``"dp-eps1"``), so that its experts and
    plain SGD ones never share a cache entry. ``persist=False`` neither reads nor writes a
    cache: the buffer lives in memory (a federated client whose node named no cache directory).
    """
    if trainer is not sgd_trainer and tag == "sgd":
        raise ValueError("a custom expert trainer needs its own cache tag, not 'sgd'")
    if not persist:
        return train_experts(data, config, trainer=trainer, device=device)
    path = cache_path(data, config, tag, directory)
    if path.exists():
        return ExpertBuffer.load(path)
    buffer = train_experts(data, config, trainer=trainer, device=device)
    buffer.save(path)
    return buffer
