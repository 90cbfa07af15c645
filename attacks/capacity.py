"""How much backdoor a small labelled set can carry at all: the ceiling any poisoned distillation meets.

A distilled backdoor works only if the final training on the synthetic set learns "trigger ->
target". ``carrier_set`` builds the most favourable set of real-looking images an attacker could
hope a distillation to produce: ``ipc`` real images per class, except that ``carriers`` of the
target class's slots hold *non-target* images stamped with the trigger and labelled target (the
images that make the trigger, not the target's shape, the only explanation of their label).
Training the evaluator on it and measuring ASR gives an upper reference for naive poisoning and
DOORPING through any method whose images stay close to real ones (docs/attacks.md).
"""

from __future__ import annotations

import numpy as np
import torch

from distill.data import LabeledImages

from .backdoor import Trigger


def carrier_set(real: LabeledImages, trigger: Trigger, ipc: int, carriers: int, target: int,
                seed: int = 0) -> LabeledImages:
    """``ipc`` images per class drawn from ``real``; ``carriers`` of the target's are triggered non-target images."""
    classes = real.info.num_classes
    if not 0 <= target < classes:
        raise ValueError(f"target {target} outside [0, {classes})")
    if not 0 <= carriers <= ipc:
        raise ValueError(f"carriers must be in [0, ipc={ipc}], got {carriers}")
    labels = real.labels.numpy()
    rng = np.random.default_rng(seed)
    counts = {c: (ipc - carriers if c == target else ipc) for c in range(classes)}
    picks = []
    for c, n in counts.items():
        pool = np.flatnonzero(labels == c)
        if len(pool) < n:
            raise ValueError(f"class {c} has {len(pool)} images, {n} needed")
        picks.append(rng.choice(pool, n, replace=False))
    clean = np.concatenate(picks)
    taken = np.zeros(len(labels), dtype=bool)
    taken[clean] = True
    others = np.flatnonzero((labels != target) & ~taken)
    if len(others) < carriers:
        raise ValueError(f"{len(others)} unused non-target images, {carriers} carriers needed")
    carrier_idx = rng.choice(others, carriers, replace=False)
    images = torch.cat([real.images[clean], trigger.stamp(real.images[carrier_idx])])
    out_labels = torch.cat([real.labels[clean], torch.full((carriers,), target, dtype=real.labels.dtype)])
    return LabeledImages(images, out_labels, real.info)


__all__ = ["carrier_set"]
