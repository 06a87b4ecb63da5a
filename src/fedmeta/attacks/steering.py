"""Steered poisoned training: the shared machinery of the adaptive attacks.

An adaptive attacker trains the backdoor like the paper's attacker (long local meta-training on
poisoned episodes, ``AttackerContext.poisoned_client``) but looks at the global model first and
decides, for this round, how each outer step is steered (projected back into a feasible set, or
pulled towards benign-looking weights) and how the final update is shaped before it is sent. The
meta-learner stays opaque: ``Steered`` wraps it and applies the steer after each of its outer
steps, so the same attack runs on Reptile, MAML or any registered learner.

- ``ball``: projection onto an L2 ball around the global model (PGD; Sun et al. 2019, Wang et al.
  2020; constrain-and-scale under a norm bound, Bagdasaryan et al. 2020, after its pulled step: ``chain``);
- ``frozen``: coordinates kept at the global model's values (Neurotoxin; Zhang et al. 2022);
- ``box``: per-coordinate bounds on the update (ALIE; Baruch et al. 2019).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fedmeta.attacks.strategies import AttackerContext
from fedmeta.data.episodes import Episodes
from fedmeta.federation.client import MetaClient, RoundSettings
from fedmeta.federation.updates import ClientUpdate, flatten, unflatten
from fedmeta.meta.adam import AdamState
from fedmeta.meta.learner import MetaLearner
from fedmeta.models.conv4 import Params

Steer = Callable[[Params, Params, float], Params]
"""``(weights before the outer step, weights after it, progress) -> the weights training goes on from``."""


@dataclass(frozen=True)
class Steered:
    """A meta-learner whose every outer step is followed by ``steer``: the training side of a
    ``MetaLearner``, what a ``MetaClient`` with its own episode sampler calls."""

    inner: MetaLearner
    steer: Steer

    def init_state(self, params: Params) -> AdamState:
        return self.inner.init_state(params)

    def train_step(self, params: Params, state: AdamState, episodes: Episodes, images: Tensor, gen: torch.Generator,
                   progress: float) -> tuple[Params, AdamState, Tensor]:
        stepped, state, loss = self.inner.train_step(params, state, episodes, images, gen, progress)
        return self.steer(params, stepped, progress), state, loss


@dataclass(frozen=True)
class Steering:
    """One round's plan: ``step`` after every outer step; ``send`` maps the flat trained update
    to the one sent (None: sent as trained)."""

    step: Steer
    send: Callable[[Tensor], Tensor] | None = None


def chain(first: Steer, then: Steer) -> Steer:
    """``first``, then ``then`` on its result (e.g. a pulled step, projected back into a ball)."""
    return lambda before, after, progress: then(before, first(before, after, progress), progress)


def ball(anchor: Params, radius: float) -> Steer:
    """Projection onto ``{theta : ||theta - anchor||_2 <= radius}`` (all parameters as one vector)."""
    centre = flatten(anchor)

    def project(before: Params, after: Params, progress: float) -> Params:
        delta = flatten(after) - centre
        return unflatten(centre + delta * (radius / delta.norm()).clamp(max=1.0), anchor)

    return project


def frozen(anchor: Params, mask: Tensor) -> Steer:
    """Coordinates where ``mask`` (flat, bool) is set stay exactly at ``anchor``'s values."""
    centre = flatten(anchor)
    return lambda before, after, progress: unflatten(torch.where(mask, centre, flatten(after)), anchor)


def box(anchor: Params, low: Tensor, high: Tensor) -> Steer:
    """Projection of the update ``theta - anchor`` onto ``[low, high]`` per coordinate (flat bounds)."""
    centre = flatten(anchor)
    return lambda before, after, progress: unflatten(centre + (flatten(after) - centre).clamp(low, high), anchor)


@dataclass(frozen=True)
class SteeredAttack(ABC):
    """A malicious client that plans each round (``steering``) from the global model, then runs
    ``training`` (its poisoned local training) steered by that plan. Stateless between rounds:
    its randomness is ``training``'s stream (and the clean clients' streams for estimates)."""

    ctx: AttackerContext
    training: MetaClient

    @property
    def user(self) -> int:
        return self.ctx.user

    @property
    def images(self) -> Tensor:
        """The image store it trains on (a Flower node moves the global weights to its device)."""
        return self.training.images

    @property
    def examples(self) -> int:
        """Its data size, as its updates claim it (``MetaClient.examples``)."""
        return self.training.examples

    @abstractmethod
    def steering(self, global_params: Params, settings: RoundSettings) -> Steering:
        """This round's plan, from the global model it starts from."""

    def trained(self, global_params: Params, settings: RoundSettings, plan: Steering) -> ClientUpdate:
        """The update that training steered by ``plan`` ends with, before ``plan.send`` shapes it."""
        client = replace(self.training, learner=Steered(self.training.learner, plan.step))
        return client.update(global_params, settings)

    def update(self, global_params: Params, settings: RoundSettings) -> ClientUpdate:
        plan = self.steering(global_params, settings)
        update = self.trained(global_params, settings, plan)
        if plan.send is None:
            return update
        return replace(update, delta=unflatten(plan.send(flatten(update.delta)), update.delta))
