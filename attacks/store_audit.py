"""Audit a finished run store (``runs/<time>-<name>/``) offline, without Flower.

What the store holds (``server/store.py``; its file names and config format are
:mod:`distill.store_format`, the code the server itself writes and resumes with): ``config.json``
(the flat kebab-case run config, migrated to the current store format; a newer format is refused),
``sets/round<r>-node<id>.npz`` (accepted sets; ``meta.client`` is the partition id),
``global_model.pt`` (a ConvNet ``state_dict``), ``summary.json``. Targets here:

- every accepted set itself (distance attack, no model) with that client's distilled
  partition as members;
- the global model (loss and confidence attacks) with all stored clients' data as members.

Members are re-derived exactly as the client derived them, from the run's config with
``distill.partition`` (the same partitioner and held-out split the client uses).
``config.json`` does not record the number of partitions, so it is an argument (default:
the number of distinct clients in the store, right when every partition uploaded). Non-members
are test-split images, which no client held, drawn per class with the members' class histogram:
a non-IID client's members are class-skewed, and against class-balanced non-members a score
that only tells classes apart would pass for membership (:func:`class_matched_indices`). Store
runs have no randomised inclusion, so their epsilon figures are indicative, not an audit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.data import LabeledImages, load_dataset
from distill.networks import seeded_network
from distill.partition import partition, split_held_out
from distill.store_format import CONFIG_NAME, read_config, stored_sets
from distill.synthetic import SyntheticSet

from .membership import AttackResult, confidence_attack, distance_attack, loss_attack
from .metrics import epsilon_lower_bound_from_scores


@dataclass
class StoredRun:
    root: Path
    config: dict[str, Any]
    sets: list[tuple[int, str, SyntheticSet]]  # (round, partition id, set)
    model_state: dict[str, torch.Tensor] | None
    summary: dict[str, Any]


def read_store(root: str | Path) -> StoredRun:
    """Load a run store; sets via ``SyntheticSet.load`` (no pickle), the model with ``weights_only``."""
    root = Path(root)
    if not (root / CONFIG_NAME).is_file():
        raise ValueError(f"{root} is not a run store: no {CONFIG_NAME}")
    config = read_config(root)
    sets = []
    for name, path in stored_sets(root):
        syn = SyntheticSet.load(path)
        sets.append((name.round, syn.meta.client, syn))
    model = root / "global_model.pt"
    state = torch.load(model, weights_only=True, map_location="cpu") if model.is_file() else None
    summary_path = root / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return StoredRun(root, config, sets, state, summary)


def latest_sets(run: StoredRun) -> dict[str, SyntheticSet]:
    """The newest set of each client (what the server's pool trained on last)."""
    out: dict[str, tuple[int, SyntheticSet]] = {}
    for rnd, client, syn in run.sets:
        if client not in out or rnd >= out[client][0]:
            out[client] = (rnd, syn)
    return {c: s for c, (_, s) in sorted(out.items())}


def client_members(config: dict[str, Any], partition_id: int, num_partitions: int) -> LabeledImages:
    """The real images client ``partition_id`` distilled (its partition minus its held-out part)."""
    needed = ("dataset", "partitioner", "alpha", "shards-per-client", "seed", "holdout-fraction")
    missing = [k for k in needed if k not in config]
    if missing:
        raise ValueError(f"config.json lacks {missing}: cannot re-derive the clients' partitions")
    train = load_dataset(str(config["dataset"])).train
    parts = partition(train.labels.numpy(), num_partitions, str(config["partitioner"]), alpha=float(config["alpha"]),
                      shards_per_client=int(config["shards-per-client"]), seed=int(config["seed"]))
    distilled, _ = split_held_out(parts[partition_id], int(config["seed"]), partition_id,
                                  float(config["holdout-fraction"]))
    return train.subset(distilled)


def class_matched_indices(member_labels: np.ndarray, pool_labels: np.ndarray, seed: int
                          ) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[int, int]]]:
    """``(member idx, non-member idx, capped)`` with one class histogram for both, drawn without replacement.

    Per class of the members: every member, or as many as the pool holds of that class, and as
    many pool images of the class. Matching removes class as a confounder: with the members'
    histogram in the non-members too, a score that is blind to the record sits at AUC 0.5 even
    for a skewed client. ``capped`` maps each class the pool could not match to
    ``(members it had, members kept)``, so the caller can say so.
    """
    member_labels, pool_labels = np.asarray(member_labels), np.asarray(pool_labels)
    rng = np.random.default_rng(seed)
    picked_in, picked_out, capped = [], [], {}
    for c in np.unique(member_labels):
        of_c, pool_c = np.flatnonzero(member_labels == c), np.flatnonzero(pool_labels == c)
        n = min(of_c.size, pool_c.size)
        if n < of_c.size:
            capped[int(c)] = (int(of_c.size), n)
        picked_in.append(rng.choice(of_c, n, replace=False))
        picked_out.append(rng.choice(pool_c, n, replace=False))
    return (np.sort(np.concatenate(picked_in)).astype(np.int64), np.sort(np.concatenate(picked_out)).astype(np.int64),
            capped)


