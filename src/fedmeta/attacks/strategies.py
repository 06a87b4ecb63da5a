"""Attack strategies: how a malicious user trains and what update it sends, registered by name.

A strategy is a factory ``(ctx: AttackerContext, **options) -> Client``: it gets everything the
malicious user holds (its own classes, the attacker's share of the reserved classes, honest
clients on its and its colluders' clean data) and knows (the protocol's settings, the server's
rule and its settings, how many users a round takes), and returns a federation client, which the
server treats like any other ("global weights in, update out"; no state between rounds). Its
settings are the table ``[attacks.<name>]`` of the config, typed by the ``options`` model it
registers. Which users are malicious and in which rounds they are selected is
``attack.attackers``: a repeated attack lists several rounds, a late attack a late one; several
users may run the same strategy (they then collude on the same backdoor) or different ones.

Registration facts read elsewhere: ``knows_rule`` (the update depends on the server's rule, so
cached attack rounds are keyed by it: ``True`` for the rule and all its settings, ``"norm"`` for a
strategy that reads only the norm the rule lets through (none under plain FedAvg), ``"bound"`` for
one that reads only the bound it keeps inside (the rule's cap, else an estimate, FedAvg included),
``rule_seen``), ``split_trigger``
(each user running the strategy gets its own part of the trigger: ``scenario.backdoor``) and
``check`` (``(options, averaged, attackers) -> None``, raising ``ValueError`` for a setting the
strategy cannot run, when the config loads: ``alie``'s z_max).

Threat model of the adaptive strategies (``fedmeta.attacks.steering``): the attacker knows the
aggregation rule and its settings (Kerckhoffs), not the other users' updates; it can run the
protocol honestly on its own clean classes (and its colluders') to estimate what benign updates
look like from the current global model.

Write a new strategy in its own file with ``@ATTACKS.register("name", options=...)`` and name the
file in the config's ``plugins`` (or add it to ``fedmeta.registry.ATTACKS``'s built-in modules).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from pydantic import BaseModel, Field, PositiveFloat, PositiveInt
from torch import Tensor

from fedmeta.attacks.backdoor import TargetWay, poisoned_episodes
from fedmeta.config.sections import ALLOW, MetaConfig
from fedmeta.data.pool import ClassPool
from fedmeta.federation.client import MetaClient, RoundSettings
from fedmeta.federation.server import Client
from fedmeta.federation.updates import flatten
from fedmeta.meta.learner import MetaLearner
from fedmeta.models.conv4 import Params
from fedmeta.registry import ATTACKS, RULES

NORM_BOUNDS = {"clip": "norm"}
"""Rules that cap every update's L2 norm, and the option that holds the cap (their variants too)."""
UNCHECKED = {"fedavg"}
"""Rules that take every update as it is (no filter, no cap): an attacker may send any norm."""


