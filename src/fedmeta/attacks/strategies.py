"""Attack strategies: how a malicious user trains and what update it sends, registered by name.

A strategy is a factory ``(ctx: AttackerContext, **options) -> Client``: it gets everything the
malicious user holds (its own classes, the attacker's share of the reserved classes, the
protocol's settings, a way to build a meta-learner) and returns a federation client, which the
server treats like any other ("global weights in, update out"). Its settings are the table
``[attacks.<name>]`` of the config, typed by the ``options`` model it registers. Which users are
malicious and in which rounds they are selected is ``attack.attackers``; several users may run
the same strategy (they then collude on the same backdoor) or different ones.

Write a new strategy in its own file with ``@ATTACKS.register("name", options=...)`` and name the
file in the config's ``plugins`` (or add it to ``fedmeta.registry.ATTACKS``'s built-in modules).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, PositiveFloat, PositiveInt
from torch import Tensor

from fedmeta.attacks.backdoor import poisoned_episodes
from fedmeta.config.sections import ALLOW, MetaConfig
from fedmeta.data.pool import ClassPool
from fedmeta.federation.client import MetaClient
from fedmeta.meta.learner import MetaLearner
from fedmeta.registry import ATTACKS


@dataclass(frozen=True)
class AttackerContext:
    """What a malicious user holds and knows."""

    user: int
    own: ClassPool  # its own meta-training classes (rows into ``images``)
    images: Tensor  # the image store every pool indexes
    target_rows: Tensor  # X_T: benign images of the target class
    backdoor_rows: Tensor  # X_B: keyed images of the backdoor classes
    backdoor_share: float  # fraction of keyed images in the target slot
    meta: MetaConfig  # the protocol every user follows
    seed: int
    learner: Callable[[MetaConfig], MetaLearner]  # a meta-learner of the federation's model with these settings

    def poisoned(self, gen: torch.Generator):
        """One outer step of poisoned episodes (the paper's: N-1 own ways and a target slot)."""
        m = self.meta
        return poisoned_episodes(self.own, self.target_rows, self.backdoor_rows, episodes=m.meta_batch, ways=m.ways,
                                 shots=m.shots, backdoor_share=self.backdoor_share, gen=gen)


class BoostedOptions(BaseModel):
    model_config = ALLOW

    boost: PositiveFloat = 3.0
    """lambda: the attacker sends lambda * (theta_a - theta_G)."""
    episodes: PositiveInt = 50000
    """E of the attacker's local training."""
    inner_epochs: PositiveFloat = 50.0
    """Passes over each episode's examples (inner steps = epochs * ways * shots / inner_batch)."""


@ATTACKS.register("boosted", options=BoostedOptions)
def boosted(ctx: AttackerContext, boost: float, episodes: int, inner_epochs: float) -> MetaClient:
    """The paper's one-shot backdoor (Chen, Golubchik, Paolieri, Sec. 2-3): long local Reptile on
    poisoned episodes, then the update boosted by lambda so that it prevails over the benign ones."""
    m = ctx.meta
    steps = math.ceil(inner_epochs * m.ways * m.shots / m.inner_batch)
    learner = ctx.learner(m.model_copy(update={"inner_steps": steps}))
    return MetaClient(ctx.user, learner, ctx.images, ctx.poisoned, max(1, episodes // m.meta_batch),
                      int(ctx.own.counts.sum()), ctx.seed, boost=boost)


def make_attacker(strategy: str, ctx: AttackerContext, options: dict) -> MetaClient:
    """The client of a malicious user running ``strategy`` with its settings."""
    entry = ATTACKS.get(strategy)
    settings = entry.options.model_validate(options).model_dump() if entry.options else {}
    return entry.factory(ctx, **settings)
