"""Factorised synthetic sets: what is stored (factor arrays + a JSON spec) and how it decodes.

A factorised set ships a few stored tensors and a small spec; the images are a pure function
of them, so the receiver decodes instead of downloading every image. Three kinds:

- ``idc`` (Kim et al., "Dataset Condensation via Efficient Synthetic-Data Parameterization",
  ICML 2022): a stored image is a ``factor x factor`` grid of tiles; each tile is upsampled
  (bilinear) to full size, so one stored image decodes to ``factor**2`` images.
- ``haba`` (Liu et al., "Dataset Distillation via Factorization", NeurIPS 2022): per-class
  bases and a few class-free hallucinators; image ``(i, j)`` is hallucinator ``j`` applied to
  base ``i``. A hallucinator here is ``base + dec(scale * relu(enc(base)) + shift)`` (3x3
  convolutions): the residual form is our choice, so a base initialised from a real image
  decodes close to it at the start.
- ``latent`` (after KFS, Lee et al., "Dataset Condensation with Latent Space Knowledge
  Factorization and Sharing", 2022): per-class latent codes at ``1/factor`` resolution and a
  few shared upsampling decoders, ``up(code)[:C] + conv(relu(conv(up(code))))``.

Decoded images are base-major: rows ``i * per_base ... (i + 1) * per_base - 1`` come from
stored base ``i`` and carry its class. Decoding is pure ``torch.nn.functional`` on the stored
tensors, the same code the optimiser differentiates through, so a set decodes bit for bit
as it was trained (same machine). Everything that crosses a trust boundary is bounded before
it is decoded: spec keys and integer ranges, array names, dtypes, shapes and the decoded size.

>>> base = torch.arange(16.0).reshape(1, 1, 4, 4)
>>> f = Factors({"kind": "idc", "factor": 2, "height": 4, "width": 4}, {"base": base})
>>> f.per_base, tuple(f.decode().shape)
(4, (4, 1, 4, 4))
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KINDS = ("idc", "haba", "latent")
# Integer spec fields of each kind (besides "kind").
SPEC_KEYS = {"idc": ("factor", "height", "width"), "haba": ("hallucinators", "hidden"),
             "latent": ("factor", "decoders", "code_channels", "hidden", "height", "width")}
# Inclusive bounds on every integer a spec may hold: a hostile spec cannot ask for a huge decode.
LIMITS = {"factor": (1, 8), "hallucinators": (1, 16), "decoders": (1, 16), "hidden": (1, 64),
          "code_channels": (1, 64), "height": (1, 1024), "width": (1, 1024)}
BASE_KEY = {"idc": "base", "haba": "bases", "latent": "codes"}  # the per-class (stored base) array
MAX_SPEC_CHARS = 4096
MAX_DECODED_VALUES = 2 ** 27  # 512 MiB of float32 once decoded


def check_spec(spec: object) -> dict:
    """A validated copy of ``spec``; raises ``ValueError`` naming the bad key or value."""
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        got = spec.get("kind") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"factor spec kind must be one of {KINDS}, got {got!r}")
    kind = spec["kind"]
    want = set(SPEC_KEYS[kind]) | {"kind"}
    if set(spec) != want:
        raise ValueError(f"{kind} spec keys must be {sorted(want)}, got {sorted(spec)}")
    out: dict = {"kind": kind}
    for key in SPEC_KEYS[kind]:
        value, (lo, hi) = spec[key], LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"{kind} spec {key}={value!r}: must be an int in [{lo}, {hi}]")
        out[key] = value
    if "factor" in out and out["factor"] > min(out["height"], out["width"]):
        raise ValueError(f"factor {out['factor']} exceeds the image size {out['height']}x{out['width']}")
    return out


def images_per_base(spec: dict) -> int:
    kind = spec["kind"]
    if kind == "idc":
        return spec["factor"] ** 2
    return spec["hallucinators"] if kind == "haba" else spec["decoders"]


def expected_shapes(spec: dict, channels: int, num_bases: int) -> dict[str, tuple[int, ...]]:
    """The shape every stored array of ``spec`` must have for ``num_bases`` bases."""
    c, m = channels, num_bases
    if spec["kind"] == "idc":
        f = spec["factor"]
        return {"base": (m, c, f * (spec["height"] // f), f * (spec["width"] // f))}
    if spec["kind"] == "haba":
        j, h = spec["hallucinators"], spec["hidden"]
        return {"bases": (m, c, -1, -1), "enc_w": (j, h, c, 3, 3), "enc_b": (j, h), "scale": (j, h),
                "shift": (j, h), "dec_w": (j, c, h, 3, 3), "dec_b": (j, c)}
    f, j, d, h = spec["factor"], spec["decoders"], spec["code_channels"], spec["hidden"]
    return {"codes": (m, d, spec["height"] // f, spec["width"] // f), "w1": (j, h, d, 3, 3), "b1": (j, h),
            "w2": (j, c, h, 3, 3), "b2": (j, c)}


def idc_decode(base: torch.Tensor, factor: int, height: int, width: int) -> torch.Tensor:
    """[M, C, f*h, f*w] stored images -> [M*f*f, C, height, width], tiles row-major per image."""
    m, c, fh, fw = base.shape
    h, w = fh // factor, fw // factor
    tiles = base.reshape(m, c, factor, h, factor, w).permute(0, 2, 4, 1, 3, 5).reshape(m * factor * factor, c, h, w)
    if (h, w) == (height, width):
        return tiles
    return F.interpolate(tiles, size=(height, width), mode="bilinear", align_corners=False)


def haba_decode(bases: torch.Tensor, enc_w: torch.Tensor, enc_b: torch.Tensor, scale: torch.Tensor,
                shift: torch.Tensor, dec_w: torch.Tensor, dec_b: torch.Tensor) -> torch.Tensor:
    """Every hallucinator on every base: [M, C, H, W] -> [M*J, C, H, W], base-major."""
    outs = []
    for j in range(enc_w.shape[0]):
        z = F.relu(F.conv2d(bases, enc_w[j], enc_b[j], padding=1))
        z = z * scale[j][:, None, None] + shift[j][:, None, None]
        outs.append(bases + F.conv2d(z, dec_w[j], dec_b[j], padding=1))
    return torch.stack(outs, 1).flatten(0, 1)


def latent_decode(codes: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Every decoder on every code: [M, D, h, w] -> [M*J, C, height, width], base-major."""
    up = F.interpolate(codes, size=(height, width), mode="bilinear", align_corners=False)
    c = w2.shape[1]
    outs = [up[:, :c] + F.conv2d(F.relu(F.conv2d(up, w1[j], b1[j], padding=1)), w2[j], b2[j], padding=1)
            for j in range(w1.shape[0])]
    return torch.stack(outs, 1).flatten(0, 1)


