"""ZCA whitening: the CIFAR-10 preprocessing of KIP, MTT and FRePo.

KIP (Nguyen et al., ICLR 2021) and, after it, MTT (Cazenavette et al., CVPR 2022) and FRePo
(Zhou et al., NeurIPS 2022) distil and evaluate CIFAR-10 in a ZCA-whitened space: it
decorrelates neighbouring pixels, so a kernel or a short trajectory sees edges rather than
colour blobs, and the papers' figures on CIFAR-10 depend on it. The form is the one MTT's code
takes (regularised eigen-decomposition of the pixel covariance, ``eps`` added to every
eigenvalue, default 0.1, after the per-channel normalisation):

    W = U diag(1 / sqrt(S + eps)) U^T,   x_white = (x - mean) W

**Whose statistics.** A ZCA transform is fitted to data: the covariance of 50,000 training
images is a 3,072 x 3,072 summary of them. Central benchmarks fit it on the public training
split, as the papers do. A private dataset must never be the source: a DP method takes a
transform that is declared (fitted on public data and loaded), never computed from the data it
protects, and :func:`fit` is not called anywhere on a client's private data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .data import Dataset, DatasetInfo, LabeledImages

DEFAULT_EPS = 0.1


@dataclass(frozen=True)
class ZCA:
    """A fitted whitening: ``apply`` maps normalised images into the white space, ``invert`` back."""

    mean: torch.Tensor      # [D]
    whiten: torch.Tensor    # [D, D], symmetric
    unwhiten: torch.Tensor  # [D, D], its inverse
    eps: float

    @classmethod
    def fit(cls, images: torch.Tensor, eps: float = DEFAULT_EPS, chunk: int = 4096) -> "ZCA":
        """Fit on ``images`` [N, C, H, W] (public data only: see the module docstring)."""
        if images.ndim != 4 or images.shape[0] < 2:
            raise ValueError(f"ZCA needs [N, C, H, W] images with N >= 2, got {tuple(images.shape)}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (it keeps the inverse bounded), got {eps}")
        x = images.flatten(1)
        mean = x.double().mean(0)
        cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        for c in x.split(chunk):  # float64 accumulation, float32-sized pieces of memory
            c = c.double() - mean
            cov += c.T @ c
        cov /= x.shape[0] - 1
        evals, evecs = torch.linalg.eigh(cov)
        evals = evals.clamp_min(0)
        whiten = (evecs * (evals + eps).rsqrt()) @ evecs.T
        unwhiten = (evecs * (evals + eps).sqrt()) @ evecs.T
        return cls(mean.float(), whiten.float(), unwhiten.float(), float(eps))

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        shape = images.shape
        return ((images.flatten(1) - self.mean) @ self.whiten).reshape(shape)

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        shape = images.shape
        return (images.flatten(1) @ self.unwhiten + self.mean).reshape(shape)


def white_info(info: DatasetInfo) -> DatasetInfo:
    """The dataset's info with the space named: a set distilled in it says so in its metadata."""
    return info if info.name.endswith("+zca") else replace(info, name=f"{info.name}+zca")


def whiten_dataset(data: Dataset, eps: float = DEFAULT_EPS) -> tuple[Dataset, ZCA]:
    """``data`` with both splits in the ZCA space fitted on its training split (a public benchmark)."""
    zca = ZCA.fit(data.train.images, eps)
    info = white_info(data.info)

    def moved(split: LabeledImages) -> LabeledImages:
        return replace(split, images=zca.apply(split.images), info=info)

    return Dataset(moved(data.train), moved(data.test)), zca
