"""A rule and an attack written outside fedmeta, registered from this file alone.

Named in a config's ``plugins``, it is imported wherever the experiment runs (the test process,
Flower's nodes), so both parts are found by name on every engine.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fedmeta.attacks.strategies import AttackerContext
from fedmeta.federation.client import MetaClient
from fedmeta.registry import ATTACKS, RULES

CALLS = {"rule": 0}


class ScaledMeanOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    scale: float = Field(0.5, gt=0.0)


@RULES.register("toy-scaled-mean", options=ScaledMeanOptions)
class ScaledMean:
    """The weighted mean, scaled (a toy server rule)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, updates, weights, gen, users=None):
        CALLS["rule"] += 1
        return self.scale * (weights @ updates)


class FlipOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    boost: float = 2.0


@ATTACKS.register("toy-sign-flip", options=FlipOptions)
def sign_flip(ctx: AttackerContext, boost: float) -> MetaClient:
    """Trains like a benign user on its own classes and sends the update reversed and boosted (a toy attack)."""
    learner = ctx.learner(ctx.meta)
    return MetaClient(ctx.user, learner, ctx.images, lambda gen: learner.sample(ctx.own, gen), 2,
                      int(ctx.own.counts.sum()), ctx.seed, boost=-boost)