@dataclass(frozen=True)
class AttackerContext:
    """What a malicious user holds and knows."""

    user: int
    own: ClassPool  # its own meta-training classes (rows into ``images``)
    images: Tensor  # the image store every pool indexes
    target_rows: Tensor  # X_T: benign images of the target class
    backdoor_rows: Tensor  # X_B: keyed images of the backdoor classes (its part of the trigger if it splits it)
    backdoor_share: float  # fraction of keyed images in the target slot
    meta: MetaConfig  # the protocol every user follows
    seed: int
    learner: Callable[[MetaConfig], MetaLearner]  # a meta-learner of the federation's model with these settings
    clean: tuple[MetaClient, ...]  # honest clients on the clean own classes of each malicious user, this one's first
    rule: str  # the server's aggregation rule (federation.rule) ...
    rule_options: Mapping[str, Any]  # ... and its settings
    averaged: int  # updates the server averages in a round: M_min (all of a round's under secure aggregation)
    attackers: tuple[int, ...]  # every malicious user (f of them)
    attack_rounds: Mapping[int, tuple[int, ...]]  # each malicious user's attack rounds
    target_way: TargetWay = "random"  # the target slot's way in its episodes (attack.target_way)

    def attacking(self, round: int) -> int:
        """The malicious users attacking in ``round``, this one among them (Bagdasaryan et al.'s
        ``current_number_of_adversaries``): a user attacks only in its rounds (``Schedule``)."""
        return sum(round in rounds for rounds in self.attack_rounds.values())

    def poisoned(self, gen: torch.Generator):
        """One outer step of poisoned episodes (the paper's: N-1 own ways and a target slot), with
        query examples for the learners that have an outer loss (MAML, FOMAML: without them an
        attacker's update would be zero)."""
        m = self.meta
        return poisoned_episodes(self.own, self.target_rows, self.backdoor_rows, episodes=m.meta_batch, ways=m.ways,
                                 shots=m.shots, queries=0 if m.algorithm == "reptile" else m.queries,
                                 backdoor_share=self.backdoor_share, target_way=self.target_way, gen=gen)

    def poisoned_client(self, episodes: int, inner_epochs: float, boost: float = 1.0) -> MetaClient:
        """Long local training on poisoned episodes: ``episodes / meta_batch`` outer steps of
        ``inner_epochs`` passes over each episode (inner steps = epochs * ways * shots / inner_batch)."""
        m = self.meta
        steps = math.ceil(inner_epochs * m.ways * m.shots / m.inner_batch)
        learner = self.learner(m.model_copy(update={"inner_steps": steps}))
        return MetaClient(self.user, learner, self.images, self.poisoned, max(1, episodes // m.meta_batch),
                          int(self.own.counts.sum()), self.seed, boost=boost)

    def benign_updates(self, global_params: Params, settings: RoundSettings, count: int) -> Tensor:
        """``[count, d]`` flat honest updates from ``global_params``: the i-th by the clean client
        ``i mod len(clean)``, on a stream of its own (phase ``<phase>/benign-estimate-i``), so each is
        a fresh draw of episodes and none repeats the attacker's poisoned training stream."""
        updates = [self.clean[i % len(self.clean)].update(
            global_params, replace(settings, phase=f"{settings.phase}/benign-estimate-{i}")) for i in range(count)]
        return torch.stack([flatten(u.delta) for u in updates])

    @property
    def unchecked(self) -> bool:
        """Whether the server's rule takes every update as it is (``UNCHECKED``: plain FedAvg)."""
        return RULES.base(self.rule) in UNCHECKED

    @property
    def knows_norm_bound(self) -> bool:
        """Whether the server's rule itself caps update norms (then ``norm_bound`` needs no estimate)."""
        return RULES.base(self.rule) in NORM_BOUNDS

    def norm_bound(self, benign: Tensor | None, slack: float) -> float:
        """The largest update norm the server's rule lets through, as this attacker knows it: the
        rule's own cap (``rules.clip.norm``), else ``slack`` times the median norm of the ``benign``
        updates it estimated (what a norm-based defense such as FLAME clips to)."""
        if self.knows_norm_bound:
            return float(self.rule_options[NORM_BOUNDS[RULES.base(self.rule)]])
        if benign is None:
            raise ValueError(f"rule '{self.rule}' has no norm cap: the bound needs benign update estimates")
        return slack * float(benign.norm(dim=1).quantile(0.5))


class TrainingOptions(BaseModel):
    """How long the attacker trains locally (the paper's attacker: 50000 episodes, 50 epochs)."""

    model_config = ALLOW

    episodes: PositiveInt = 50000
    """E of the attacker's local training."""
    inner_epochs: PositiveFloat = 50.0
    """Passes over each episode's examples (inner steps = epochs * ways * shots / inner_batch)."""


class BoostedOptions(TrainingOptions):
    boost: PositiveFloat = 3.0
    """lambda: the attacker sends lambda * (theta_a - theta_G)."""


class BoundOptions(TrainingOptions):
    """Settings of attacks that estimate the norm the rule lets through (unless the rule caps it)."""

    estimates: PositiveInt = 3
    """Benign updates the attacker computes on its own (and its colluders') clean data per round."""
    slack: PositiveFloat = Field(1.0, le=100.0)
    """Bound = slack x the median estimated benign norm (rules without a norm cap)."""


@ATTACKS.register("boosted", options=BoostedOptions)
def boosted(ctx: AttackerContext, boost: float, episodes: int, inner_epochs: float) -> MetaClient:
    """The paper's one-shot backdoor (Chen, Golubchik, Paolieri, Sec. 2-3): long local Reptile on
    poisoned episodes, then the update boosted by lambda so that it prevails over the benign ones."""
    return ctx.poisoned_client(episodes, inner_epochs, boost)


def adapts_to_rule(attackers: list) -> bool:
    """Whether any of ``attack.attackers`` runs a strategy whose update depends on the server's rule."""
    return any(ATTACKS.get(a.strategy).info.get("knows_rule") for a in attackers)


def rule_seen(attackers: list, rule: str, options: Mapping[str, Any]) -> list[Any] | None:
    """What of the server's rule the attackers' updates depend on (part of a cached attack round's
    key): nothing; only the norm it lets through (its cap, none under plain FedAvg, else an
    estimate), for strategies registered ``knows_rule="norm"``, or only the bound they keep inside
    (the cap, else an estimate, plain FedAvg included) for ``"bound"``, so that the rules of a
    comparison without a cap share one attack round; or the rule and all its settings."""
    kinds = {ATTACKS.get(a.strategy).info.get("knows_rule") for a in attackers} - {None, False}
    if not kinds:
        return None
    rule = RULES.base(rule)  # a variant is its rule with other settings: the options tell them apart
    if kinds <= {"norm", "bound"}:
        if rule in NORM_BOUNDS:
            return ["cap", options[NORM_BOUNDS[rule]]]
        return ["unchecked" if rule in UNCHECKED and "norm" in kinds else "estimated"]
    return [rule, dict(options)]


def make_attacker(strategy: str, ctx: AttackerContext, options: dict) -> Client:
    """The client of a malicious user running ``strategy`` with its settings."""
    entry = ATTACKS.get(strategy)
    settings = entry.options.model_validate(options).model_dump() if entry.options else {}
    return entry.factory(ctx, **settings)
