"""HaBa (Liu et al., "Dataset Distillation via Factorization", NeurIPS 2022): per-class bases
and a few class-free hallucinators; image ``(i, j)`` is hallucinator ``j`` applied to base ``i``.

A hallucinator here is ``base + dec(scale * relu(enc(base)) + shift)`` (3x3 convolutions): the
residual form is our choice, so a base initialised from a real image decodes close to it at the
start. HaBa's adversarial contrastive constraint is not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import register
from .shared import Hallucinated, he

NETS = ("enc_w", "enc_b", "scale", "shift", "dec_w", "dec_b")


def haba_decode(bases: torch.Tensor, enc_w: torch.Tensor, enc_b: torch.Tensor, scale: torch.Tensor,
                shift: torch.Tensor, dec_w: torch.Tensor, dec_b: torch.Tensor) -> torch.Tensor:
    """Every hallucinator on every base: [M, C, H, W] -> [M*J, C, H, W], base-major."""
    outs = []
    for j in range(enc_w.shape[0]):
        z = F.relu(F.conv2d(bases, enc_w[j], enc_b[j], padding=1))
        z = z * scale[j][:, None, None] + shift[j][:, None, None]
        outs.append(bases + F.conv2d(z, dec_w[j], dec_b[j], padding=1))
    return torch.stack(outs, 1).flatten(0, 1)


@register
class HaBa(Hallucinated):
    """Full-size bases (``bases``) and ``hallucinators`` shared encoder/affine/decoder networks."""

    name = "haba"
    # ``net_lr`` scales the hallucinators' step relative to the images' (their gradients sum over
    # every pixel they touch, so the image lr would throw them off).
    options = {"hallucinators": 4, "hidden": 8, "net_lr": 0.01}
    limits = {"hallucinators": (1, 16), "hidden": (1, 64)}
    base_key = "bases"
    spec_keys = ("hallucinators", "hidden")
    copies_key = "hallucinators"

    @classmethod
    def _start(cls, init: torch.Tensor, options: dict,
               generator: torch.Generator) -> tuple[dict, torch.Tensor, dict[str, torch.Tensor]]:
        c, dev = init.shape[1], init.device
        j, h = options["hallucinators"], options["hidden"]
        nets = {"enc_w": he(generator, dev, j, h, c, 3, 3), "enc_b": torch.zeros(j, h, device=dev),
                "scale": torch.ones(j, h, device=dev), "shift": torch.zeros(j, h, device=dev),
                "dec_w": he(generator, dev, j, c, h, 3, 3, gain=0.1), "dec_b": torch.zeros(j, c, device=dev)}
        return {"kind": cls.name, "hallucinators": j, "hidden": h}, init.detach().clone(), nets

    @classmethod
    def expected_shapes(cls, spec: dict, channels: int, num_bases: int, height: int = -1,
                        width: int = -1) -> dict[str, tuple[int, ...]]:
        j, h, c = spec["hallucinators"], spec["hidden"], channels
        return {"bases": (num_bases, c, height, width), "enc_w": (j, h, c, 3, 3), "enc_b": (j, h), "scale": (j, h),
                "shift": (j, h), "dec_w": (j, c, h, 3, 3), "dec_b": (j, c)}

    @classmethod
    def decode(cls, spec: dict, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        return haba_decode(arrays["bases"], *(arrays[k] for k in NETS))
