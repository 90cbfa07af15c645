"""IDC multi-formation (Kim et al., "Dataset Condensation via Efficient Synthetic-Data
Parameterization", ICML 2022): a stored image is a ``factor x factor`` grid of tiles, each
upsampled (bilinear) to full size, so one stored image decodes to ``factor**2`` images.

Real initialisation puts a different (area-downsampled) real image in every tile, as IDC does.
KIP-rho composes: the stored grids may be :class:`~distill.params.pixels.FixedPixels`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..factors import Factors, check_spec
from .base import Parameterization, downsample, register
from .pixels import FixedPixels, Pixels


def idc_decode(base: torch.Tensor, factor: int, height: int, width: int) -> torch.Tensor:
    """[M, C, f*h, f*w] stored images -> [M*f*f, C, height, width], tiles row-major per image."""
    m, c, fh, fw = base.shape
    h, w = fh // factor, fw // factor
    tiles = base.reshape(m, c, factor, h, factor, w).permute(0, 2, 4, 1, 3, 5).reshape(m * factor * factor, c, h, w)
    if (h, w) == (height, width):
        return tiles
    return F.interpolate(tiles, size=(height, width), mode="bilinear", align_corners=False)


@register
class IDC(Parameterization):
    """``stored`` holds [M, C, f*h, f*w] grids; the images are their upsampled tiles."""

    name = "idc"
    options = {"factor": 2}
    limits = {"factor": (1, 8)}
    composes_with_rho = True
    base_key = "base"
    spec_keys = ("factor", "height", "width")

    def __init__(self, init: torch.Tensor, factor: int, rho: float, generator: torch.Generator) -> None:
        n, c, height, width = init.shape
        f = factor
        if n % (f * f):
            raise ValueError(f"IDC factor {f} needs a multiple of {f * f} initial images, got {n}")
        h, w = height // f, width // f
        tiles = downsample(init.detach(), h, w).reshape(n // (f * f), f, f, c, h, w)
        grid = tiles.permute(0, 3, 1, 4, 2, 5).reshape(n // (f * f), c, f * h, f * w)
        self.stored = FixedPixels(grid, rho, generator) if rho > 0 else Pixels(grid)
        self.spec = check_spec({"kind": self.name, "factor": f, "height": height, "width": width})

    @classmethod
    def real_per_base(cls, options: dict | None) -> int:
        return cls.check_options(options)["factor"] ** 2  # each tile starts from its own image

    @classmethod
    def decoded_per_base(cls, options: dict | None) -> int:
        return cls.check_options(options)["factor"] ** 2

    @classmethod
    def _build(cls, init: torch.Tensor, rho: float, generator: torch.Generator, options: dict) -> Parameterization:
        return cls(init, options["factor"], rho, generator)

    @classmethod
    def images_per_base(cls, spec: dict) -> int:
        return spec["factor"] ** 2

    @classmethod
    def expected_shapes(cls, spec: dict, channels: int, num_bases: int, height: int = -1,
                        width: int = -1) -> dict[str, tuple[int, ...]]:
        f = spec["factor"]
        return {"base": (num_bases, channels, f * (spec["height"] // f), f * (spec["width"] // f))}

    @classmethod
    def decode(cls, spec: dict, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        return idc_decode(arrays["base"], spec["factor"], spec["height"], spec["width"])

    def parameters(self) -> list[torch.Tensor]:
        return self.stored.parameters()

    def images(self) -> torch.Tensor:
        return self.decode(self.spec, {"base": self.stored.images()})

    def factors(self) -> Factors:
        return Factors(self.spec, {"base": self.stored.images().detach().cpu().clone()})
