"""Example-level differential privacy for distillation: DP methods, Opacus accounting, KIP-rho notes.

The DP methods (``dp-dm``, ``dpsgd-gm``, ``dp-mtt``) are listed in :mod:`distill.methods` as lazy
entries (``"privacy.dp_dm:DPDMConfig"``, ...), imported on first use: no import of this package is
needed to use them, and ``distill`` never imports it eagerly. No Flower import here.

>>> from distill.task import DistillTask, method_config
>>> cfg = method_config(DistillTask(dp="dp-dm", ipc=1, iterations=10, epsilon=2.0), seed=0)
>>> plan = privacy_plan(cfg)
>>> plan.mode, plan.accountant, plan.epsilon <= 2.0
('target-epsilon', 'rdp', True)
"""

from __future__ import annotations

from distill.methods import private_methods

from .accounting import ACCOUNTANTS, BudgetExceeded, PrivacyLedger, Spend, calibrate_sigma, epsilon_of
from .config import DPConfig, PrivacyPlan, privacy_plan, spends_from_meta

DP_METHODS = tuple(private_methods())  # the registry's, registered private=True in distill.methods

__all__ = ["ACCOUNTANTS", "BudgetExceeded", "DPConfig", "DP_METHODS", "PrivacyLedger", "PrivacyPlan",
           "Spend", "calibrate_sigma", "epsilon_of", "privacy_plan", "spends_from_meta"]
