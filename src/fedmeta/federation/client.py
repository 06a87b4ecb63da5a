"""A federation client: global weights and round settings in, update out.

The same object serves the in-process simulator and the distributed engines: it holds no state
between rounds (its randomness comes from a stream named by seed, phase, user and round, and its
optimiser state starts fresh each round), so any process that can build it can run any round.
Which meta-learner it runs, and how it draws its episodes (benign ones, or an attacker's poisoned
ones), are its parts; the server never looks inside.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from fedmeta.data.episodes import Episodes
from fedmeta.federation.updates import ClientUpdate, subtract
from fedmeta.meta.learner import MetaLearner
from fedmeta.models.conv4 import Params
from fedmeta.rng import stream

Sampler = Callable[[torch.Generator], Episodes]
"""Draws the episodes of one outer step (index tensors into the client's images)."""


@dataclass(frozen=True)
class RoundSettings:
    round: int
    phase: str = "main"  # "pretrain" or "main": names the random streams of the round
    progress: tuple[float, float] = (0.0, 1.0)  # span of the whole schedule this round covers (annealing)


@dataclass(frozen=True)
class MetaClient:
    user: int
    learner: MetaLearner
    images: Tensor
    sample: Sampler
    steps: int  # outer steps per round: E episodes / meta-batch
    examples: int  # data size, for size-weighted aggregation
    seed: int
    boost: float = 1.0  # lambda: an attacker scales its update to prevail over the others

    def update(self, global_params: Params, settings: RoundSettings) -> ClientUpdate:
        gen = stream(self.seed, "client", settings.phase, self.user, settings.round)
        params = {k: v.detach() for k, v in global_params.items()}
        state = self.learner.init_state(params)
        start, end = settings.progress
        loss_sum = torch.zeros((), device=self.images.device)  # summed on the device: one host sync per update
        bar = tqdm(range(self.steps), desc=f"round {settings.round}, user {self.user}", unit="step", leave=False)
        for step in bar:
            progress = start + (end - start) * step / self.steps
            episodes = self.sample(gen)
            params, state, loss = self.learner.train_step(params, state, episodes, self.images, gen, progress)
            loss_sum += loss.detach()
        delta = {k: self.boost * v for k, v in subtract(params, global_params).items()}
        return ClientUpdate(self.user, delta, self.examples, {"loss": float(loss_sum) / max(self.steps, 1)})
