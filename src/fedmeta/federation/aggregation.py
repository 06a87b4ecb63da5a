"""Aggregation rules: functions from stacked client updates to one global update.

Each rule takes ``updates`` ``[n, d]`` (one flattened update per client, in a fixed order),
``weights`` ``[n]`` (the alpha_i of the paper, summing to 1) and a generator (for rules that add
noise), and returns the update ``[d]`` the server applies: theta_G <- theta_G + rule(...).

FedAvg is the paper's server. The others are the server-side defenses reviewers ask to compare
with; all but FedAvg must see every update on its own, so they cannot run under secure
aggregation, where the server only learns the sum (``needs_individual_updates``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from fedmeta.config import FederationConfig


class Rule(Protocol):
    needs_individual_updates: bool

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator) -> Tensor: ...


@dataclass(frozen=True)
class FedAvg:
    """sum_i alpha_i delta_i (McMahan et al.)."""

    needs_individual_updates = False

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator) -> Tensor:
        return weights @ updates


@dataclass(frozen=True)
class Median:
    """Coordinate-wise median (Yin et al., 2018); the mean of the two middle values for even n."""

    needs_individual_updates = True

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator) -> Tensor:
        ordered = updates.sort(dim=0).values
        n = len(updates)
        return ordered[(n - 1) // 2 : n // 2 + 1].mean(dim=0)


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise mean after dropping the ``floor(beta * n)`` largest and smallest values."""

    beta: float
    needs_individual_updates = True

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator) -> Tensor:
        n = len(updates)
        cut = int(self.beta * n)
        if 2 * cut >= n:
            raise ValueError(f"trimming {cut} of {n} updates from each side leaves none")
        return updates.sort(dim=0).values[cut : n - cut].mean(dim=0)


@dataclass(frozen=True)
class Krum:
    """Multi-Krum (Blanchard et al., 2017): average the ``select`` updates whose summed squared
    distances to their n - f - 2 nearest neighbours are smallest (``select = 1``: Krum)."""

    byzantine: int
    select: int = 1
    needs_individual_updates = True

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator) -> Tensor:
        n = len(updates)
        neighbours = max(1, n - self.byzantine - 2)
        distances = torch.cdist(updates, updates).square()
        distances.fill_diagonal_(float("inf"))
        scores = distances.sort(dim=1).values[:, :neighbours].sum(dim=1)
        chosen = scores.argsort(stable=True)[: min(self.select, n)]
        return updates[chosen].mean(dim=0)


@dataclass(frozen=True)
class ClipNoise:
    """Norm clipping with Gaussian noise ("weak DP", Sun et al., 2019): every update is scaled
    down to norm ``max_norm`` at most, the clipped updates are averaged with their weights, and
    Gaussian noise of standard deviation ``noise * max_norm`` is added to every coordinate."""

    max_norm: float
    noise: float = 0.0
    needs_individual_updates = True

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator) -> Tensor:
        norms = updates.norm(dim=1, keepdim=True)
        clipped = updates * (self.max_norm / norms.clamp_min(self.max_norm))
        mean = weights @ clipped
        if self.noise:
            mean = mean + self.noise * self.max_norm * torch.randn(mean.shape, generator=gen).to(mean.device)
        return mean


def make_rule(cfg: FederationConfig) -> Rule:
    """The rule named by ``federation.rule``, with its parameters."""
    return {
        "fedavg": lambda: FedAvg(),
        "median": lambda: Median(),
        "trimmed-mean": lambda: TrimmedMean(cfg.trim),
        "krum": lambda: Krum(cfg.byzantine, 1),
        "multi-krum": lambda: Krum(cfg.byzantine, cfg.krum_select),
        "clip": lambda: ClipNoise(cfg.clip_norm, cfg.clip_noise),
    }[cfg.rule]()
