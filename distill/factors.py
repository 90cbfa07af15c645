"""Factorised synthetic sets: what is stored (factor arrays + a JSON spec) and how it decodes.

A factorised set ships a few stored tensors and a small spec; the images are a pure function
of them, so the receiver decodes instead of downloading every image. The kinds are the
factorised classes of :mod:`distill.params` (a module each, holding its decoder); today three:

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

# Which kinds exist, their spec keys, per-class array, decoder and the bounds of their integers
# belong to each kind's class in distill/params (one module per kind); this module asks the
# class. ``KINDS``, ``SPEC_KEYS``, ``BASE_KEY`` and ``LIMITS`` are read from that registry when
# used (see ``__getattr__`` below): the classes import this module, so it cannot import them first.
GEOMETRY_LIMITS = {"height": (1, 1024), "width": (1, 1024)}  # the spec's image size, any kind
MAX_SPEC_CHARS = 4096
MAX_DECODED_VALUES = 2 ** 27  # 512 MiB of float32 once decoded
KINDS: tuple[str, ...]  # these four are served by __getattr__ below
SPEC_KEYS: dict[str, tuple[str, ...]]
BASE_KEY: dict[str, str]
LIMITS: dict[str, tuple[int, int]]


def kinds() -> dict[str, type]:
    """The factorised parameterisation classes by kind name, in registration order."""
    from .params import factorised  # lazy: distill.params imports this module

    return factorised()


def kind_class(kind: str) -> type:
    """The class of a spec's ``kind`` (the spec checked already)."""
    return kinds()[kind]


def __getattr__(name: str) -> object:
    """The registry-derived tables callers import from here, always current."""
    if name in ("idc_decode", "haba_decode", "latent_decode"):  # moved to their kind's module
        from .params import haba, idc, latent

        return getattr({"idc_decode": idc, "haba_decode": haba, "latent_decode": latent}[name], name)
    if name not in ("KINDS", "SPEC_KEYS", "BASE_KEY", "LIMITS"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    table = kinds()
    if name == "KINDS":
        return tuple(table)
    if name == "SPEC_KEYS":
        return {k: cls.spec_keys for k, cls in table.items()}
    if name == "BASE_KEY":  # the per-class (stored base) array of each kind
        return {k: cls.base_key for k, cls in table.items()}
    # LIMITS: inclusive bounds of every integer a spec or an option may hold
    return {key: bound for cls in table.values() for key, bound in cls.limits.items()} | GEOMETRY_LIMITS


def check_spec(spec: object) -> dict:
    """A validated copy of ``spec``; raises ``ValueError`` naming the bad key or value.

    Every integer is bounded (its kind's ``limits``, the image size by :data:`GEOMETRY_LIMITS`),
    so a hostile spec cannot ask for a huge decode.
    """
    table = kinds()
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if not isinstance(kind, str) or kind not in table:
        got = kind if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"factor spec kind must be one of {tuple(table)}, got {got!r}")
    cls = table[kind]
    want = set(cls.spec_keys) | {"kind"}
    if set(spec) != want:  # type: ignore[arg-type]
        raise ValueError(f"{kind} spec keys must be {sorted(want)}, got {sorted(spec)}")  # type: ignore[arg-type]
    bounds = {**cls.limits, **GEOMETRY_LIMITS}
    out: dict = {"kind": kind}
    for key in cls.spec_keys:
        value, (lo, hi) = spec[key], bounds[key]  # type: ignore[index]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"{kind} spec {key}={value!r}: must be an int in [{lo}, {hi}]")
        out[key] = value
    if "factor" in out and out["factor"] > min(out["height"], out["width"]):
        raise ValueError(f"factor {out['factor']} exceeds the image size {out['height']}x{out['width']}")
    return out


def images_per_base(spec: dict) -> int:
    return kind_class(spec["kind"]).images_per_base(spec)


def expected_shapes(spec: dict, channels: int, num_bases: int) -> dict[str, tuple[int, ...]]:
    """The shape every stored array of ``spec`` must have for ``num_bases`` bases (-1: the image
    size, where the spec does not hold it)."""
    return kind_class(spec["kind"]).expected_shapes(spec, channels, num_bases)


def decode(spec: dict, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
    """The images of ``arrays`` under ``spec`` (differentiable in every array)."""
    return kind_class(spec["kind"]).decode(spec, arrays)


@dataclass(frozen=True, eq=False)
class Factors:
    """What a factorised set stores: ``spec`` (JSON-able, see :func:`check_spec`) and named float32 arrays."""

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
    def base_key(self) -> str:
        """The per-class array: one row per stored base."""
        return kind_class(self.kind).base_key

    @property
    def num_bases(self) -> int:
        return int(self.arrays[self.base_key].shape[0])

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
    cls = kind_class(spec["kind"])
    if spec.get("height", height) != height or spec.get("width", width) != width:
        return f"factor spec is for {spec['height']}x{spec['width']} images, the set has {height}x{width}"
    base = arrays.get(cls.base_key)
    if base is None or base.ndim < 1 or base.shape[0] < 1:
        return f"{spec['kind']} factors need a non-empty {cls.base_key!r} array"
    want = cls.expected_shapes(spec, channels, int(base.shape[0]), height, width)
    if set(arrays) != set(want):
        return f"{spec['kind']} factor arrays must be {sorted(want)}, got {sorted(arrays)}"
    problem = cls.spec_problem(spec, channels)
    if problem:
        return problem
    for name, shape in want.items():
        a = arrays[name]
        if a.dtype != torch.float32:
            return f"factor {name} dtype must be float32, got {a.dtype}"
        if tuple(a.shape) != shape:
            return f"factor {name} shape {tuple(a.shape)}, spec needs {shape}"
        if not torch.isfinite(a).all():
            return f"factor {name} contains NaN or Inf"
    n = int(base.shape[0]) * cls.images_per_base(spec)
    if max_images is not None and n > max_images:
        return f"factors decode to {n} images, at most {max_images} allowed"
    if n * channels * height * width > MAX_DECODED_VALUES:
        return f"factors decode to {n} images of {channels}x{height}x{width}: too large"
    return None
