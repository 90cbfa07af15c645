"""The synthetic set: what a client distills, uploads, and the server trains on.

On disk it is one ``.npz`` (arrays plus the metadata as a JSON string stored as a unicode
array), read with ``allow_pickle=False``; on the wire it is a dict of arrays plus a flat dict
of metadata scalars. Nothing here ever unpickles.

A factorised set (:mod:`distill.factors`) stores its factors instead of its images: the
arrays are ``labels``, optional ``lr``, ``factors_json`` (the spec as UTF-8 bytes, uint8) and
one ``factor_<name>`` float32 array per factor, so what is saved, sent and counted in
``nbytes`` is the factors; ``images`` are decoded from them when the set is built.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .data import DatasetInfo
from .factors import Factors, check_factors, kind_class
from .npzfile import load_npz_safely, save_npz_atomic

ARRAY_KEYS = ("images", "labels")
OPTIONAL_ARRAY_KEYS = ("lr",)
FACTOR_SPEC_KEY = "factors_json"
FACTOR_PREFIX = "factor_"


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
    """``images`` float32 [N, C, H, W] (normalised space); ``labels`` int64 [N] or float32 [N, K].

    With ``factors`` the images are decoded from them (pass ``images=None``, or use
    :meth:`from_factors`); images passed alongside factors must be exactly their decoding.
    ``labels`` always label the decoded images.
    """

    images: torch.Tensor
    labels: torch.Tensor
    meta: SetMetadata
    lr: float | None = None
    factors: Factors | None = None

    def __post_init__(self) -> None:
        info = self.meta.dataset
        if self.factors is not None:
            problem = check_factors(self.factors, info.channels, info.height, info.width)
            if problem:
                raise ValueError(problem)
            decoded = self.factors.decode()
            if self.images is not None and not torch.equal(self.images.detach().cpu(), decoded):
                raise ValueError("images differ from the decoding of the factors")
            self.images = decoded
        elif self.images is None:
            raise ValueError("a set needs images or factors")
        if self.factors is not None and len(self.images) != self.factors.num_bases * self.factors.per_base:
            raise ValueError(f"{len(self.images)} images, the factors decode to "
                             f"{self.factors.num_bases * self.factors.per_base}")
        for name, t, dtypes in (("images", self.images, (torch.float32,)), ("labels", self.labels,
                                                                             (torch.int64, torch.float32))):
            if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
                raise InvalidSet("dtype", f"{name} must be a tensor of {dtypes}, got {getattr(t, 'dtype', type(t))}")
        check_structure(self.images.detach().cpu().numpy(), self.labels.detach().cpu().numpy(), info,
                        self.factors.per_base if self.factors is not None else 1)

    @classmethod
    def from_factors(cls, factors: Factors, labels: torch.Tensor, meta: SetMetadata,
                     lr: float | None = None) -> "SyntheticSet":
        """A factorised set; its images are decoded from ``factors``."""
        return cls(None, labels, meta, lr, factors)  # type: ignore[arg-type]

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
        """Bytes of the arrays as uploaded (what a client pays in bandwidth): the factors, if any."""
        return sum(a.nbytes for a in self.to_arrays().values())

    def with_meta(self, **changes) -> "SyntheticSet":
        return replace(self, meta=replace(self.meta, **changes))

    # -- wire format -------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        if self.factors is None:
            arrays = {"images": self.images.detach().cpu().numpy().astype(np.float32)}
        else:
            spec = np.frombuffer(self.factors.spec_json().encode("utf-8"), dtype=np.uint8).copy()
            arrays = {FACTOR_SPEC_KEY: spec, **{FACTOR_PREFIX + k: v.detach().cpu().numpy().astype(np.float32)
                                                for k, v in self.factors.arrays.items()}}
        arrays["labels"] = self.labels.detach().cpu().numpy()
        if self.lr is not None:
            arrays["lr"] = np.asarray([self.lr], dtype=np.float32)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: SetMetadata) -> "SyntheticSet":
        """Build from untrusted arrays; raises ``ValueError`` naming what is wrong."""
        factored = FACTOR_SPEC_KEY in arrays
        required = ("labels", FACTOR_SPEC_KEY) if factored else ARRAY_KEYS
        missing = [k for k in required if k not in arrays]
        extra = [k for k in arrays if k not in required + OPTIONAL_ARRAY_KEYS
                 and not (factored and k.startswith(FACTOR_PREFIX))]
        if missing or extra:
            raise ValueError(f"bad keys: missing {missing}, unexpected {extra}")
        labels = np.asarray(arrays["labels"])
        if labels.dtype not in (np.int64, np.float32):
            raise ValueError(f"labels dtype must be int64 or float32, got {labels.dtype}")
        lr = None
        if "lr" in arrays:
            lr_arr = np.asarray(arrays["lr"])
            if lr_arr.shape != (1,) or lr_arr.dtype != np.float32 or not np.isfinite(lr_arr).all():
                raise ValueError("lr must be one finite float32")
            lr = float(lr_arr[0])
        labels_t = torch.from_numpy(labels.copy())
        if factored:
            return cls.from_factors(factors_from_arrays(arrays), labels_t, meta, lr)
        images = np.asarray(arrays["images"])
        if images.dtype != np.float32:
            raise ValueError(f"images dtype must be float32, got {images.dtype}")
        return cls(torch.from_numpy(images.copy()), labels_t, meta, lr)

    # -- disk format ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename): a crash never leaves a half-written set."""
        payload = dict(self.to_arrays(), meta_json=np.asarray(json.dumps(self.meta.to_dict())))
        return save_npz_atomic(path, payload)

    @classmethod
    def load(cls, path: str | Path) -> "SyntheticSet":
        """Read a set saved by :meth:`save`; object (pickled) arrays are refused."""
        arrays = load_npz_safely(path)
        if "meta_json" not in arrays:
            raise ValueError(f"{path}: no meta_json entry")
        meta = SetMetadata.from_dict(json.loads(str(arrays.pop("meta_json"))))
        return cls.from_arrays(arrays, meta)


