"""Real image data: the bundled MNIST sample, torchvision datasets and generic ``.npz`` files.

Every source ends up as a :class:`Dataset` of two :class:`LabeledImages` splits holding
float32 images already normalised with the dataset's mean/std, so methods, trainers and
attacks never re-derive the preprocessing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

BUNDLED = "mnist10k"

# (mean, std) per channel, in [0, 1] pixel units.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashionmnist": ((0.2861,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
NORMALISATION[BUNDLED] = NORMALISATION["mnist"]
# The same data under the names its files carry (../shared/data): full MNIST, CIFAR-10 as JPEG.
NORMALISATION["mnist70k"] = NORMALISATION["mnist"]
NORMALISATION["cifar10jpeg"] = NORMALISATION["cifar10"]
TORCHVISION_NAMES = ("mnist", "fashionmnist", "cifar10", "svhn")


@dataclass(frozen=True)
class DatasetInfo:
    """What a consumer must know about a dataset to build a network or validate an upload."""

    name: str
    num_classes: int
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "num_classes": self.num_classes, "channels": self.channels,
            "height": self.height, "width": self.width,
            "mean": list(self.mean), "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetInfo":
        return cls(str(d["name"]), int(d["num_classes"]), int(d["channels"]), int(d["height"]),
                   int(d["width"]), tuple(float(v) for v in d["mean"]),
                   tuple(float(v) for v in d["std"]))


@dataclass
class LabeledImages:
    """Normalised images ``float32 [N, C, H, W]`` with ``int64 [N]`` labels."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1:] != self.info.image_shape:
            raise ValueError(f"images must be [N, {self.info.image_shape}], got {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be [N={self.images.shape[0]}], got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray | torch.Tensor | list[int]) -> "LabeledImages":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return LabeledImages(self.images[idx], self.labels[idx], self.info)

    def class_histogram(self) -> np.ndarray:
        """Count of samples per class, length ``num_classes``."""
        return np.bincount(self.labels.numpy(), minlength=self.info.num_classes)

    def class_indices(self) -> list[torch.Tensor]:
        """Indices of each class's samples, one tensor per class (possibly empty)."""
        return [torch.nonzero(self.labels == c).flatten() for c in range(self.info.num_classes)]

    def of_classes(self, classes) -> "LabeledImages":
        """The samples whose label is one of ``classes`` (any iterable of ints), in their order."""
        wanted = torch.as_tensor(np.asarray(list(classes), dtype=np.int64))
        return self.subset(torch.nonzero(torch.isin(self.labels.cpu(), wanted)).flatten())

    def first_per_class(self, n: int) -> "LabeledImages":
        """The first ``n`` samples of each class: a fixed, balanced subset."""
        return self.subset(torch.cat([idx[:n] for idx in self.class_indices()]))

    def to(self, device: torch.device | str) -> "LabeledImages":
        return LabeledImages(self.images.to(device), self.labels.to(device), self.info)


@dataclass
class Dataset:
    train: LabeledImages
    test: LabeledImages

    @property
    def info(self) -> DatasetInfo:
        return self.train.info


def normalise(images_uint8: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``uint8`` ``[N, H, W]`` or ``[N, H, W, C]`` -> normalised ``float32 [N, C, H, W]``."""
    if images_uint8.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images_uint8.dtype}")
    x = images_uint8[:, None] if images_uint8.ndim == 3 else images_uint8.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise ValueError(f"expected [N, H, W] or [N, H, W, C] images, got shape {images_uint8.shape}")
    t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (t - m) / s


def denormalise(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Back to ``[0, 1]`` pixel space (clamped), for display."""
    m = torch.tensor(info.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(info.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp(0.0, 1.0)


def from_arrays(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                y_test: np.ndarray, num_classes: int | None = None,
                stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> Dataset:
    """Build a :class:`Dataset` from uint8 image arrays; stats default to the train split's."""
    channels = 1 if x_train.ndim == 3 else x_train.shape[-1]
    if stats is None:
        pix = x_train.reshape(len(x_train), -1, channels) / 255.0
        stats = (tuple(pix.mean(axis=(0, 1)).tolist()), tuple(pix.std(axis=(0, 1)).tolist()))
    mean, std = stats
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"normalisation stats for {len(mean)} channels, images have {channels}")
    k = int(num_classes if num_classes is not None else max(y_train.max(), y_test.max(initial=0)) + 1)
    info = DatasetInfo(name, k, channels, x_train.shape[1], x_train.shape[2], tuple(mean), tuple(std))
    for split, y in (("y_train", y_train), ("y_test", y_test)):
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"{split} has labels outside [0, {k})")

    def split(x: np.ndarray, y: np.ndarray) -> LabeledImages:
        return LabeledImages(normalise(x, mean, std), torch.from_numpy(y.astype(np.int64)), info)

    return Dataset(split(x_train, y_train), split(x_test, y_test))


KNOWN_NUM_CLASSES = 10  # every dataset with published statistics here (MNIST, Fashion-MNIST, CIFAR-10, SVHN)


def dataset_key(name: str) -> str:
    """How a dataset name is matched: case, dashes and underscores ignored (``Fashion-MNIST``)."""
    return name.lower().replace("-", "").replace("_", "")


def source_name(path: str | Path) -> str:
    """The dataset name a file or folder carries: its name up to the first dot
    (``mnist70k.npz`` -> ``mnist70k``, ``cifar10-jpeg.tar.gz`` -> ``cifar10-jpeg``)."""
    return Path(str(path)).name.split(".")[0]


def public_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """A known dataset's published normalisation (what a DP node may use), or None."""
    return NORMALISATION.get(dataset_key(name))


def load_npz(path: str | Path, name: str | None = None, *,
             stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
             num_classes: int | None = None) -> Dataset:
    """A local ``.npz`` with ``x_train, y_train, x_test, y_test`` (uint8 HxW or HxWxC).

    Normalisation: ``stats`` if given, else the known dataset ``name`` (default: the file's stem)
    names, else the file's own train split. ``num_classes`` defaults to the known dataset's (10),
    else the largest label + 1.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such dataset file: {path}")
    with np.load(path, allow_pickle=False) as f:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
        if missing:
            raise ValueError(f"{path} lacks keys {sorted(missing)}")
        arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    key = name or path.stem
    known = public_stats(key)
    if num_classes is None and stats is None and known is not None:
        num_classes = KNOWN_NUM_CLASSES  # a known dataset's class count is public, not its file's largest label
    return from_arrays(key, **arrays, num_classes=num_classes, stats=stats or known)


BUNDLED_ENV = "FEDISTILL_MNIST10K"


def bundled_path() -> Path:
    """Path of the real-MNIST sample shipped inside the package (see README for provenance).

    ``$FEDISTILL_MNIST10K`` overrides it: a Flower app bundle (FAB) carries only text sources,
    so under ``flwr run`` the package copy has no ``assets/`` and the nodes are pointed at the file.
    """
    override = os.environ.get(BUNDLED_ENV)
    path = Path(override) if override else Path(str(resources.files("distill") / "assets" / "mnist10k.npz"))
    if not path.is_file():
        where = f"${BUNDLED_ENV}={override}" if override else "the package's assets/"
        raise FileNotFoundError(f"bundled MNIST sample not found at {path} (from {where}); set "
                                f"{BUNDLED_ENV} to the path of mnist10k.npz")
    return path


def _torchvision_arrays(name: str, root: Path, download: bool) -> dict[str, np.ndarray]:
    from torchvision import datasets  # local: only this path needs torchvision's datasets

    def grab(train: bool) -> tuple[np.ndarray, np.ndarray]:
        if name == "svhn":
            ds = datasets.SVHN(str(root), split="train" if train else "test", download=download)
            return ds.data.transpose(0, 2, 3, 1), ds.labels.astype(np.int64)
        cls = {"mnist": datasets.MNIST, "fashionmnist": datasets.FashionMNIST,
               "cifar10": datasets.CIFAR10}[name]
        ds = cls(str(root), train=train, download=download)
        x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        return x.astype(np.uint8), np.asarray(ds.targets, dtype=np.int64)

    (xtr, ytr), (xte, yte) = grab(True), grab(False)
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "fedistill" / "datasets"


def load_dataset(name: str = BUNDLED, root: str | Path | None = None, download: bool = True) -> Dataset:
    """Load a dataset by name, from a path ending in ``.npz``, or from an image folder (a
    directory or a ``.tar.gz`` of one: :mod:`distill.imagefolder`).

    ``mnist10k`` (default) is the bundled sample and never touches the network. The torchvision
    names download into ``root`` (default ``~/.cache/fedistill/datasets``) when absent.

    >>> ds = load_dataset("mnist10k")
    >>> len(ds.train), len(ds.test), ds.info.image_shape
    (8000, 2000, (1, 28, 28))
    """
    if str(name).endswith(".npz"):
        return load_npz(name)
    from .imagefolder import is_image_folder, load_image_folder  # local: it builds on this module

    if is_image_folder(name):
        return load_image_folder(name)
    key = dataset_key(name)
    if key == BUNDLED:
        return load_npz(bundled_path(), BUNDLED)
    if key not in TORCHVISION_NAMES:
        raise ValueError(f"unknown dataset {name!r}; known: {[BUNDLED, *TORCHVISION_NAMES]}, a path to an .npz, "
                         "or an image folder (a directory or .tar.gz of <class>/<image> or train|test/<class>/<image>)")
    root = Path(root) if root is not None else default_cache_dir()
    try:
        arrays = _torchvision_arrays(key, root, download)
    except (RuntimeError, OSError) as err:  # torchvision raises these when offline / files absent
        raise RuntimeError(
            f"could not load {name!r} from {root} ({err}). Without internet access use the bundled "
            f"sample: load_dataset('{BUNDLED}') / --dataset {BUNDLED}, or a local .npz file."
        ) from err
    return from_arrays(key, **arrays, num_classes=10, stats=NORMALISATION[key])
