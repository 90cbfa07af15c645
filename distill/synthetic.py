"""The synthetic set: what a client distills, uploads, and the server trains on.

On disk it is one ``.npz`` (arrays plus the metadata as a JSON string stored as a unicode
array), read with ``allow_pickle=False``; on the wire it is a dict of arrays plus a flat dict
of metadata scalars. Nothing here ever unpickles.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .data import DatasetInfo

ARRAY_KEYS = ("images", "labels")
OPTIONAL_ARRAY_KEYS = ("lr",)


@dataclass(frozen=True)
class SetMetadata:
    """Where a set came from: dataset geometry, method, client/round, privacy spent."""

    dataset: DatasetInfo
    method: str
    ipc: int
    seed: int = 0
    client: str = ""
    round: int = 0
    iterations: int = 0
    privacy: dict[str, float | str] = field(default_factory=dict)
    extra: dict[str, float | int | str | bool] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dataset"] = self.dataset.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SetMetadata":
        return cls(dataset=DatasetInfo.from_dict(d["dataset"]), method=str(d["method"]),
                   ipc=int(d["ipc"]), seed=int(d.get("seed", 0)), client=str(d.get("client", "")),
                   round=int(d.get("round", 0)), iterations=int(d.get("iterations", 0)),
                   privacy=dict(d.get("privacy", {})), extra=dict(d.get("extra", {})))


@dataclass
class SyntheticSet:
    """``images`` float32 [N, C, H, W] (normalised space); ``labels`` int64 [N] or float32 [N, K]."""

    images: torch.Tensor
    labels: torch.Tensor
    meta: SetMetadata
    lr: float | None = None

    def __post_init__(self) -> None:
        problem = check_arrays(self.images, self.labels, self.meta.dataset)
        if problem:
            raise ValueError(problem)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def soft_labels(self) -> bool:
        return self.labels.ndim == 2

    def hard_labels(self) -> torch.Tensor:
        return self.labels.argmax(1) if self.soft_labels else self.labels

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.hard_labels().cpu().numpy(), minlength=self.meta.dataset.num_classes)

    def nbytes(self) -> int:
        """Bytes of the arrays as uploaded (what a client pays in bandwidth)."""
        return sum(a.nbytes for a in self.to_arrays().values())

    def with_meta(self, **changes) -> "SyntheticSet":
        return replace(self, meta=replace(self.meta, **changes))

    # -- wire format -------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"images": self.images.detach().cpu().numpy().astype(np.float32),
                  "labels": self.labels.detach().cpu().numpy()}
        if self.lr is not None:
            arrays["lr"] = np.asarray([self.lr], dtype=np.float32)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: SetMetadata) -> "SyntheticSet":
        """Build from untrusted arrays; raises ``ValueError`` naming what is wrong."""
        missing = [k for k in ARRAY_KEYS if k not in arrays]
        extra = [k for k in arrays if k not in ARRAY_KEYS + OPTIONAL_ARRAY_KEYS]
        if missing or extra:
            raise ValueError(f"bad keys: missing {missing}, unexpected {extra}")
        images, labels = np.asarray(arrays["images"]), np.asarray(arrays["labels"])
        if images.dtype != np.float32:
            raise ValueError(f"images dtype must be float32, got {images.dtype}")
        if labels.dtype not in (np.int64, np.float32):
            raise ValueError(f"labels dtype must be int64 or float32, got {labels.dtype}")
        lr = None
        if "lr" in arrays:
            lr_arr = np.asarray(arrays["lr"])
            if lr_arr.shape != (1,) or lr_arr.dtype != np.float32 or not np.isfinite(lr_arr).all():
                raise ValueError("lr must be one finite float32")
            lr = float(lr_arr[0])
        return cls(torch.from_numpy(images.copy()), torch.from_numpy(labels.copy()), meta, lr)

    # -- disk format ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename): a crash never leaves a half-written set."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(self.to_arrays(), meta_json=np.asarray(json.dumps(self.meta.to_dict())))
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **payload)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SyntheticSet":
        """Read a set saved by :meth:`save`; object (pickled) arrays are refused."""
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except ValueError as err:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
            raise ValueError(f"{path}: refused ({err})") from err
        if "meta_json" not in arrays:
            raise ValueError(f"{path}: no meta_json entry")
        meta = SetMetadata.from_dict(json.loads(str(arrays.pop("meta_json"))))
        return cls.from_arrays(arrays, meta)


def check_arrays(images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo) -> str | None:
    """The reason ``images``/``labels`` are not a valid set for ``info``, or None if they are."""
    if images.dtype != torch.float32:
        return f"images dtype must be float32, got {images.dtype}"
    if images.ndim != 4 or tuple(images.shape[1:]) != info.image_shape:
        return f"images shape {tuple(images.shape)} does not match [N, {info.image_shape}]"
    n = images.shape[0]
    if not torch.isfinite(images).all():
        return "images contain NaN or Inf"
    if labels.ndim == 1:
        if labels.dtype != torch.int64:
            return f"hard labels must be int64, got {labels.dtype}"
        if labels.shape[0] != n:
            return f"{labels.shape[0]} labels for {n} images"
        if n and (labels.min() < 0 or labels.max() >= info.num_classes):
            return f"labels outside [0, {info.num_classes})"
    elif labels.ndim == 2:
        if labels.dtype != torch.float32:
            return f"soft labels must be float32, got {labels.dtype}"
        if tuple(labels.shape) != (n, info.num_classes):
            return f"soft labels shape {tuple(labels.shape)} is not [{n}, {info.num_classes}]"
        if not torch.isfinite(labels).all():
            return "soft labels contain NaN or Inf"
    else:
        return f"labels must be [N] or [N, K], got {tuple(labels.shape)}"
    return None