def concat_sets(parts: list[SyntheticSet], meta: SetMetadata) -> SyntheticSet:
    """One set from several under ``meta`` (a client distilling class groups in separate calls).

    Plain sets concatenate their images. Factorised sets with one spec and no shared networks
    (IDC) concatenate their stored bases, so the result still stores (and counts) factors. Sets
    with shared learned networks (haba, latent) are refused: each part trained its own networks,
    and one set has one of each.
    """
    if not parts:
        raise ValueError("nothing to concatenate")
    lrs = {p.lr for p in parts}
    if len(lrs) > 1:
        raise ValueError(f"parts have different learned lrs {sorted(lrs, key=str)}")
    labels = torch.cat([p.labels for p in parts])
    kinds = {None if p.factors is None else p.factors.spec_json() for p in parts}
    if kinds == {None}:
        return SyntheticSet(torch.cat([p.images for p in parts]), labels, meta, parts[0].lr)
    first = parts[0].factors
    if len(kinds) > 1 or first is None or kind_class(first.kind).shared_networks or len(first.arrays) != 1:
        raise ValueError("only plain sets, or factorised sets with one spec and no shared networks (idc), can be "
                         f"concatenated; got factor specs {sorted(map(str, kinds))}")
    base = torch.cat([p.factors.arrays[first.base_key] for p in parts])  # type: ignore[union-attr]
    return SyntheticSet.from_factors(Factors(first.spec, {first.base_key: base}), labels, meta, parts[0].lr)


def factors_from_arrays(arrays: dict[str, np.ndarray]) -> Factors:
    """The factors in untrusted wire/disk arrays (spec bounded, float32 only); ``ValueError`` if bad.

    Shapes against the dataset are checked by :func:`distill.factors.check_factors`, before decoding.
    """
    spec = np.asarray(arrays[FACTOR_SPEC_KEY])
    if spec.dtype != np.uint8 or spec.ndim != 1:
        raise ValueError(f"{FACTOR_SPEC_KEY} must be 1-D uint8 (UTF-8 JSON), got {spec.dtype} {spec.shape}")
    try:
        text = spec.tobytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{FACTOR_SPEC_KEY} is not UTF-8 ({err})") from err
    tensors = {}
    for key, value in arrays.items():
        if key.startswith(FACTOR_PREFIX):
            a = np.asarray(value)
            if a.dtype != np.float32:
                raise ValueError(f"{key} dtype must be float32, got {a.dtype}")
            tensors[key[len(FACTOR_PREFIX):]] = torch.from_numpy(a.copy())
    return Factors.from_json(text, tensors)


class InvalidSet(ValueError):
    """Arrays that are not a valid synthetic set; ``kind`` is the short name a server counts
    (``dtype``, ``shape``, ``non-finite``, ``label-range``...) and ``detail`` says why."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def check_structure(images: np.ndarray, labels: np.ndarray, info: DatasetInfo, per_base: int = 1) -> None:
    """Raise :class:`InvalidSet` unless ``images``/``labels`` are a well-formed set for ``info``.

    The checks every set passes, wherever it comes from (a method's output, a file, an upload):
    float32 ``[N, C, H, W]`` images of the dataset's geometry, finite; int64 ``[N]`` labels in
    range or float32 ``[N, K]`` finite soft labels; with ``per_base`` images per stored base
    (a factorised set), hard labels constant over each base's images. What a run allows on top
    (size, magnitude, budget) is :func:`distill.upload.validate_set`'s.
    """
    if images.dtype != np.float32:
        raise InvalidSet("dtype", f"images dtype must be float32, got {images.dtype}")
    if images.ndim != 4 or tuple(images.shape[1:]) != info.image_shape:
        raise InvalidSet("shape", f"images {tuple(images.shape)}, the dataset needs [N, {info.image_shape}]")
    n, k = images.shape[0], info.num_classes
    soft = labels.ndim == 2
    if labels.shape != ((n, k) if soft else (n,)) or labels.dtype != (np.float32 if soft else np.int64):
        raise InvalidSet("shape", f"labels {tuple(labels.shape)} {labels.dtype} for {n} images and {k} classes "
                                  "(want int64 [N] or float32 [N, K])")
    if not np.isfinite(images).all() or (soft and not np.isfinite(labels).all()):
        raise InvalidSet("non-finite", "NaN or Inf in the images or soft labels")
    if soft or n == 0:
        return
    if labels.min() < 0 or labels.max() >= k:
        raise InvalidSet("label-range", f"labels span [{labels.min()}, {labels.max()}], the dataset has {k} classes")
    if per_base > 1 and (n % per_base or not (labels.reshape(-1, per_base) == labels[::per_base, None]).all()):
        raise InvalidSet("label-range", "labels differ among the images of one stored base")
