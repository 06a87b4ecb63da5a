"""Aggregation rules: functions from stacked client updates to one global update.

Each rule takes ``updates`` ``[n, d]`` (one flattened update per client) and ``weights`` ``[n]``
(the alpha_i of the paper, summing to 1) and returns the update ``[d]`` the server applies:
theta_G <- theta_G + rule(updates, weights).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Rule = Callable[[Tensor, Tensor], Tensor]


def fedavg(updates: Tensor, weights: Tensor) -> Tensor:
    """sum_i alpha_i delta_i (McMahan et al.; the paper's server)."""
    return weights @ updates


RULES: dict[str, Rule] = {"fedavg": fedavg}


def get_rule(name: str) -> Rule:
    return RULES[name]
