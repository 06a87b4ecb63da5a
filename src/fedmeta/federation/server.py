"""The federation loop: pick users, collect their updates, screen them, aggregate.

It knows clients only as "global weights in, update out" and rules only as functions over
stacked updates, so Reptile or MAML, benign or malicious, FedAvg or a robust rule all run through
the same loop. An update with a NaN or Inf is rejected and logged, never averaged in.

A rule that compares the updates with the server's own (FLTrust) gets it as ``reference=``: the
server's ``reference`` client, a benign client trained on the server's root set, computes it each
round from the same global weights (``scenario.builder.build_server`` builds it for rules
registered with ``reference=True``). A rule that looks at the local models G + delta_i (FLAME,
FreqFed: ``sees_model = True`` on the rule) gets the flat global weights as ``model=``; one that
reads the updates layer by layer (FreqFed's per-layer DCT, FoolsGold's output layer:
``sees_shapes = True``) gets the parameters' shapes, in the order they are flattened, as ``shapes=``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from fedmeta.federation.aggregation import Rule, is_stateful
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.schedule import Schedule
from fedmeta.federation.updates import ClientUpdate, add, flatten, unflatten
from fedmeta.models.conv4 import Params
from fedmeta.rng import stream
from fedmeta.runtime import Diverged

log = logging.getLogger(__name__)


class Client(Protocol):
    user: int

    def update(self, global_params: Params, settings: RoundSettings) -> ClientUpdate: ...


@dataclass(frozen=True)
class RoundReport:
    round: int
    participants: list[int]
    aggregated: list[int]  # whose updates were applied
    rejected: list[int] = field(default_factory=list)  # non-finite updates
    losses: dict[int, float] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)  # selected users whose update never arrived (remote engines)

    def fields(self) -> dict[str, list[int]]:
        """Who took part, whose update was applied, rejected or never arrived: for metric lines."""
        return {"participants": self.participants, "aggregated": self.aggregated, "rejected": self.rejected,
                "missing": self.missing}


@dataclass(frozen=True)
class Server:
    clients: Mapping[int, Client]
    schedule: Schedule
    rule: Rule
    min_updates: int  # M_min: aggregate as soon as this many updates arrived
    weighting: Literal["equal", "size"] = "equal"
    reference: Client | None = None  # the server's own client, for rules that take ``reference=``
    sums: bool = False
    """Secure aggregation (``federation.secure_aggregation``): the server learns one sum of every
    update that arrives, so it applies them all (``min_updates`` only decides whether a round may go
    on without a straggler). On Flower the sum comes from SecAgg+ (``FlowerServer.round``); the
    defense comparison's secure rows hand ``aggregate`` that one sum (``comparison._sum_only``)."""

    def snapshot(self, params: Params) -> dict[str, torch.Tensor]:
        """What a checkpoint of the federation holds: the global weights (``params.*``) and what the
        server carries from round to round (a stateful rule's state, ``rule.*``)."""
        rule = self.rule.state_dict() if is_stateful(self.rule) else {}
        return {f"params.{k}": v for k, v in params.items()} | {f"rule.{k}": v for k, v in rule.items()}

    def restore(self, tensors: dict[str, torch.Tensor], like: Params) -> Params:
        """Load the rule's state from a ``snapshot`` and return its global weights (on ``like``'s devices)."""
        if is_stateful(self.rule):
            device = next(iter(like.values())).device
            self.rule.load_state_dict({k.removeprefix("rule."): v.to(device) for k, v in tensors.items()
                                       if k.startswith("rule.")})
        return {k: tensors[f"params.{k}"].to(v.device) for k, v in like.items()}

    def round(self, params: Params, settings: RoundSettings) -> tuple[Params, RoundReport]:
        return self.aggregate(params, self.updates(params, settings), settings)

    def updates(self, params: Params, settings: RoundSettings,
                known: Mapping[int, ClientUpdate] | None = None) -> list[ClientUpdate]:
        """The updates of this round's participants (the expensive half of a round), in the
        schedule's order. ``known``: updates of some of them already computed for this round from
        the same ``params`` (a cache), used instead of training those users again."""
        users = self.schedule.participants(settings.round, settings.phase)
        known = {u: known[u] for u in users if u in known} if known else {}
        todo = [u for u in users if u not in known]
        done = known | dict(zip(todo, self.compute(todo, params, settings), strict=True))
        return [done[u] for u in users]

    def compute(self, users: list[int], params: Params, settings: RoundSettings) -> list[ClientUpdate]:
        """The updates of ``users`` this round, in their order (what an engine's server overrides)."""
        return [self.clients[u].update(params, settings) for u in users]

    def aggregate(self, params: Params, updates: list[ClientUpdate], settings: RoundSettings) -> tuple[Params, RoundReport]:
        """Apply the first ``min_updates`` finite updates to arrive (arrival order: seeded; all of
        them when the server ``sums``), their weights normalised to sum to one over the updates
        applied (``federation.weighting``)."""
        order = torch.randperm(len(updates), generator=stream(self.schedule.seed, "arrival", settings.phase, settings.round))
        arrived = [updates[i] for i in order.tolist()]
        rejected = [u.user for u in arrived if not u.is_finite()]
        for user in rejected:
            log.warning("round %d: rejected the update of user %d (NaN or Inf)", settings.round, user)
        accepted = [u for u in arrived if u.is_finite()][: None if self.sums else self.min_updates]
        report = RoundReport(
            settings.round, sorted(u.user for u in updates), sorted(u.user for u in accepted), rejected,
            {u.user: u.metrics.get("loss", float("nan")) for u in updates},
        )
        if not accepted:
            log.warning("round %d: no usable update; the global model is unchanged", settings.round)
            return params, report
        accepted.sort(key=lambda u: u.user)  # rules see updates in a fixed order (Krum breaks ties by it)
        stacked = torch.stack([flatten(u.delta) for u in accepted])
        sizes = torch.tensor([float(u.examples if self.weighting == "size" else 1) for u in accepted])
        gen = stream(self.schedule.seed, "aggregation", settings.phase, settings.round)
        users = [u.user for u in accepted]
        extra = {} if self.reference is None else {"reference": self._reference(params, settings).to(stacked.device)}
        if getattr(self.rule, "sees_model", False):
            extra["model"] = flatten(params).to(stacked.device)
        if getattr(self.rule, "sees_shapes", False):
            extra["shapes"] = [tuple(v.shape) for v in params.values()]
        aggregated = self.rule(stacked, (sizes / sizes.sum()).to(stacked.device), gen, users=users, **extra)
        if not bool(torch.isfinite(aggregated).all()):  # one sync a round: a rule (a plugin's) that breaks
            raise Diverged(f"{settings.phase} round {settings.round}: the rule {type(self.rule).__name__} returned "
                           f"a non-finite update from {len(accepted)} finite ones; the model was not changed")
        return add(params, unflatten(aggregated, params)), report

    def _reference(self, params: Params, settings: RoundSettings) -> torch.Tensor:
        """The flat update of the server's reference client this round; an error if it is not finite
        (the server's own training diverged: nothing to compare the clients with)."""
        update = self.reference.update(params, settings)
        if not update.is_finite():
            raise FloatingPointError(f"{settings.phase} round {settings.round}: the server's reference update "
                                     "(its root set) has a NaN or Inf")
        return flatten(update.delta)
