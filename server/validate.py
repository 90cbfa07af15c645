"""Upload validation: every reply is checked before the server touches it (DESIGN "Bad input").

A reply is untrusted input. :func:`check_reply` turns it into a :class:`SyntheticSet` or
raises :class:`Rejected` with a short ``kind`` (counted in the round's metrics) and a
human-readable ``detail`` (logged). Arrays are decoded by Flower with ``allow_pickle=False``.
What the set itself must be is :func:`distill.upload.validate_set`'s, against the run's
:class:`~distill.upload.Expectation`; this module adds the reply around it: records, sizes
before decoding, metadata, metrics and privacy figures.

Privacy figures are recorded only once :func:`check_figures` has passed them, for accepted sets
and declines alike: a decline whose figures fail is still a decline (:class:`Declined`, nothing
was uploaded), but its figures are refused and counted, never recorded.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from distill.synthetic import FACTOR_PREFIX, FACTOR_SPEC_KEY, SetMetadata, SyntheticSet
from distill.task import DP_ACCOUNTANTS as ACCOUNTANTS  # the wire schema: no Opacus on the server
from distill.task import class_budget
from distill.upload import Expectation, RunPrivacy, allowed_dtypes, check_keys, shorten, shown_keys, validate_set

from .errors import Declined, Rejected
from .wire import DECLINE_RECORDS, UPLOAD_RECORDS, canonical_meta, check_records, check_reply_size, is_int, parse_meta

# Rejection kinds, one counter each in metrics.jsonl ("rejected-<kind>"). ``timeout``,
# ``duplicate`` and ``unsolicited`` are decided by the round loop (server/rounds.py), not here.
KINDS = ("error-reply", "malformed", "keys", "oversized", "dtype", "shape", "non-finite", "magnitude",
         "label-range", "soft-labels", "too-many", "factors", "metadata", "privacy", "declined-budget",
         "declined-policy", "duplicate", "unsolicited", "timeout", "defense-dropped", "records")
# A client's ``declined`` record kind -> rejection kind. ``budget``: the node's privacy budget would be
# exceeded; ``policy``: the node's own privacy policy refuses the task.
DECLINE_KINDS = {"budget": "declined-budget", "policy": "declined-policy"}
# Privacy figures of a DP reply: metric key -> the set-meta ``privacy`` key that must agree with it.
DP_FIGURES = {"epsilon-round": "epsilon", "delta": "delta", "sigma": "sigma", "sample-rate": "sample_rate",
              "steps": "steps", "rho": "rho"}
# Every privacy figure a reply's metrics may carry; only validated ones reach metrics.jsonl and summary.json.
PRIVACY_METRICS = ("epsilon-round", "epsilon-total", "epsilon-planned", "delta", "sigma", "sample-rate",
                   "steps", "clip", "rho", "privacy-budget")
# Every metric an upload may report (client/app.py, client/private.py); any other is refused.
UPLOAD_METRICS = ("num-examples", "class-histogram", "seconds", "bytes-uploaded", "classes-capped",
                  "classes-skipped", *PRIVACY_METRICS)
EPSILON_FIGURES = ("epsilon-round", "epsilon-total", "epsilon-planned")
# Figures that only a DP mechanism has: a reply of a run without DP that carries one is lying.
DP_ONLY_FIGURES = (*EPSILON_FIGURES, "delta", "sigma")
# The figures each decline kind carries in a DP run, exactly (none in a run without DP).
DECLINE_FIGURES = {"budget": ("epsilon-total", "epsilon-planned", "delta", "privacy-budget"), "policy": ("delta",)}
FORGED = "forged privacy figures"  # how a decline's refused figures are logged and counted


def check_record_size(record: ArrayRecord, exp: Expectation) -> None:
    """Refuse an upload larger than the largest set the run allows, before decoding it.

    The declared dtypes are checked first so that a wrong dtype is named as such; the
    decoded arrays are checked again (a declaration is only a claim).
    """
    declared = {key: str(arr.dtype) for key, arr in record.items()}
    wrong = {key: d for key, d in declared.items() if d not in allowed_dtypes(key)}
    if wrong:
        raise Rejected("dtype", f"declared dtypes {wrong}; want images float32, labels int64 or float32, "
                                f"lr float32, {FACTOR_SPEC_KEY} uint8, {FACTOR_PREFIX}* float32")
    size = sum(len(arr.data) for arr in record.values())
    if size > exp.max_upload_bytes():
        raise Rejected("oversized", f"{size} bytes of arrays; the run's largest set "
                                    f"(ipc {exp.ipc} x {exp.info.num_classes} classes) is {exp.max_upload_bytes()}")


def check_meta(meta_json: object, exp: Expectation) -> SetMetadata:
    """Parse the metadata strictly (:func:`server.wire.parse_meta`) and raise :class:`Rejected`
    where it contradicts the run."""
    meta = parse_meta(meta_json)
    # The dataset's name may differ between sites (a local .npz); geometry and normalisation may not.
    claims = {"dataset": (replace(meta.dataset, name=exp.info.name), exp.info), "method": (meta.method, exp.method),
              "ipc": (meta.ipc, exp.ipc), "round": (meta.round, exp.round)}
    wrong = [f"{name}={got!r} (run: {want!r})" for name, (got, want) in claims.items() if got != want]
    if wrong:
        raise Rejected("metadata", "metadata contradicts the run: " + "; ".join(wrong))
    return meta


def check_metrics(metrics: MetricRecord, arrays: dict[str, np.ndarray], exp: Expectation) -> None:
    """The reported metrics must be well-formed and agree with the upload and the dataset.

    Bytes must match what arrived; the class histogram must be counts; and where the run
    gives the client's class budget, the set's hard-label class counts may not exceed what
    that histogram allows, nor may the reported capped / skipped classes differ from it.
    A DP client reports no exact counts of its data, so under DP the histogram is optional.
    """
    if unknown := sorted(set(metrics) - set(UPLOAD_METRICS)):
        raise Rejected("metadata", f"unknown metrics {[str(u)[:40] for u in unknown[:5]]}; an upload reports "
                                   f"only {list(UPLOAD_METRICS)}")
    k = exp.info.num_classes
    hist = metrics.get("class-histogram", None if exp.dp != "none" else [])
    if hist is not None and not (isinstance(hist, list) and len(hist) == k and all(_count(v) for v in hist)):
        raise Rejected("metadata", f"class-histogram must list {k} integer counts >= 0")
    sent = sum(a.nbytes for a in arrays.values())
    if metrics.get("bytes-uploaded") != sent:
        raise Rejected("metadata", f"bytes-uploaded {metrics.get('bytes-uploaded')} != {sent} received")
    bad = [key for key, ok in (("seconds", _finite_non_negative), ("num-examples", _count),
                               ("classes-capped", _count), ("classes-skipped", _count))
           if key in metrics and not ok(metrics[key])]
    if bad:
        raise Rejected("metadata", f"metrics {bad} must be finite and >= 0 (counts: integers)")
    if hist is not None:
        check_class_counts(metrics, np.asarray(hist, dtype=np.int64), arrays["labels"], exp)


def check_class_counts(metrics: MetricRecord, hist: np.ndarray, labels: np.ndarray, exp: Expectation) -> None:
    """Counts reported in the metrics against the histogram, and the set's classes against the budget."""
    if "num-examples" in metrics and metrics["num-examples"] != int(hist.sum()):
        raise Rejected("metadata", f"num-examples {metrics['num-examples']} != {int(hist.sum())} in the histogram")
    if exp.min_class_samples is None or exp.samples_per_image is None:
        return
    allowed = class_budget(hist, exp.ipc, exp.min_class_samples, exp.samples_per_image)  # the client's own rule
    budget = allowed.counts
    derived = {"classes-capped": len(allowed.capped), "classes-skipped": len(allowed.skipped)}
    wrong = [f"{key} {metrics[key]} (histogram says {v})" for key, v in derived.items()
             if key in metrics and metrics[key] != v]
    if wrong:
        raise Rejected("metadata", "; ".join(wrong))
    if labels.ndim == 1:  # soft labels may drift between classes while learned: their argmax is not a budget
        bases = labels[::exp.per_base]  # a factorised set's budget counts stored bases
        over = np.flatnonzero(np.bincount(bases, minlength=len(hist))[:len(hist)] > budget)
        if len(over):
            raise Rejected("metadata", f"classes {over[:10].tolist()} have more "
                                       f"{'images' if exp.per_base == 1 else 'stored bases'} than the client's "
                                       "histogram allows")


