"""Neurotoxin (Zhang et al., "Neurotoxin: Durable Backdoors in Federated Learning", ICML 2022,
Algorithm 1): the backdoor is written into the coordinates benign users change least, so later
benign rounds overwrite it slowly."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import Field, PositiveFloat
from torch import Tensor

from fedmeta.attacks.steering import SteeredAttack, Steering, frozen
from fedmeta.attacks.strategies import AttackerContext, TrainingOptions
from fedmeta.federation.client import RoundSettings
from fedmeta.models.conv4 import Params
from fedmeta.registry import ATTACKS


class NeurotoxinOptions(TrainingOptions):
    top: float = Field(0.05, gt=0.0, lt=1.0)
    """k: the fraction of coordinates, largest in magnitude in the estimated benign update, that the attack never changes."""
    boost: PositiveFloat = 1.0
    """Scale of the sent update (1: Neurotoxin's plain update; the mask is kept either way)."""
    estimates: int = Field(1, ge=1, le=100)
    """Benign updates estimated from theta_G whose mean ranks the coordinates: the paper ranks by the
    last global update, itself a mean of many users' updates; one estimate is noisier than that mean."""


@dataclass(frozen=True)
class Neurotoxin(SteeredAttack):
    """Each round, from the global model theta_G:

    1. Estimate the benign update g: the mean of ``estimates`` honest updates from theta_G on its
       clean classes (``AttackerContext.benign_updates``; each a fresh draw of episodes).
       Neurotoxin's attacker uses the last global update instead, but a fedmeta client keeps
       nothing between rounds and the paper's attacker is selected once, so it has seen one global
       model only; running the benign protocol on its own data from this very model shows which
       coordinates benign training moves most. The authors' code also ranks from this model: by the
       gradient on clean data at the current global model (jhcknzzm/Federated-Learning-Backdoor,
       ``train_funcs.py``), not by the last global update.
    2. Mask the top-k% coordinates of |g| (``top``).
    3. Train on poisoned episodes, projecting after every outer step onto the other coordinates:
       masked coordinates are reset to theta_G's values, so the sent update is exactly zero there.
       The inner loop adapts every weight: the mask acts on the outer (sent) update, where the
       reference code masks every SGD step's gradient. Both send zero on the masked coordinates;
       the other coordinates train differently (here the masked weights move within an episode).
    """

    top: float
    estimates: int = 1

    def mask(self, global_params: Params, settings: RoundSettings) -> Tensor:
        """Flat bool: the top-k% coordinates of the estimated benign update by magnitude."""
        benign = self.ctx.benign_updates(global_params, settings, self.estimates).mean(dim=0).abs()
        chosen = torch.zeros_like(benign, dtype=torch.bool)
        chosen[benign.topk(max(1, math.floor(self.top * benign.numel()))).indices] = True
        return chosen

    def steering(self, global_params: Params, settings: RoundSettings) -> Steering:
        return Steering(frozen(global_params, self.mask(global_params, settings)))


@ATTACKS.register("neurotoxin", options=NeurotoxinOptions)
def neurotoxin(ctx: AttackerContext, episodes: int, inner_epochs: float, top: float, boost: float,
               estimates: int) -> Neurotoxin:
    """Neurotoxin (Zhang et al., ICML 2022): poisoned training confined to the coordinates benign users change least."""
    return Neurotoxin(ctx, ctx.poisoned_client(episodes, inner_epochs, boost), top, estimates)
