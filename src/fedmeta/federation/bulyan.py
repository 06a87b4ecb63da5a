"""Bulyan (El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in
Byzantium", ICML 2018).

Krum alone lets an attacker move every coordinate a little within the spread of the benign
updates; Bulyan adds a coordinate-wise trim after a Krum-based selection. With n updates and at
most f malicious ones (n >= 4f + 3, the paper's condition; refused otherwise):

1. selection: theta = n - 2f times, pick the update Krum chooses among the remaining ones (the
   lowest summed squared distance to its |R| - f - 2 nearest neighbours, at least one) and move
   it to the selection set S;
2. aggregation: per coordinate, the beta = theta - 2f values of S closest to S's median (the mean
   of the two middle values for even theta), averaged.

Ties (in Krum's choice and in closeness to the median) go to the lower user id: rows are sorted
by user. Like the median and the trimmed mean, the result is a plain mean per coordinate: the
weights alpha_i play no part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import NonNegativeInt
from torch import Tensor

from fedmeta.federation.aggregation import Median, Options, krum_scores
from fedmeta.registry import RULES


class BulyanOptions(Options):
    byzantine: NonNegativeInt = 1
    """f, the number of malicious updates tolerated; a round needs n >= 4f + 3 updates."""


def krum_selection(updates: Tensor, byzantine: int, count: int) -> Tensor:
    """Row indices of Bulyan's selection: Krum's choice among the rows not yet chosen, ``count`` times."""
    remaining = torch.arange(len(updates), device=updates.device)
    chosen = []
    for _ in range(count):
        best = int(krum_scores(updates[remaining], byzantine).argmin())  # the first minimum: the lower user id
        chosen.append(remaining[best])
        remaining = torch.cat([remaining[:best], remaining[best + 1 :]])
    return torch.stack(chosen)


@RULES.register("bulyan", options=BulyanOptions)
@dataclass(frozen=True)
class Bulyan:
    """Bulyan (El Mhamdi et al., 2018): theta = n - 2f updates chosen by repeated Krum, then per
    coordinate the mean of the beta = theta - 2f values closest to their median."""

    byzantine: int = 1

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator, users: Sequence[int] | None = None) -> Tensor:
        n, f = len(updates), self.byzantine
        if n < 4 * f + 3:
            raise ValueError(f"rules.bulyan.byzantine = {f} needs at least 4f + 3 = {4 * f + 3} updates per round, "
                             f"this round has {n}: lower it, or raise federation.per_round and federation.min_updates")
        selected = updates[krum_selection(updates, f, n - 2 * f).sort().values]  # back in user order
        median = Median()(selected, weights, gen)
        closest = (selected - median).abs().argsort(dim=0, stable=True)[: len(selected) - 2 * f]
        return selected.gather(0, closest).mean(dim=0)
