"""Divide-and-Conquer, DnC (Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model
Poisoning Attacks and Defenses for Federated Learning", NDSS 2021, Algorithm 2).

Malicious updates that work together must share a direction the benign ones do not; after
centering, that direction dominates the top singular vector, and the malicious updates have the
largest projections on it. With n updates of d coordinates, niters times:

1. r = a random subset of b coordinates (sorted; all of them when b >= d), drawn from the round's
   aggregation stream;
2. the updates restricted to r, centred on their mean: C = X_r - mean(X_r);
3. v = the top right singular vector of C (``torch.linalg.svd``);
4. outlier scores s_i = <C_i, v>^2; the good set: the n - c * f updates with the lowest scores
   (ties to the lower user id);

and the updates in every good set (the intersection) are averaged, with the weights alpha_i
renormalised over them (the paper's plain mean when weights are equal). An empty intersection
is logged and leaves the model unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import Field, NonNegativeInt, PositiveInt
from torch import Tensor

from fedmeta.federation.aggregation import Options
from fedmeta.federation.subsets import kept_mean
from fedmeta.registry import RULES


class DncOptions(Options):
    byzantine: NonNegativeInt = 1
    """f, the number of malicious updates assumed."""
    filter: float = Field(1.0, gt=0.0, le=10.0)
    """c: each iteration drops the c * f updates with the highest outlier scores."""
    iterations: PositiveInt = 5
    """niters: random coordinate subsets tried; an update must pass all of them."""
    dimension: PositiveInt = 10000
    """b: coordinates per subset (all of them when the update has fewer)."""


def outlier_scores(updates: Tensor) -> Tensor:
    """DnC's scores ``[n]``: squared projections of the centred rows on their top right singular vector."""
    centred = updates - updates.mean(dim=0)
    top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    return (centred @ top).square()


@RULES.register("dnc", options=DncOptions)
@dataclass(frozen=True)
class DivideAndConquer:
    """DnC (Shejwalkar & Houmansadr, 2021): on random coordinate subsets, drop the c * f updates
    with the largest squared projection on the top singular vector; average those never dropped."""

    byzantine: int = 1
    filter: float = 1.0
    iterations: int = 5
    dimension: int = 10000

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator, users: Sequence[int] | None = None) -> Tensor:
        n, d = updates.shape
        good = int(n - self.filter * self.byzantine)
        if good < 1:
            raise ValueError(f"rules.dnc: filter x byzantine = {self.filter} x {self.byzantine} drops all {n} updates "
                             "of the round; lower them")
        keep = torch.ones(n, dtype=torch.bool, device=updates.device)
        for _ in range(self.iterations):
            coordinates = torch.randperm(d, generator=gen)[: self.dimension].sort().values.to(updates.device)
            lowest = outlier_scores(updates[:, coordinates]).argsort(stable=True)[:good]
            keep &= torch.zeros_like(keep).index_fill_(0, lowest, True)
        return kept_mean(updates, weights, keep, "dnc")
