"""What a run accepts as a synthetic set: the server's expectation of an upload, and the one validation.

Flower-free, so that the server (every reply, every stored set read back on resume), the
attacks and the tests share one definition of a valid set. :func:`expectation` derives it from
the run's task (:class:`distill.task.DistillTask`); :func:`validate_set` checks a set's arrays
(the wire form of :meth:`distill.synthetic.SyntheticSet.to_arrays`) against it and raises
:class:`~distill.synthetic.InvalidSet` with a short ``kind`` a server counts.

A run with a factorised parameterisation (``param`` idc / haba / latent, docs/distill.md
"Parameterisations") expects the factorised wire form instead of ``images``: ``labels``,
optional ``lr``, ``factors_json`` (the spec, UTF-8 JSON as uint8) and float32 ``factor_<name>``
arrays. The spec must be exactly the run's; sizes, shapes and values are bounded before the
factors are decoded, and the decoded images then pass the same checks as a plain upload.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple

import numpy as np
import torch

from .data import DatasetInfo
from .factors import BASE_KEY, MAX_SPEC_CHARS, check_factors, expected_shapes, images_per_base
from .parameterize import make_parameterization, real_per_base
from .synthetic import FACTOR_PREFIX, FACTOR_SPEC_KEY, InvalidSet, check_structure, factors_from_arrays
from .task import DistillTask

MAX_REASON_CHARS = 300
MAX_META_CHARS = 65_536  # of the canonical (stored) set metadata JSON

MAX_LR = 100.0  # a learned learning rate (MTT) above this is not a plausible step size
SOFT_LABEL_TOLERANCE = 1e-3
NPY_HEADER_BYTES = 4096  # slack per array for the .npy header in a size check before decoding
ARRAY_KEYS = ("images", "labels", "lr")
FACTORED_KEYS = ("labels", FACTOR_SPEC_KEY, "lr")  # plus factor_<name> arrays
MAX_FACTOR_ARRAYS = 8  # the largest kind (haba) stores 7

class RunPrivacy(NamedTuple):
    """The run's privacy settings every figure is checked against (the server's, never a client's)."""

    dp: str = "none"
    delta: float = 1e-5
    rho: float = 0.0


@dataclass(frozen=True)
class Expectation:
    """What an acceptable upload looks like in this run and round."""

    info: DatasetInfo
    method: str
    ipc: int
    round: int
    max_abs_pixel: float = 100.0
    dp: str = "none"
    delta: float = 1e-5
    rho: float = 0.0
    # The client's class budget (distill.task.class_budget); None skips the budget check.
    min_class_samples: int | None = None
    samples_per_image: int | None = None
    # The factor spec every upload must carry (JSON, sorted keys; see :func:`factor_spec_json`);
    # "" for a plain (``param`` pixels) run, whose uploads carry ``images``.
    factor_spec: str = ""

    @property
    def privacy(self) -> RunPrivacy:
        return RunPrivacy(self.dp, self.delta, self.rho)

    @property
    def spec(self) -> dict | None:
        return json.loads(self.factor_spec) if self.factor_spec else None

    @property
    def per_base(self) -> int:
        """Images one stored base decodes to (1 for a plain run)."""
        return images_per_base(self.spec) if self.factor_spec else 1

    def max_upload_bytes(self) -> int:
        """The largest honest upload's array bytes, header slack included (checked before decoding).

        Factorised: ``ipc x classes`` stored bases, ``per_base`` labels each, the shared
        networks once, the spec and one header per array.
        """
        k, per_image = self.info.num_classes, 4 * math.prod(self.info.image_shape)
        label = max(8, 4 * k)  # int64 hard or float32 soft
        spec = self.spec
        if spec is None:
            return self.ipc * k * (per_image + label) + len(ARRAY_KEYS) * NPY_HEADER_BYTES + 4
        shapes = expected_shapes(spec, self.info.channels, 1)
        base_key = BASE_KEY[spec["kind"]]
        per_base_bytes = per_image if -1 in shapes[base_key] else 4 * math.prod(shapes[base_key][1:])
        shared = sum(4 * math.prod(s) for name, s in shapes.items() if name != base_key)
        return (self.ipc * k * (per_base_bytes + self.per_base * label) + shared + MAX_SPEC_CHARS
                + (len(shapes) + len(FACTORED_KEYS)) * NPY_HEADER_BYTES + 4)

    def max_reply_bytes(self) -> int:
        """The largest honest reply: its arrays, the metadata, and metrics (a class histogram and
        a dozen figures), with slack; counted as :func:`server.wire.reply_bytes` counts."""
        metrics = 8 * (self.info.num_classes + 64) + 2048
        return self.max_upload_bytes() + 64 * (MAX_FACTOR_ARRAYS + len(ARRAY_KEYS)) + MAX_META_CHARS + metrics


