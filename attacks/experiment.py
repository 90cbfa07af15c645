"""One membership experiment end to end: target + shadows from the same pipeline, every attack.

The target runs the pipeline on the members (a random half of the audit pool); ``target_data``
overrides that, e.g. with disjoint data, to check that the attacks fall to chance on a target
that never saw the members.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from distill.data import LabeledImages
from distill.train import accuracy

from .lira import ShadowBank, lira_attack, train_shadows
from .membership import AttackResult, confidence_attack, distance_attack, loss_attack, split_pool
from .pipelines import Pipeline


@dataclass
class MembershipReport:
    target: str
    test_accuracy: float
    results: list[AttackResult]
    bank: ShadowBank | None
    privacy: dict = field(default_factory=dict)  # the target's synthetic-set privacy metadata, if any

    def by_attack(self) -> dict[str, AttackResult]:
        return {r.attack: r for r in self.results}

    def to_dict(self) -> dict:
        return {"target": self.target, "test_accuracy": self.test_accuracy, "privacy": self.privacy,
                "attacks": [r.to_dict() for r in self.results]}


def run_membership(pipeline: Pipeline, pool: LabeledImages, test: LabeledImages, n_shadows: int = 8,
                   seed: int = 0, target_data: LabeledImages | None = None,
                   progress: bool = False) -> MembershipReport:
    """Threshold attacks, LiRA online/offline (if ``n_shadows`` >= 2) and, for a distilled target,
    the distance attack on its synthetic set."""
    mask = split_pool(len(pool), seed)
    members, non_members = pool.subset(np.flatnonzero(mask)), pool.subset(np.flatnonzero(~mask))
    name = getattr(pipeline, "name", "target") or "target"
    out = pipeline(members if target_data is None else target_data, seed + 10_000)
    results = [loss_attack(out.model, members, non_members, name),
               confidence_attack(out.model, members, non_members, name)]
    if out.synthetic is not None:
        results.append(distance_attack(out.synthetic, members, non_members, name))
    bank = None
    if n_shadows >= 2:
        bank = train_shadows(pipeline, pool, n_shadows, seed=seed + 1, progress=progress)
        results += lira_attack(out.model, pool, mask, bank, name)
    privacy = dict(out.synthetic.meta.privacy) if out.synthetic is not None else {}
    return MembershipReport(name, accuracy(out.model, test), results, bank, privacy)