def decode(spec: dict, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
    """The images of ``arrays`` under ``spec`` (differentiable in every array)."""
    kind = spec["kind"]
    if kind == "idc":
        return idc_decode(arrays["base"], spec["factor"], spec["height"], spec["width"])
    if kind == "haba":
        return haba_decode(*(arrays[k] for k in ("bases", "enc_w", "enc_b", "scale", "shift", "dec_w", "dec_b")))
    return latent_decode(*(arrays[k] for k in ("codes", "w1", "b1", "w2", "b2")), spec["height"], spec["width"])


@dataclass(frozen=True, eq=False)
class Factors:
    """What a factorised set stores: ``spec`` (JSON-able, see :data:`SPEC_KEYS`) and named float32 arrays."""

    spec: dict
    arrays: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", check_spec(self.spec))

    @property
    def kind(self) -> str:
        return self.spec["kind"]

    @property
    def per_base(self) -> int:
        return images_per_base(self.spec)

    @property
    def num_bases(self) -> int:
        return int(self.arrays[BASE_KEY[self.kind]].shape[0])

    def decode(self) -> torch.Tensor:
        with torch.no_grad():
            return decode(self.spec, self.arrays).contiguous()

    def spec_json(self) -> str:
        return json.dumps(self.spec, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, arrays: dict[str, torch.Tensor]) -> "Factors":
        """From an untrusted spec string; ``ValueError`` if it is long, unreadable or out of bounds."""
        if len(text) > MAX_SPEC_CHARS:
            raise ValueError(f"factor spec longer than {MAX_SPEC_CHARS} characters")
        try:
            spec = json.loads(text)
        except ValueError as err:
            raise ValueError(f"unreadable factor spec ({err})") from err
        return cls(spec, arrays)


def check_factors(factors: Factors, channels: int, height: int, width: int,
                  max_images: int | None = None) -> str | None:
    """Why ``factors`` cannot decode to [N, channels, height, width] images, or None if it can.

    Checks names, dtypes, shapes against the spec and the image geometry, finiteness, and the
    decoded size (at most ``max_images`` images and :data:`MAX_DECODED_VALUES` values) before
    any decoding happens.
    """
    spec, arrays = factors.spec, factors.arrays
    if spec.get("height", height) != height or spec.get("width", width) != width:
        return f"factor spec is for {spec['height']}x{spec['width']} images, the set has {height}x{width}"
    base = arrays.get(BASE_KEY[spec["kind"]])
    if base is None or base.ndim < 1 or base.shape[0] < 1:
        return f"{spec['kind']} factors need a non-empty {BASE_KEY[spec['kind']]!r} array"
    want = expected_shapes(spec, channels, int(base.shape[0]))
    if set(arrays) != set(want):
        return f"{spec['kind']} factor arrays must be {sorted(want)}, got {sorted(arrays)}"
    if spec["kind"] == "latent" and spec["code_channels"] < channels:
        return f"latent code_channels {spec['code_channels']} < image channels {channels}"
    if spec["kind"] == "haba":
        want["bases"] = (base.shape[0], channels, height, width)
    for name, shape in want.items():
        a = arrays[name]
        if a.dtype != torch.float32:
            return f"factor {name} dtype must be float32, got {a.dtype}"
        if tuple(a.shape) != shape:
            return f"factor {name} shape {tuple(a.shape)}, spec needs {shape}"
        if not torch.isfinite(a).all():
            return f"factor {name} contains NaN or Inf"
    n = int(base.shape[0]) * images_per_base(spec)
    if max_images is not None and n > max_images:
        return f"factors decode to {n} images, at most {max_images} allowed"
    if n * channels * height * width > MAX_DECODED_VALUES:
        return f"factors decode to {n} images of {channels}x{height}x{width}: too large"
    return None