def factor_spec_json(param: str, options: dict | None, info: DatasetInfo) -> str:
    """The factor spec a client of a run with ``param`` / ``options`` uploads ("" for pixels).

    Built the way a client builds it (a parameterisation over a blank image), so the two agree.
    """
    init = torch.zeros(real_per_base(param, options), *info.image_shape)
    factors = make_parameterization(init, 0.0, torch.Generator(), param, options).factors()
    return factors.spec_json() if factors is not None else ""


def expectation(task: DistillTask, info: DatasetInfo, round_: int, max_abs_pixel: float = 100.0) -> Expectation:
    """What an acceptable upload of ``round_`` looks like in a run of ``task`` on ``info``'s geometry."""
    return Expectation(info, task.distill_method, task.ipc, round_, max_abs_pixel, task.dp, task.delta, task.rho,
                       min_class_samples=task.min_class_samples, samples_per_image=task.samples_per_image,
                       factor_spec=factor_spec_json(task.param, task.param_options, info))


def check_keys(keys: Iterable[str], exp: Expectation | None = None) -> None:
    """``images`` and ``labels``, optionally ``lr``, and nothing else; or, where the run's
    parameterisation is factorised (``exp.factor_spec``), ``labels``, ``factors_json`` and
    ``factor_<name>`` arrays, optionally ``lr``, no ``images``.

    Without ``exp`` either form is accepted (the form's own keys are still enforced).
    """
    keys = set(keys)
    factored = FACTOR_SPEC_KEY in keys if exp is None else bool(exp.factor_spec)
    if not factored:
        check_plain_keys(keys)
        return
    factors = {k for k in keys if k.startswith(FACTOR_PREFIX)}
    run = f"the run's param is {exp.spec['kind']}: " if exp is not None and exp.spec else ""
    if not {"labels", FACTOR_SPEC_KEY} <= keys or keys - set(FACTORED_KEYS) - factors \
            or not 0 < len(factors) <= MAX_FACTOR_ARRAYS:
        raise InvalidSet("keys", f"{run}expected labels, {FACTOR_SPEC_KEY} and 1 to {MAX_FACTOR_ARRAYS} "
                               f"{FACTOR_PREFIX}<name> arrays (lr optional, no images), got {shown_keys(keys)}")


def shown_keys(keys: set[str]) -> str:
    shown = sorted(keys)[:10]
    return f"{shown}" + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")


def check_plain_keys(keys: set[str]) -> None:
    """``images`` and ``labels``, optionally ``lr``, and nothing else."""
    if not {"images", "labels"} <= keys or keys - set(ARRAY_KEYS):
        raise InvalidSet("keys", f"expected images, labels (lr optional), got {shown_keys(keys)}")


def allowed_dtypes(key: str) -> tuple[str, ...]:
    if key.startswith(FACTOR_PREFIX):
        return ("float32",)
    return {"images": ("float32",), "labels": ("int64", "float32"), "lr": ("float32",),
            FACTOR_SPEC_KEY: ("uint8",)}.get(key, ())


