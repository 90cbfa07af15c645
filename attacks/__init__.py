"""Attacks on fedistill's uploads: membership inference, backdoor poisoning, DP audits, reports.

Flower-free: it imports ``distill`` (and ``privacy`` for the DP pipelines) and reads run stores
from disk, never ``flwr``. Every attack scores members higher than non-members; the metrics
in :mod:`attacks.metrics` turn those scores into ROC, AUC, TPR at low FPR and epsilon bounds.
"""
