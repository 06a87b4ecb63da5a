"""A little is enough (Baruch, Baruch and Goldberg, NeurIPS 2019), in its backdoor form: the
backdoor trained into an update that stays, coordinate by coordinate, within z standard deviations
of the benign mean, where robust rules cannot tell it apart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field
from scipy.stats import norm
from torch import Tensor

from fedmeta.attacks.steering import SteeredAttack, Steering, box
from fedmeta.attacks.strategies import AttackerContext, TrainingOptions
from fedmeta.federation.client import RoundSettings
from fedmeta.models.conv4 import Params
from fedmeta.registry import ATTACKS


class AlieOptions(TrainingOptions):
    estimates: int = Field(4, ge=2, le=1000)
    """Benign updates the attacker (with its colluders) computes on clean data: the mean and std."""
    z: Annotated[float, Field(gt=0.0, le=10.0)] | Literal["z_max"] = "z_max"
    """Standard deviations the update may stray (0 would send the benign mean: no backdoor);
    "z_max": Baruch et al.'s, from n and f."""


def z_max(n: int, f: int) -> float:
    """Baruch et al.'s z: s = floor(n / 2 + 1) - f benign users must be outvoted, and
    z = Phi^-1((n - s) / n) keeps the attacker closer to the mean than that many of them."""
    s = n // 2 + 1 - f
    if s <= 0:
        raise ValueError(f"attacks.alie.z: with f = {f} attackers of n = {n} users per round, z_max is unbounded "
                         "(s = floor(n / 2 + 1) - f <= 0); set attacks.alie.z")
    if 2 * s == n:  # Phi^-1(1/2): the box shrinks to the benign mean, which carries no backdoor
        raise ValueError(f"attacks.alie.z: with f = {f} attacker of n = {n} users per round, z_max = Phi^-1(1/2) = 0 "
                         "would send the benign mean (no backdoor); set attacks.alie.z")
    return float(norm.ppf((n - s) / n))


@dataclass(frozen=True)
class Alie(SteeredAttack):
    """Each round, from the global model theta_G:

    1. mu_j, sigma_j: per-coordinate mean and standard deviation of ``estimates`` benign updates
       from theta_G on the malicious users' own clean classes; the population standard deviation,
       as the authors' code (``malicious.py``: ``np.var(users_grads, axis=0) ** 0.5``; until
       2026-12-07 the unbiased one, a box sqrt(k / (k - 1)) wider, 1.15x at k = 4: revision 2).
    2. Train on poisoned episodes; after every outer step project the update theta - theta_G onto
       [mu_j - z sigma_j, mu_j + z sigma_j] in every coordinate j. The update sent lies in that box.

    Unlike the paper's backdoor attack, which trains on the backdoor loss plus a distance to the
    benign mean and clamps to the box once at the end (the authors' ``backdoor.py``), the box
    holds at every outer step (a projected-gradient attacker; docs/threats.md, ``alie``); each
    colluder sends its own update, where the authors' malicious workers send one and the same.
    """

    estimates: int
    z: float

    def bounds(self, global_params: Params, settings: RoundSettings) -> tuple[Tensor, Tensor]:
        """Flat (low, high) = mu -/+ z sigma."""
        benign = self.ctx.benign_updates(global_params, settings, self.estimates)
        mean, std = benign.mean(dim=0), benign.std(dim=0, correction=0)
        return mean - self.z * std, mean + self.z * std

    def steering(self, global_params: Params, settings: RoundSettings) -> Steering:
        return Steering(box(global_params, *self.bounds(global_params, settings)))


def check(options: dict, averaged: int, attackers: int) -> None:
    """Refuse, when the config loads (before any pre-training), a z_max that ``z_max`` refuses."""
    if options.get("z", "z_max") == "z_max":
        z_max(averaged, min(attackers, averaged))


@ATTACKS.register("alie", options=AlieOptions, check=check, revision=2)  # 2: the population std
def alie(ctx: AttackerContext, episodes: int, inner_epochs: float, estimates: int, z: float | str) -> Alie:
    """A little is enough (Baruch et al., NeurIPS 2019): the backdoor within the benign mean +/- z std
    per coordinate. For z_max, n = the updates the server averages (``federation.min_updates``, or
    every one of the round's under secure aggregation) and f = every malicious user (at most n); a
    round that holds fewer of them gets a larger z than Baruch's for that round (set z to choose)."""
    z = z_max(ctx.averaged, min(len(ctx.attackers), ctx.averaged)) if z == "z_max" else float(z)
    return Alie(ctx, ctx.poisoned_client(episodes, inner_epochs), estimates, z)
