"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021).

Drawing the random parameters (:meth:`DSA.sample`) is separate from applying them
(:meth:`DSA.apply`), as in torchvision's transforms v2: one draw is applied to the real and
the synthetic batch alike (the "siamese" part), and every operation is differentiable in the
images so gradients reach the synthetic pixels.

Operations (parameters as in the paper): ``color`` (brightness, saturation, contrast),
``crop`` (translation by up to 1/8 of the side, zero padding), ``cutout`` (a half-side square),
``flip`` (horizontal, p=0.5), ``scale`` (x1/1.2 to x1.2 per axis), ``rotate`` (+-15 degrees).
In ``single`` mode (the paper's default) each call draws one operation for the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
OPERATIONS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass
class DSAParams:
    """One draw: a list of ``(operation, per-sample tensors)``; sample ``i`` uses row ``i``."""

    ops: list[tuple[str, dict[str, torch.Tensor]]] = field(default_factory=list)
    size: int = 0

    def select(self, index: torch.Tensor) -> "DSAParams":
        """The parameters of the given samples, e.g. to pair each synthetic image with a real one."""
        idx = index.cpu()
        return DSAParams([(op, {k: v[idx] for k, v in p.items()}) for op, p in self.ops], len(idx))


@dataclass(frozen=True)
class DSA:
    strategy: str = DEFAULT_STRATEGY
    mode: str = "single"
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop_pad: float = 0.125
    cutout: float = 0.5
    flip_prob: float = 0.5
    scale: float = 1.2
    rotate_deg: float = 15.0

    def __post_init__(self) -> None:
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if unknown or not self.operations:
            raise ValueError(f"unknown DSA operations {unknown} in {self.strategy!r}; known: {list(OPERATIONS)}")
        if self.mode not in ("single", "multiple"):
            raise ValueError(f"mode must be 'single' or 'multiple', got {self.mode!r}")

    @property
    def operations(self) -> list[str]:
        return [op for op in self.strategy.split("_") if op]

    def sample(self, n: int, height: int, width: int, generator: torch.Generator) -> DSAParams:
        """Draw parameters for ``n`` samples of ``height x width`` images (CPU generator)."""
        ops = self.operations
        if self.mode == "single":
            ops = [ops[int(torch.randint(len(ops), (1,), generator=generator))]]

        def u(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator)

        drawn: list[tuple[str, dict[str, torch.Tensor]]] = []
        for op in ops:
            if op == "color":
                p = {"b": u(n), "s": u(n), "c": u(n)}
            elif op == "crop":
                sh, sw = int(height * self.crop_pad + 0.5), int(width * self.crop_pad + 0.5)
                p = {"dy": torch.randint(-sh, sh + 1, (n,), generator=generator),
                     "dx": torch.randint(-sw, sw + 1, (n,), generator=generator)}
            elif op == "cutout":
                p = {"cy": torch.randint(height, (n,), generator=generator),
                     "cx": torch.randint(width, (n,), generator=generator)}
            elif op == "flip":
                p = {"f": u(n) < self.flip_prob}
            elif op == "scale":
                lo = 1.0 / self.scale
                p = {"sx": u(n) * (self.scale - lo) + lo, "sy": u(n) * (self.scale - lo) + lo}
            else:  # rotate
                p = {"theta": (u(n) - 0.5) * 2 * math.radians(self.rotate_deg)}
            drawn.append((op, p))
        return DSAParams(drawn, n)

    def apply(self, x: torch.Tensor, params: DSAParams) -> torch.Tensor:
        """Apply a draw to ``x``; sample ``i`` of ``x`` uses parameter row ``i``."""
        if params.size < x.shape[0]:
            raise ValueError(f"params drawn for {params.size} samples, batch has {x.shape[0]}")
        n = x.shape[0]
        for op, p in params.ops:
            p = {k: v[:n].to(x.device) for k, v in p.items()}
            x = _APPLY[op](self, x, p)
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(x.shape[0], x.shape[2], x.shape[3], generator))


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).view(-1, 1, 1, 1)


def _color(cfg: DSA, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    x = x + (_per_sample(p["b"], x) - 0.5) * cfg.brightness
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * (_per_sample(p["s"], x) * cfg.saturation) + mean_c
    mean_all = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean_all) * (_per_sample(p["c"], x) + cfg.contrast) + mean_all


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _crop(cfg: DSA, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 2.0 * p["dx"].float() / w  # whole-pixel shifts: bilinear sampling is exact
    theta[:, 1, 2] = 2.0 * p["dy"].float() / h
    return _affine(x, theta)


def _cutout(cfg: DSA, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    _, _, h, w = x.shape
    half_h, half_w = int(h * cfg.cutout + 0.5) // 2, int(w * cfg.cutout + 0.5) // 2
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((ys - p["cy"].view(-1, 1, 1)).abs() < half_h) & ((xs - p["cx"].view(-1, 1, 1)).abs() < half_w)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def _flip(cfg: DSA, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.where(p["f"].view(-1, 1, 1, 1), x.flip(3), x)


def _scale(cfg: DSA, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
    theta[:, 0, 0] = p["sx"]
    theta[:, 1, 1] = p["sy"]
    return _affine(x, theta)


def _rotate(cfg: DSA, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    t = p["theta"]
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(t), torch.sin(-t)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(t), torch.cos(t)
    return _affine(x, theta)


_APPLY = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale,
          "rotate": _rotate}
