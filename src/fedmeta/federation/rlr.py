"""Robust learning rate, RLR (Ozdayi, Kantarcioglu, Gel, "Defending against Backdoors in
Federated Learning with Robust Learning Rate", AAAI 2021).

A backdoor needs coordinates that the benign users do not push the same way; where too few users
agree on the sign of a coordinate, the server moves against the mean rather than along it.
Per coordinate k, with the server learning rate 1:

    lr_k = +1 if |sum_i sign(delta_ik)| >= threshold, else -1
    update = lr * sum_i alpha_i delta_i      (coordinate-wise; the paper's weighted mean)

The threshold counts users (the paper's theta), so it cannot exceed the round's number of
updates: such a round is refused, naming the key. Signs are counted per update, so the rule
needs every update on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import PositiveInt
from torch import Tensor

from fedmeta.federation.aggregation import Options
from fedmeta.registry import RULES


class RlrOptions(Options):
    threshold: PositiveInt = 4
    """theta: the least |sum of the updates' signs| (agreeing minus disagreeing users) that keeps a coordinate's direction."""


@RULES.register("rlr", options=RlrOptions)
@dataclass(frozen=True)
class RobustLearningRate:
    """Robust learning rate (Ozdayi et al., 2021): the weighted mean, with the sign of every
    coordinate flipped where |sum of the updates' signs| < threshold."""

    threshold: int = 4

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator, users: Sequence[int] | None = None) -> Tensor:
        if self.threshold > len(updates):
            raise ValueError(f"rules.rlr.threshold = {self.threshold} exceeds the {len(updates)} updates of the round "
                             "(it counts agreeing users): lower it")
        agreement = updates.sign().sum(dim=0).abs()
        rate = torch.where(agreement >= self.threshold, 1.0, -1.0)
        return rate * (weights @ updates)
