"""What a client sends back: a parameter delta, its weight, and a few metrics.

Aggregation rules work on flat vectors (one row per client), so updates are flattened in a
fixed parameter order; ``unflatten`` restores the dict.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedmeta.models.conv4 import Params


@dataclass(frozen=True)
class ClientUpdate:
    user: int
    delta: Params  # theta_local - theta_global (boosted, for an attacker)
    examples: int  # size of the user's data, for size-weighted aggregation
    metrics: dict[str, float] = field(default_factory=dict)

    def is_finite(self) -> bool:
        """Whether every coordinate is finite (one host sync for the whole update, not one per tensor)."""
        return bool(torch.stack([torch.isfinite(v).all() for v in self.delta.values()]).all())


def flatten(params: Params) -> Tensor:
    return torch.cat([v.reshape(-1) for v in params.values()])


def layer_slices(shapes: Sequence[tuple[int, ...]]) -> list[slice]:
    """Where each parameter of ``shapes`` lies in an update flattened in that order (``flatten``)."""
    ends = list(itertools.accumulate(math.prod(shape) for shape in shapes))
    return [slice(start, end) for start, end in zip([0, *ends], ends)]


def unflatten(vector: Tensor, like: Params) -> Params:
    out, start = {}, 0
    for name, value in like.items():
        out[name] = vector[start : start + value.numel()].view_as(value)
        start += value.numel()
    return out


def add(params: Params, delta: Params, scale: float = 1.0) -> Params:
    return {k: params[k] + scale * delta[k] for k in params}


def subtract(a: Params, b: Params) -> Params:
    return {k: a[k] - b[k] for k in a}


def effective_weights(updates: list[ClientUpdate], applied: Tensor) -> dict[int, float]:
    """Each user's weight in the update a rule applied: the ``w`` that best writes ``applied`` as
    ``sum_i w_i * update_i`` (least squares, float64). Exact for the rules that weight whole
    updates: FedAvg gives alpha_i, a filter (Krum, FLAME's clusters, FreqFed) 0 for whom it
    excluded, clipping alpha_i times the clip factor; an approximation for coordinate-wise rules
    (median, trimmed mean) and noise. What the experimenter, not the server, reads off a round:
    how much of the attackers' updates a defense let through."""
    stacked = torch.stack([flatten(u.delta) for u in updates]).double()
    weights = torch.linalg.lstsq(stacked.T, applied.double().unsqueeze(1)).solution.squeeze(1)
    return {u.user: float(w) for u, w in zip(updates, weights.tolist(), strict=True)}