def _count(value: object) -> bool:
    return is_int(value) and value >= 0


def _finite_non_negative(value: object) -> bool:
    return _finite(value) and value >= 0


def _finite(value: object) -> bool:
    """A real, finite number; not a bool, and not an int too large for a float (from JSON)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _whole(value: object) -> bool:
    return _finite(value) and float(value).is_integer()


# One rule per figure: (holds, what it must be). ``run`` is the run's privacy settings.
FIGURE_RULES: dict[str, tuple[Callable[[Any, RunPrivacy], bool], str]] = {
    **{k: (lambda v, run: v >= 0, ">= 0") for k in EPSILON_FIGURES},
    "delta": (lambda v, run: 0.0 < v < 1.0 and (run.dp == "none" or v == run.delta), "in (0, 1), the run's delta"),
    "sigma": (lambda v, run: v >= 0, ">= 0"),
    "sample-rate": (lambda v, run: 0.0 < v <= 1.0, "in (0, 1]"),
    "steps": (lambda v, run: _whole(v) and v >= 0, "an integer >= 0"),
    "clip": (lambda v, run: v >= 0, ">= 0"),
    "rho": (lambda v, run: 0.0 <= v < 1.0 and abs(v - run.rho) <= 1e-12, "in [0, 1), the run's rho"),
    "privacy-budget": (lambda v, run: v >= 0, ">= 0"),
}


def check_figures(metrics: Mapping[str, object], run: RunPrivacy) -> dict[str, float | int]:
    """The privacy figures among ``metrics``, each possible on its own, together and in this run.

    Raises :class:`Rejected` (``privacy``) otherwise: a figure that is not a finite real number
    (a bool is not one), out of its range, a delta or rho other than the run's, a planned total
    below the spent one, or any epsilon / delta / sigma in a run without DP, where no such
    guarantee exists. Nothing a client reports is recorded unless it passed here.
    """
    figures = {k: metrics[k] for k in PRIVACY_METRICS if k in metrics}
    if bad := [k for k, v in figures.items() if not _finite(v)]:
        raise Rejected("privacy", f"privacy figures {bad} are not finite real numbers")
    if run.dp == "none" and (dp_only := [k for k in DP_ONLY_FIGURES if k in figures]):
        raise Rejected("privacy", f"privacy figures {dp_only} in a run without DP (dp='none')")
    wrong = [f"{k}={v!r} (must be {FIGURE_RULES[k][1]})" for k, v in figures.items()
             if not FIGURE_RULES[k][0](v, run)]
    if wrong:
        raise Rejected("privacy", "impossible privacy figures: " + "; ".join(wrong))
    if "epsilon-planned" in figures and "epsilon-total" in figures \
            and figures["epsilon-planned"] < figures["epsilon-total"] * (1 - 1e-9):
        raise Rejected("privacy", f"epsilon-planned {figures['epsilon-planned']} below epsilon-total "
                                  f"{figures['epsilon-total']}")
    return figures


def recorded_figures(figures: Mapping[str, float | int], run: RunPrivacy) -> dict[str, float | int]:
    """The validated figures worth recording: all under DP; without DP only rho (KIP-rho's figure)."""
    return dict(figures) if run.dp != "none" else {k: v for k, v in figures.items() if k == "rho"}


def check_meta_privacy(meta: SetMetadata, exp: Expectation) -> dict[str, Any]:
    """The set metadata's privacy claims (metric key -> value), possible and the run's.

    Without DP only rho is claimed and it must be the run's. Under DP every figure of
    :data:`DP_FIGURES` must be there and pass :func:`check_figures`, and the accountant must be
    one the project offers: a stored set (resume) is checked with this alone.
    """
    if exp.dp == "none":
        if dp_only := sorted({DP_FIGURES.get(k, k) for k in DP_ONLY_FIGURES} & set(meta.privacy)):
            raise Rejected("privacy", f"privacy figures {dp_only} in the metadata of a run without DP (dp='none')")
        rho = meta.privacy.get("rho", 0.0)
        if not _finite(rho) or abs(float(rho) - exp.rho) > 1e-12:
            raise Rejected("privacy", f"rho {rho!r} in the metadata, run has {exp.rho}")
        return {"rho": rho} if "rho" in meta.privacy else {}
    claims = {m: meta.privacy.get(k) for m, k in DP_FIGURES.items()}
    if missing := [k for k, v in claims.items() if v is None]:
        raise Rejected("privacy", f"missing privacy figures {missing} in the set's metadata")
    check_figures(claims, exp.privacy)
    if meta.privacy.get("accountant") not in ACCOUNTANTS:
        raise Rejected("privacy", f"accountant {str(meta.privacy.get('accountant'))[:40]!r} is not one of "
                                  f"{list(ACCOUNTANTS)}")
    return claims


def check_privacy(meta: SetMetadata, metrics: MetricRecord, exp: Expectation) -> None:
    """An accepted set's privacy figures: possible, the run's, and the same in metrics and metadata.

    The server cannot verify a client's noise; it refuses figures that cannot be true
    (non-finite epsilon, delta outside (0, 1), a total below the round's spend, any epsilon in
    a run without DP) or that contradict the run (delta, rho) or each other (metadata vs metrics).
    """
    figures = check_figures(metrics, exp.privacy)
    claims = check_meta_privacy(meta, exp)
    if exp.dp == "none":
        return
    if missing := [k for k in (*DP_FIGURES, "epsilon-total") if k not in figures]:
        raise Rejected("privacy", f"missing privacy figures {missing} in the metrics")
    if differ := [k for k, v in claims.items() if float(figures[k]) != float(v)]:
        raise Rejected("privacy", f"metrics {differ} differ from the set's metadata")
    eps, total = float(claims["epsilon-round"]), float(figures["epsilon-total"])
    if total < eps * (1 - 1e-9):
        raise Rejected("privacy", f"epsilon-total {total} below this round's epsilon {eps}")


def check_recorded(entry: object, run: RunPrivacy) -> dict[str, Any]:
    """A node's ``privacy`` entry of a metrics.jsonl line, as the round loop records it, or
    :class:`Rejected` (``privacy``). Run stores are read back (resume), so their figures are
    checked again before they reach summary.json.
    """
    if not isinstance(entry, dict) or entry.get("status") not in ("accepted", "declined"):
        raise Rejected("privacy", "a privacy entry must be a mapping with status accepted or declined")
    figures = check_figures(entry, run)
    if entry["status"] == "accepted":
        allowed = set(PRIVACY_METRICS)
    else:  # a decline records its figures only under DP
        allowed = {k for names in DECLINE_FIGURES.values() for k in names} if run.dp != "none" else set()
    if unknown := sorted(set(entry) - {"status", "accountant"} - (set(figures) & allowed)):
        raise Rejected("privacy", f"privacy entry keys {unknown[:10]} are not recorded figures")
    if recorded_figures(figures, run) != figures:
        raise Rejected("privacy", f"privacy figures {sorted(figures)} in a run without DP (dp='none')")
    if "accountant" in entry and (run.dp == "none" or entry["status"] != "accepted"
                                  or entry["accountant"] not in ACCOUNTANTS):
        raise Rejected("privacy", f"accountant {str(entry['accountant'])[:40]!r} where none can be")
    return dict(entry)


def decline_figures(kind: str, metrics: object, run: RunPrivacy) -> dict[str, float | int]:
    """The validated figures of a ``kind`` decline: exactly :data:`DECLINE_FIGURES` under DP, none without.

    Raises :class:`Rejected` (``privacy``) for figures that fail :func:`check_figures`, are
    missing, or are not ones this kind of decline reports.
    """
    metrics = metrics if isinstance(metrics, Mapping) else {}  # a ConfigRecord may smuggle bools: checked
    figures = check_figures(metrics, run)
    want = set(DECLINE_FIGURES[kind]) if run.dp != "none" else set()
    extra, missing = sorted(set(figures) - want), sorted(want - set(figures))
    if extra or missing:
        raise Rejected("privacy", f"a {kind} decline reports {sorted(want)}; got {extra} more, {missing} missing")
    return figures


def check_declined(content: RecordDict, run: RunPrivacy) -> NoReturn:
    """A client that declined the round: raise :class:`Declined` with its kind, (bounded) reason
    and validated figures; a decline with refused figures is still a decline (nothing was uploaded).

    A ``declined`` record of unknown kind is ``malformed``.
    """
    record = content["declined"]
    raw = str(record.get("kind")) if isinstance(record, ConfigRecord) else ""
    if raw not in DECLINE_KINDS:
        raise Rejected("malformed", f"declined record of unknown kind; known: {sorted(DECLINE_KINDS)}")
    reason = shorten(str(record.get("reason", ""))) or "no reason given"
    try:
        figures, refused = decline_figures(raw, content.get("metrics"), run), ""
    except Rejected as err:
        figures, refused = {}, err.detail
    raise Declined(DECLINE_KINDS[raw], reason, figures, refused)


def decode(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Decode every array of ``record`` with :func:`decode_array`."""
    return {key: decode_array(key, arr) for key, arr in record.items()}


def decode_array(key: str, arr: Array) -> np.ndarray:
    """One array, decoded with ``allow_pickle=False``; a corrupt payload is ``malformed``.

    ``np.load`` on hostile bytes raises many types (EOFError, BadZipFile, TokenError,
    ValueError, ...), and a zip payload decodes to an ``NpzFile``, not an array.
    """
    try:
        value = arr.numpy()
    except Exception as err:  # noqa: BLE001 - any decoding failure is the sender's fault
        raise Rejected("malformed", f"undecodable array {key!r} ({type(err).__name__}: "
                                    f"{shorten(str(err))})") from err
    if not isinstance(value, np.ndarray):
        raise Rejected("malformed", f"array {key!r} decodes to {type(value).__name__}, not an ndarray")
    return value


def check_stored_set(path: str | Path, exp: Expectation) -> SyntheticSet:
    """A set read back from the run store (resume): an upload's checks, less the reply's metrics."""
    syn = SyntheticSet.load(path)  # allow_pickle=False; decodes a factorised set after checking it
    validate_set(syn.to_arrays(), exp)
    meta = check_meta(canonical_meta(syn.meta), exp)
    check_meta_privacy(meta, exp)  # a stored set has no reply metrics: its metadata's figures alone
    return syn


def check_reply(reply: Message, exp: Expectation) -> SyntheticSet:
    """The validated synthetic set in ``reply``, or :class:`Rejected` saying why not."""
    if reply.has_error():
        raise Rejected("error-reply", f"code {reply.error.code}: {shorten(reply.error.reason)}")
    content = reply.content
    check_reply_size(content, exp.max_reply_bytes())
    if "declined" in content:
        check_records(content, DECLINE_RECORDS)
        check_declined(content, exp.privacy)
    check_records(content, UPLOAD_RECORDS)
    check_keys(content["synthetic"].keys(), exp)
    check_record_size(content["synthetic"], exp)
    arrays = decode(content["synthetic"])
    validate_set(arrays, exp)
    if list(content["meta"].keys()) != ["set-meta"]:
        raise Rejected("records", f"the meta record holds set-meta only; got {shown_keys(set(content['meta']))}")
    meta = check_meta(content["meta"].get("set-meta"), exp)
    check_metrics(content["metrics"], arrays, exp)
    check_privacy(meta, content["metrics"], exp)
    try:
        return SyntheticSet.from_arrays(arrays, meta)  # decodes factors once more, bit for bit
    except ValueError as err:  # the checks above should have said why; never let it escape
        raise Rejected("malformed", shorten(str(err))) from err
