"""Latent codes (after KFS, Lee et al., "Dataset Condensation with Latent Space Knowledge
Factorization and Sharing", 2022): per-class codes at ``1/factor`` resolution and a few shared
upsampling decoders, ``up(code)[:C] + conv(relu(conv(up(code))))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import downsample, register
from .shared import Hallucinated, he


def latent_decode(codes: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Every decoder on every code: [M, D, h, w] -> [M*J, C, height, width], base-major."""
    up = F.interpolate(codes, size=(height, width), mode="bilinear", align_corners=False)
    c = w2.shape[1]
    outs = [up[:, :c] + F.conv2d(F.relu(F.conv2d(up, w1[j], b1[j], padding=1)), w2[j], b2[j], padding=1)
            for j in range(w1.shape[0])]
    return torch.stack(outs, 1).flatten(0, 1)


@register
class Latent(Hallucinated):
    """Codes (``codes``: ``code_channels`` x H/factor x W/factor) and ``decoders`` shared decoders."""

    name = "latent"
    # ``code_channels`` None: channels * factor**2, so one code costs the bytes of one image.
    options = {"factor": 2, "decoders": 4, "code_channels": None, "hidden": 16, "net_lr": 0.01}
    limits = {"factor": (1, 8), "decoders": (1, 16), "code_channels": (1, 64), "hidden": (1, 64)}
    base_key = "codes"
    spec_keys = ("factor", "decoders", "code_channels", "hidden", "height", "width")
    copies_key = "decoders"

    @classmethod
    def _start(cls, init: torch.Tensor, options: dict,
               generator: torch.Generator) -> tuple[dict, torch.Tensor, dict[str, torch.Tensor]]:
        n, c, height, width = init.shape
        dev = init.device
        f, j, h = options["factor"], options["decoders"], options["hidden"]
        d = options["code_channels"] or c * f * f
        if d < c:
            raise ValueError(f"latent code_channels {d} < image channels {c}")
        spec = {"kind": cls.name, "factor": f, "decoders": j, "code_channels": d, "hidden": h,
                "height": height, "width": width}
        small = downsample(init.detach(), height // f, width // f)
        codes = torch.cat([small, small.new_zeros(n, d - c, *small.shape[2:])], 1)
        nets = {"w1": he(generator, dev, j, h, d, 3, 3), "b1": torch.zeros(j, h, device=dev),
                "w2": he(generator, dev, j, c, h, 3, 3, gain=0.1), "b2": torch.zeros(j, c, device=dev)}
        return spec, codes, nets

    @classmethod
    def expected_shapes(cls, spec: dict, channels: int, num_bases: int, height: int = -1,
                        width: int = -1) -> dict[str, tuple[int, ...]]:
        f, j, d, h, c = spec["factor"], spec["decoders"], spec["code_channels"], spec["hidden"], channels
        return {"codes": (num_bases, d, spec["height"] // f, spec["width"] // f), "w1": (j, h, d, 3, 3),
                "b1": (j, h), "w2": (j, c, h, 3, 3), "b2": (j, c)}

    @classmethod
    def spec_problem(cls, spec: dict, channels: int) -> str | None:
        if spec["code_channels"] < channels:
            return f"latent code_channels {spec['code_channels']} < image channels {channels}"
        return None

    @classmethod
    def decode(cls, spec: dict, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        return latent_decode(*(arrays[k] for k in ("codes", "w1", "b1", "w2", "b2")), spec["height"], spec["width"])