def class_matched(members: LabeledImages, pool: LabeledImages, seed: int
                  ) -> tuple[LabeledImages, LabeledImages, dict[int, tuple[int, int]]]:
    """:func:`class_matched_indices` applied to the images."""
    mi, ni, capped = class_matched_indices(members.labels.numpy(), pool.labels.numpy(), seed)
    return members.subset(mi), pool.subset(ni), capped


def cap_note(target: str, capped: dict[int, tuple[int, int]]) -> str | None:
    """A report note naming the classes whose members were cut to the non-members available."""
    if not capped:
        return None
    cut = ", ".join(f"class {c}: {kept} of {had}" for c, (had, kept) in sorted(capped.items()))
    return (f"{target}: too few test images of some classes to match the members' histogram, so those "
            f"classes' members were capped too ({cut}).")


def global_model(run: StoredRun, info) -> torch.nn.Module | None:
    if run.model_state is None:
        return None
    kw = {"width": int(run.config.get("net-width", 32)), "depth": int(run.config.get("net-depth", 3))}
    net = seeded_network("convnet", info.channels, info.num_classes, (info.height, info.width), seed=0, **kw)
    net.load_state_dict(run.model_state)
    return net.eval()


def patch_brightness(syn: SyntheticSet, size: int = 3, margin: int = 1) -> list[float]:
    """Mean pixel value (in [0, 1]) of the bottom-right patch per class: a naive trigger brightens
    the target class there (ATTACK_NOTES: 0.42 / 0.76 vs 0.00 elsewhere)."""
    info = syn.meta.dataset
    m = torch.tensor(info.mean).view(1, -1, 1, 1)
    s = torch.tensor(info.std).view(1, -1, 1, 1)
    px = (syn.images * s + m).clamp(0, 1)
    h, w = info.height, info.width
    patch = px[:, :, h - margin - size:h - margin, w - margin - size:w - margin].mean(dim=(1, 2, 3))
    labels = syn.hard_labels()
    return [float(patch[labels == c].mean()) if (labels == c).any() else float("nan") for c in range(info.num_classes)]


def audit_store(root: str | Path, test: LabeledImages, num_partitions: int | None = None,
                max_clients: int = 10, seed: int = 0, delta: float = 1e-5) -> dict[str, Any]:
    """Membership results per stored client set and for the global model, backdoor patch statistics,
    claimed vs indicative empirical epsilon."""
    run = read_store(root)
    sets = latest_sets(run)
    if not sets:
        raise ValueError(f"{root}: no accepted sets under sets/")
    n_parts = num_partitions or int(run.config.get("num-partitions", len(sets)))
    results: list[AttackResult] = []
    all_members: list[LabeledImages] = []
    backdoor_rows, dp_rows = [], []
    cap_notes: list[str | None] = []
    for client, syn in list(sets.items())[:max_clients]:
        members = client_members(run.config, int(client), n_parts)
        all_members.append(members)
        m, nm, capped = class_matched(members, test, seed)
        r = distance_attack(syn, m, nm, target=f"set of client {client}")
        cap_notes.append(cap_note(r.target, capped))
        results.append(r)
        eps = syn.meta.privacy.get("epsilon", "none")
        dp_rows.append({"target": r.target, "attack": r.attack, "claimed_epsilon": eps,
                        "indicative_epsilon_lb": epsilon_lower_bound_from_scores(r.scores_in, r.scores_out, delta)
                        if len(m) >= 8 else float("nan"), "trials": 2 * len(m)})
        bright = patch_brightness(syn)
        finite = [b for b in bright if np.isfinite(b)]
        top = int(np.nanargmax(bright))
        backdoor_rows.append({"client": client, "brightest_patch_class": top, "patch_mean": bright[top],
                              "patch_median_other": float(np.median([b for i, b in enumerate(bright)
                                                                     if i != top and np.isfinite(b)] or [0.0])),
                              "classes": len(finite)})
    info = next(iter(sets.values())).meta.dataset
    net = global_model(run, info)
    if net is not None:
        pooled = LabeledImages(torch.cat([m.images for m in all_members]), torch.cat([m.labels for m in all_members]), info)
        m, nm, capped = class_matched(pooled, test, seed)
        cap_notes.append(cap_note("global model", capped))
        results += [loss_attack(net, m, nm, "global model"), confidence_attack(net, m, nm, "global model")]
    notes = [f"{len(sets)} client sets in the store, {min(len(sets), max_clients)} audited; partitions re-derived "
             f"with num-partitions={n_parts}; non-members from the {test.info.name} test split, drawn per class "
             "with the members' class histogram (a score that only tells classes apart then sits at AUC 0.5).",
             *[n for n in cap_notes if n]]
    return {"scenario": "run-store", "results": results, "config": run.config, "summary_json": run.summary,
            "membership_inference": {"attacks": [r.to_dict() for r in results], "notes": notes},
            "backdoor": {"rows": backdoor_rows, "notes": [
                "No trigger is known for a stored run: per client, the mean brightness of the bottom-right 3x3 patch "
                "per class; a naive trigger shows as one class far brighter than the rest."]},
            "dp_audit": {"rows": dp_rows, "notes": [
                "Store members were not included at random, so these lower bounds are indicative only; "
                "use the central scenario (randomised inclusion) for an audit."]}}
