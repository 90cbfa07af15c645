"""Example-level differential privacy for distillation: DP methods, Opacus accounting, KIP-rho notes.

Importing this package registers the DP methods with :mod:`distill.methods` (``dp-dm``,
``dpsgd-gm``, ``dp-mtt``); ``distill`` itself never imports ``privacy``. No Flower import here.

>>> from distill.methods import make_config
>>> cfg = make_config("dp-dm", ipc=1, iterations=10, epsilon=2.0)
>>> plan = privacy_plan(cfg)
>>> plan.mode, plan.accountant, plan.epsilon <= 2.0
('target-epsilon', 'rdp', True)
"""

from __future__ import annotations

from distill.methods import register

from . import dp_dm, dp_experts, dp_gm
from .accounting import ACCOUNTANTS, BudgetExceeded, PrivacyLedger, Spend, calibrate_sigma, epsilon_of
from .config import DPConfig, PrivacyPlan, privacy_plan, spends_from_meta

register("dp-dm", dp_dm.DPDMConfig, dp_dm.distill)
register("dpsgd-gm", dp_gm.DPGMConfig, dp_gm.distill)
register("dp-mtt", dp_experts.DPMTTConfig, dp_experts.distill)

DP_METHODS = ("dp-dm", "dpsgd-gm", "dp-mtt")

__all__ = ["ACCOUNTANTS", "BudgetExceeded", "DPConfig", "DP_METHODS", "PrivacyLedger", "PrivacyPlan",
           "Spend", "calibrate_sigma", "epsilon_of", "privacy_plan", "spends_from_meta"]
