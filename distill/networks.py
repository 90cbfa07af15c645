"""Networks for distillation and cross-architecture evaluation, built by name.

Every network has ``embed(x)`` (the features before the classifier, used by distribution
matching) and ``forward(x)``. Activations are never in-place and the default norm is
instance norm as ``GroupNorm(C, C)``, so Opacus's per-sample gradient hooks accept them all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from . import accel

if TYPE_CHECKING:
    from .data import DatasetInfo

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTIVATIONS = ("relu", "leakyrelu", "sigmoid", "gelu", "tanh")
POOLINGS = ("avgpool", "maxpool", "none")


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        return nn.GroupNorm(1, channels, affine=True)
    if kind == "groupnorm":
        return nn.GroupNorm(min(4, channels), channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; known: {list(NORMS)}")


def make_activation(kind: str) -> nn.Module:
    table: dict[str, Callable[[], nn.Module]] = {
        "relu": lambda: nn.ReLU(inplace=False), "leakyrelu": lambda: nn.LeakyReLU(0.01, inplace=False),
        "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "tanh": nn.Tanh,
    }
    if kind not in table:
        raise ValueError(f"unknown activation {kind!r}; known: {list(ACTIVATIONS)}")
    return table[kind]()


def make_pool(kind: str) -> nn.Module:
    if kind == "avgpool":
        return nn.AvgPool2d(2, 2)
    if kind == "maxpool":
        return nn.MaxPool2d(2, 2)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown pooling {kind!r}; known: {list(POOLINGS)}")


class _Embedder(nn.Module):
    """Shared shape: ``features`` -> flatten -> ``classifier``."""

    features: nn.Module
    classifier: nn.Module

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features at every block, shallow to deep (layer-wise matching, CAFE); here only the last."""
        return [self.features(x)]


@torch.no_grad()
def embed_in_chunks(net: nn.Module, x: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """``net.embed(x)`` without autograd, in chunks small enough for the activations to stay in
    the CPU cache: on a 2-core CPU, 2560 MNIST images through the default ConvNet take ~0.9 s in
    chunks of 32 against ~2.3 s in one batch (same result). Compiled when ``distill.accel`` says so."""
    return torch.cat([accel.embed(net, c) for c in x.split(chunk)])


def _feature_dim(features: nn.Module, in_shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return int(torch.flatten(features(torch.zeros(1, *in_shape)), 1).shape[1])


class ConvNet(_Embedder):
    """The distillation literature's ConvNet (Gidaris & Komodakis 2018; used by DC/DSA/DM/MTT).

    ``depth`` blocks of conv3x3(width) -> norm -> activation -> pool, then one linear layer.
    """

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (28, 28),
                 width: int = 128, depth: int = 3, norm: str = "instancenorm",
                 activation: str = "relu", pooling: str = "avgpool") -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        layers: list[nn.Module] = []
        c = channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), make_norm(norm, width),
                       make_activation(activation), make_pool(pooling)]
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(_feature_dim(self.features, (channels, *image_size)), num_classes)

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each conv-norm-activation-pool block; the last is ``embed``'s, unflattened."""
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i % 4 == 3:
                outs.append(x)
        return outs


class MLP(_Embedder):
    """Three-layer perceptron on flattened pixels (width 128)."""

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (28, 28),
                 width: int = 128) -> None:
        super().__init__()
        d = channels * image_size[0] * image_size[1]
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.ReLU(),
                                      nn.Linear(width, width), nn.ReLU())
        self.classifier = nn.Linear(width, num_classes)


class LeNet(_Embedder):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling."""

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        pad = 2 if image_size[0] == 28 else 0
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        d = _feature_dim(self.features, (channels, *image_size))
        self.features.append(nn.Sequential(nn.Linear(d, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU()))
        self.classifier = nn.Linear(84, num_classes)


class AlexNet(_Embedder):
    """AlexNet-style five-conv network (Krizhevsky et al. 2012) sized for 28-32 px images."""

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        pad = 4 if image_size[0] == 28 else 2
        self.features = nn.Sequential(
            nn.Conv2d(channels, 128, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(192, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 192, 3, padding=1), nn.ReLU(),
            nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(_feature_dim(self.features, (channels, *image_size)), num_classes)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.n1 = make_norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.n2 = make_norm(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), make_norm(norm, c_out))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.n1(self.conv1(x)))
        return self.act(self.n2(self.conv2(out)) + self.shortcut(x))


class ResNet18(_Embedder):
    """ResNet-18 (He et al. 2016), small-image stem: conv3x3, no max pool."""

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (28, 28),
                 norm: str = "instancenorm") -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, 64, 3, 1, 1, bias=False), make_norm(norm, 64), nn.ReLU()]
        c = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_BasicBlock(c, width, stride, norm), _BasicBlock(width, width, 1, norm)]
            c = width
        layers += [nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)


NETWORKS: dict[str, type[nn.Module]] = {
    "convnet": ConvNet, "mlp": MLP, "lenet": LeNet, "alexnet": AlexNet, "resnet18": ResNet18,
}


def get_network(name: str, channels: int, num_classes: int, image_size: tuple[int, int],
                **kwargs) -> nn.Module:
    """Build a network by name; extra keyword arguments go to its constructor.

    >>> net = get_network("convnet", 1, 10, (28, 28), width=32)
    >>> tuple(net(torch.zeros(2, 1, 28, 28)).shape)
    (2, 10)
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; known: {sorted(NETWORKS)}")
    return NETWORKS[key](channels, num_classes, tuple(image_size), **kwargs)


def seeded_network(name: str, channels: int, num_classes: int, image_size: tuple[int, int],
                   seed: int, device: torch.device | str = "cpu", **kwargs) -> nn.Module:
    """Build a network whose initial weights depend only on ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = get_network(name, channels, num_classes, image_size, **kwargs)
    return net.to(device)


def network_for(info: DatasetInfo, arch: str = "convnet", seed: int = 0,
                device: torch.device | str = "cpu", **kwargs) -> nn.Module:
    """``seeded_network`` sized for a dataset's image geometry and classes."""
    return seeded_network(arch, info.channels, info.num_classes, (info.height, info.width),
                          seed=seed, device=device, **kwargs)
