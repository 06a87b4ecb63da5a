"""Centered Clipping (Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
Optimization", ICML 2021).

Honest updates change slowly from round to round (in the paper they are worker momenta), so the
previous aggregate is a good guess of where this round's should be; every update is clipped to a
ball of radius tau around that guess, which bounds how far any one update can pull. With
v the previous round's aggregate (0 before the first round), L iterations of

    v <- v + sum_i alpha_i (x_i - v) min(1, tau / ||x_i - v||)

(the paper's 1/n for alpha_i when weights are equal); the result v is the round's update and the
next round's center. That center is the rule's state: checkpointed with the run and restored on
resume, so a resumed run aggregates exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import PositiveFloat, PositiveInt
from torch import Tensor

from fedmeta.federation.aggregation import Options
from fedmeta.registry import RULES


class CenteredClippingOptions(Options):
    tau: PositiveFloat = 1.0
    """Radius of the clipping ball around the center (in update-norm units)."""
    iterations: PositiveInt = 1
    """L: clipping iterations per round, each re-centred on the previous one's result."""


@RULES.register("centered-clipping", options=CenteredClippingOptions)
class CenteredClipping:
    """Centered Clipping (Karimireddy et al., 2021): L iterations of clipping to radius tau around
    the center, starting from the previous round's aggregate (kept across rounds and checkpoints)."""

    def __init__(self, tau: float = 1.0, iterations: int = 1) -> None:
        self.tau, self.iterations = tau, iterations
        self.center: Tensor | None = None

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator, users: Sequence[int] | None = None) -> Tensor:
        v = torch.zeros_like(updates[0]) if self.center is None else self.center.to(updates.device)
        for _ in range(self.iterations):
            offsets = updates - v
            distances = offsets.norm(dim=1, keepdim=True)
            v = v + weights @ (offsets * torch.where(distances > self.tau, self.tau / distances, 1.0))
        self.center = v
        return v

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.center is None else {"center": self.center}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.center = state.get("center")
