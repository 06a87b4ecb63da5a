"""Projected training: PGD on the local model within an L2 ball around the global model (Sun et
al., "Can You Really Backdoor Federated Learning?", 2019; Wang et al., "Attack of the Tails",
NeurIPS 2020, its PGD attacker)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from fedmeta.attacks.steering import SteeredAttack, Steering, ball
from fedmeta.attacks.strategies import AttackerContext, BoundOptions
from fedmeta.federation.client import RoundSettings
from fedmeta.models.conv4 import Params
from fedmeta.registry import ATTACKS


class ProjectedOptions(BoundOptions):
    eps: Annotated[float, Field(gt=0.0, le=1e6)] | Literal["rule"] = "rule"
    """Radius of the L2 ball around the global model; "rule": the norm the rule lets through (its
    cap, e.g. ``rules.clip.norm``, else ``slack`` x the median estimated benign norm)."""


@dataclass(frozen=True)
class Projected(SteeredAttack):
    """Each round, from the global model theta_G: local training on poisoned episodes where, after
    every outer step, the local model is projected back onto the ball ||theta - theta_G||_2 <= eps
    (theta <- theta_G + (theta - theta_G) min(1, eps / ||theta - theta_G||)); the update
    theta - theta_G is sent unscaled, so a norm-bounding server never clips it."""

    eps: float | str
    estimates: int
    slack: float

    def radius(self, global_params: Params, settings: RoundSettings) -> float:
        """eps: the option, else the norm bound the attacker knows or estimates (``AttackerContext.norm_bound``)."""
        if self.eps != "rule":
            return float(self.eps)
        known = self.ctx.knows_norm_bound
        benign = None if known else self.ctx.benign_updates(global_params, settings, self.estimates)
        return self.ctx.norm_bound(benign, self.slack)

    def steering(self, global_params: Params, settings: RoundSettings) -> Steering:
        return Steering(ball(global_params, self.radius(global_params, settings)))


@ATTACKS.register("projected", options=ProjectedOptions, knows_rule="bound")
def projected(ctx: AttackerContext, episodes: int, inner_epochs: float, estimates: int, slack: float,
              eps: float | str) -> Projected:
    """PGD within an L2 ball around the global model (Sun et al. 2019; Wang et al., NeurIPS 2020)."""
    return Projected(ctx, ctx.poisoned_client(episodes, inner_epochs), eps, estimates, slack)