def validate_set(arrays: Mapping[str, np.ndarray], exp: Expectation) -> None:
    """Raise :class:`InvalidSet` unless ``arrays`` (a set's wire form) is a set this run accepts.

    The one validation of a synthetic set, for a reply and for a stored set read back: the keys
    and dtypes of the run's form; a factorised upload's factors checked against the run's spec
    and bounded before they are decoded; the decoded images then pass
    :func:`distill.synthetic.check_structure` and the run's bounds (magnitude, learned lr, soft
    labels that are distributions, and at most ``ipc`` images, or stored bases, per class).
    """
    check_keys(arrays, exp)
    wrong = {k: str(a.dtype) for k, a in arrays.items() if str(a.dtype) not in allowed_dtypes(k)}
    if wrong:
        raise InvalidSet("dtype", f"dtypes {wrong}; want images float32, labels int64 or float32, lr float32, "
                                  f"{FACTOR_SPEC_KEY} uint8, {FACTOR_PREFIX}* float32")
    labels, per_base, k = arrays["labels"], exp.per_base, exp.info.num_classes
    images = decode_factors(arrays, exp) if FACTOR_SPEC_KEY in arrays else arrays["images"]
    check_structure(images, labels, exp.info, per_base)
    n = images.shape[0]
    if "lr" in arrays and arrays["lr"].shape != (1,):
        raise InvalidSet("shape", f"lr must be one float32, got {arrays['lr'].shape}")
    if n == 0:
        raise InvalidSet("shape", "empty set")
    if not all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f"):
        raise InvalidSet("non-finite", "NaN or Inf in the upload")
    peak = float(np.abs(images).max())
    if peak > exp.max_abs_pixel:
        raise InvalidSet("magnitude", f"|pixel| up to {peak:.3g} > {exp.max_abs_pixel} (normalised space)")
    if "lr" in arrays and not 0.0 < float(arrays["lr"][0]) <= MAX_LR:
        raise InvalidSet("magnitude", f"learned lr {float(arrays['lr'][0]):.3g} outside (0, {MAX_LR}]")
    soft = labels.ndim == 2
    if soft and (labels.min() < 0 or np.abs(labels.sum(1) - 1).max() > SOFT_LABEL_TOLERANCE):
        raise InvalidSet("soft-labels", "soft labels are not probability distributions")
    hard = labels.argmax(1) if soft else labels
    counts = np.bincount(hard[::per_base], minlength=k)  # stored bases (images, for a plain set) per class
    if n > exp.ipc * k * per_base or counts.max() > exp.ipc:
        what = "images" if per_base == 1 else f"stored bases ({n} images)"
        raise InvalidSet("too-many", f"{n // per_base} {what}, up to {counts.max()} in one class; run allows "
                                     f"{exp.ipc} per class")


def decode_factors(arrays: dict[str, np.ndarray], exp: Expectation) -> np.ndarray:
    """The images a factorised upload decodes to, after checking its spec against the run's
    and bounding every factor (names, shapes, finiteness, decoded count) before decoding."""
    try:
        factors = factors_from_arrays(arrays)
    except ValueError as err:
        raise InvalidSet("factors", shorten(str(err))) from err
    if factors.spec != exp.spec:
        raise InvalidSet("factors", f"factor spec {factors.spec_json()} is not the run's {exp.factor_spec or 'pixels'}")
    if not all(torch.isfinite(a).all() for a in factors.arrays.values()):
        raise InvalidSet("non-finite", "NaN or Inf in the factors")
    base = factors.arrays.get(BASE_KEY[factors.kind])
    k, info = exp.info.num_classes, exp.info
    if base is not None and base.ndim >= 1 and base.shape[0] > exp.ipc * k:
        raise InvalidSet("too-many", f"{base.shape[0]} stored bases; run allows {exp.ipc} per class "
                                   f"({exp.ipc * k} in all)")
    problem = check_factors(factors, info.channels, info.height, info.width,
                            max_images=exp.ipc * k * factors.per_base)
    if problem:
        raise InvalidSet("factors", shorten(problem))
    return factors.decode().numpy()


def shorten(reason: str) -> str:
    """A long remote message's end says what happened."""
    return reason if len(reason) <= MAX_REASON_CHARS else "..." + reason[-MAX_REASON_CHARS:]
