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
from .membership import AttackResult, audit_pool, confidence_attack, distance_attack, loss_attack, split_pool
from .pipelines import Pipeline
from .rmia import rmia_attack

EXPOSURE_ATTACKS = ("rmia-online", "lira-online", "loss")  # whose member scores rank exposure, first found


@dataclass
class MembershipReport:
    target: str
    test_accuracy: float
    results: list[AttackResult]
    bank: ShadowBank | None
    privacy: dict = field(default_factory=dict)  # the target's synthetic-set privacy metadata, if any
    exposed: LabeledImages | None = None  # the members the strongest pre-chosen attack scores highest
    exposed_scores: list[float] = field(default_factory=list)
    exposed_attack: str = ""

    def by_attack(self) -> dict[str, AttackResult]:
        return {r.attack: r for r in self.results}

    def to_dict(self) -> dict:
        return {"target": self.target, "test_accuracy": self.test_accuracy, "privacy": self.privacy,
                "attacks": [r.to_dict() for r in self.results]}


def most_exposed(results: list[AttackResult], members: LabeledImages, k: int = 8) -> tuple[LabeledImages | None, list[float], str]:
    """The ``k`` members with the highest score under the first of :data:`EXPOSURE_ATTACKS` present."""
    found = {r.attack: r for r in results}
    name = next((a for a in EXPOSURE_ATTACKS if a in found), None)
    if name is None or len(members) == 0:
        return None, [], ""
    top = np.argsort(-found[name].scores_in, kind="stable")[:k]
    return members.subset(top), [float(x) for x in found[name].scores_in[top]], name


def run_membership(pipeline: Pipeline, pool: LabeledImages, test: LabeledImages, n_shadows: int = 8,
                   seed: int = 0, target_data: LabeledImages | None = None,
                   progress: bool = False, population: LabeledImages | None = None,
                   population_size: int = 200) -> MembershipReport:
    """Threshold attacks, LiRA and RMIA online/offline (if ``n_shadows`` >= 2) and, for a distilled
    target, the distance attack on its synthetic set.

    RMIA's population points z default to ``population_size`` images of ``test`` (never in the
    pool, so no shadow trains on them)."""
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
        if population is None and population_size > 0:
            population = audit_pool(test, min(population_size, len(test)), seed + 2)
        bank = train_shadows(pipeline, pool, n_shadows, seed=seed + 1, progress=progress, population=population)
        results += lira_attack(out.model, pool, mask, bank, name)
        if population is not None:
            results += rmia_attack(out.model, pool, mask, bank, population, name)
    privacy = dict(out.synthetic.meta.privacy) if out.synthetic is not None else {}
    exposed, exposed_scores, exposed_attack = most_exposed(results, members)
    return MembershipReport(name, accuracy(out.model, test), results, bank, privacy,
                            exposed, exposed_scores, exposed_attack)
