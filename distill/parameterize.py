"""The layer between the optimiser and the synthetic images.

A method optimises ``parameters()`` and always reads the images through ``images()``, so a
parameterisation can change what is stored without the method knowing. ``factors()`` is what
a :class:`~distill.synthetic.SyntheticSet` stores and uploads (None: the images themselves).

- ``Pixels``: the images are the parameters.
- ``FixedPixels`` is KIP-rho's corruption (Nguyen et al., NeurIPS 2021): a fraction ``rho`` of
  every stored pixel is drawn at random once and never changes. It is a reparameterisation,
  not a masked gradient, so momentum, weight decay, Adam's state or any in-place update cannot
  move a frozen pixel: ``torch.where`` selects the stored frozen value bit for bit in every read.
- ``IDC``, ``Hallucinated`` (HaBa and KFS-style latent codes): factorised sets, one stored base
  decoding to several images (see :mod:`distill.factors` for the kinds and their papers).
  ``ipc`` then counts stored bases per class; each decodes to ``images_per_base`` images.

>>> p = make_parameterization(torch.zeros(4, 1, 8, 8), 0.0, torch.Generator(), "idc", {"factor": 2})
>>> tuple(p.images().shape), tuple(p.factors().arrays["base"].shape)
((4, 1, 8, 8), (1, 1, 8, 8))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .factors import LIMITS, Factors, check_spec, decode

# name -> option defaults. ``code_channels`` None: channels * factor**2, so one code costs the
# bytes of one image. ``net_lr`` scales the hallucinators'/decoders' step relative to the images'
# (their gradients sum over every pixel they touch, so the image lr would throw them off).
OPTIONS: dict[str, dict] = {
    "pixels": {},
    "idc": {"factor": 2},
    "haba": {"hallucinators": 4, "hidden": 8, "net_lr": 0.01},
    "latent": {"factor": 2, "decoders": 4, "code_channels": None, "hidden": 16, "net_lr": 0.01},
}
RHO_COMPOSES = ("pixels", "idc")  # rho freezes stored pixels; a learned decoder would remap them


def check_options(name: str, options: dict | None) -> dict:
    """The options of parameterisation ``name`` merged over its defaults; ``ValueError`` if bad."""
    if name not in OPTIONS:
        raise ValueError(f"unknown parameterisation {name!r}; known: {sorted(OPTIONS)}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS[name]))
    if unknown:
        raise ValueError(f"parameterisation {name!r} has no options {unknown}; it has {sorted(OPTIONS[name])}")
    out = {**OPTIONS[name], **options}
    for key, value in out.items():
        if key == "net_lr":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} option net_lr must be > 0, got {value!r}")
        elif not (key == "code_channels" and value is None):
            lo, hi = LIMITS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name} option {key}={value!r}: must be an int in [{lo}, {hi}]")
    return out


def real_per_base(name: str, options: dict | None) -> int:
    """Real (or noise) images one stored base is initialised from: each IDC tile gets its own."""
    return check_options(name, options)["factor"] ** 2 if name == "idc" else 1


def decoded_per_base(name: str, options: dict | None) -> int:
    """Images one stored base decodes to."""
    opts = check_options(name, options)
    if name == "idc":
        return opts["factor"] ** 2
    return {"haba": opts.get("hallucinators"), "latent": opts.get("decoders")}.get(name) or 1


class Parameterization:
    """What a method sees: tensors to optimise, the images they decode to, what gets stored."""

    def parameters(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def images(self) -> torch.Tensor:
        raise NotImplementedError

    def factors(self) -> Factors | None:
        """The stored factors, or None when the images themselves are stored."""
        return None


class Pixels(Parameterization):
    """The plain parameterisation: the images are the parameters."""

    def __init__(self, init: torch.Tensor) -> None:
        self.free = init.detach().clone().requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.free]

    def images(self) -> torch.Tensor:
        return self.free


class FixedPixels(Pixels):
    """KIP-rho: pixels where ``mask`` is set are random noise, frozen forever.

    The frozen values are standard normal in the normalised space, drawn from ``generator``;
    the rest start from ``init`` and are optimised. No formal privacy guarantee: an
    obfuscation layer (see docs/privacy.md).
    """

    def __init__(self, init: torch.Tensor, rho: float, generator: torch.Generator) -> None:
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"rho must be in [0, 1), got {rho}")
        super().__init__(init)
        shape = tuple(init.shape)
        self.mask = (torch.rand(shape, generator=generator) < rho).to(init.device)
        self.frozen = torch.randn(shape, generator=generator).to(init.device)

    def images(self) -> torch.Tensor:
        return torch.where(self.mask, self.frozen, self.free)


def _downsample(images: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(images, size=(h, w), mode="area") if images.shape[-2:] != (h, w) else images


class IDC(Parameterization):
    """IDC multi-formation: ``stored`` holds [M, C, f*h, f*w] grids; images are the upsampled tiles.

    Real initialisation puts a different (area-downsampled) real image in every tile, as IDC
    does. KIP-rho composes: ``stored`` may be :class:`FixedPixels` over the stored grids.
    """

    def __init__(self, init: torch.Tensor, factor: int, rho: float, generator: torch.Generator) -> None:
        n, c, height, width = init.shape
        f = factor
        if n % (f * f):
            raise ValueError(f"IDC factor {f} needs a multiple of {f * f} initial images, got {n}")
        h, w = height // f, width // f
        tiles = _downsample(init.detach(), h, w).reshape(n // (f * f), f, f, c, h, w)
        grid = tiles.permute(0, 3, 1, 4, 2, 5).reshape(n // (f * f), c, f * h, f * w)
        self.stored = FixedPixels(grid, rho, generator) if rho > 0 else Pixels(grid)
        self.spec = check_spec({"kind": "idc", "factor": f, "height": height, "width": width})

    def parameters(self) -> list[torch.Tensor]:
        return self.stored.parameters()

    def images(self) -> torch.Tensor:
        return decode(self.spec, {"base": self.stored.images()})

    def factors(self) -> Factors:
        return Factors(self.spec, {"base": self.stored.images().detach().cpu().clone()})


class _Scaled:
    """A tensor optimised as ``value / scale``: its SGD step is ``scale**2`` times the common lr."""

    def __init__(self, value: torch.Tensor, lr_scale: float) -> None:
        self.scale = math.sqrt(lr_scale)
        self.leaf = (value / self.scale).detach().requires_grad_(True)

    def value(self) -> torch.Tensor:
        return self.leaf * self.scale


class Hallucinated(Parameterization):
    """Per-class stored bases plus small shared networks (HaBa's hallucinators, KFS-style decoders).

    The networks are seeded from ``generator`` (He-initialised encoders, small output layers,
    so at the start every image is its base, plus a small distinct perturbation per network).
    """

    def __init__(self, init: torch.Tensor, kind: str, options: dict, generator: torch.Generator) -> None:
        n, c, height, width = init.shape
        dev = init.device

        def he(*shape: int, gain: float = 1.0) -> torch.Tensor:
            fan_in = shape[2] * shape[3] * shape[4]  # [nets, out, in, 3, 3]
            return (torch.randn(shape, generator=generator) * gain * math.sqrt(2.0 / fan_in)).to(dev)

        if kind == "haba":
            j, h = options["hallucinators"], options["hidden"]
            self.spec = check_spec({"kind": "haba", "hallucinators": j, "hidden": h})
            base_key, base = "bases", init.detach().clone()
            nets = {"enc_w": he(j, h, c, 3, 3), "enc_b": torch.zeros(j, h, device=dev),
                    "scale": torch.ones(j, h, device=dev), "shift": torch.zeros(j, h, device=dev),
                    "dec_w": he(j, c, h, 3, 3, gain=0.1), "dec_b": torch.zeros(j, c, device=dev)}
        else:
            f, j, h = options["factor"], options["decoders"], options["hidden"]
            d = options["code_channels"] or c * f * f
            if d < c:
                raise ValueError(f"latent code_channels {d} < image channels {c}")
            self.spec = check_spec({"kind": "latent", "factor": f, "decoders": j, "code_channels": d,
                                    "hidden": h, "height": height, "width": width})
            small = _downsample(init.detach(), height // f, width // f)
            base_key = "codes"
            base = torch.cat([small, small.new_zeros(n, d - c, *small.shape[2:])], 1)
            nets = {"w1": he(j, h, d, 3, 3), "b1": torch.zeros(j, h, device=dev),
                    "w2": he(j, c, h, 3, 3, gain=0.1), "b2": torch.zeros(j, c, device=dev)}
        self.base_key = base_key
        self.free = base.requires_grad_(True)
        self.nets = {k: _Scaled(v, options["net_lr"]) for k, v in nets.items()}

    def _arrays(self) -> dict[str, torch.Tensor]:
        return {self.base_key: self.free, **{k: v.value() for k, v in self.nets.items()}}

    def parameters(self) -> list[torch.Tensor]:
        return [self.free] + [v.leaf for v in self.nets.values()]

    def images(self) -> torch.Tensor:
        return decode(self.spec, self._arrays())

    def factors(self) -> Factors:
        return Factors(self.spec, {k: v.detach().cpu().clone() for k, v in self._arrays().items()})


def make_parameterization(init: torch.Tensor, rho: float, generator: torch.Generator,
                          name: str = "pixels", options: dict | None = None) -> Parameterization:
    """The parameterisation ``name`` started from ``init``.

    ``init`` holds ``real_per_base`` full-size images (real or noise) per stored base, in base
    order; the result decodes to ``decoded_per_base`` images per base, base-major.
    """
    opts = check_options(name, options)
    if rho > 0 and name not in RHO_COMPOSES:
        raise ValueError(f"rho > 0 does not compose with parameterisation {name!r}: its learned networks "
                         f"remap every stored pixel, so none stays fixed; use one of {RHO_COMPOSES}")
    if name == "pixels":
        return FixedPixels(init, rho, generator) if rho > 0 else Pixels(init)
    if name == "idc":
        return IDC(init, opts["factor"], rho, generator)
    return Hallucinated(init, name, opts, generator)


__all__ = ["OPTIONS", "FixedPixels", "Hallucinated", "IDC", "Parameterization", "Pixels", "check_options",
           "decoded_per_base", "make_parameterization", "real_per_base"]
