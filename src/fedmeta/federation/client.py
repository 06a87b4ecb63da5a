"""A federation client: global weights and round settings in, update out.

The same object serves the in-process simulator and the distributed engines: it holds no state
between rounds (its randomness comes from a stream named by seed, phase, user and round, and its
optimiser state starts fresh each round), so any process that can build it can run any round.
Which meta-learner it runs, and how it draws its episodes (benign ones, or an attacker's poisoned
ones), are its parts; the server never looks inside.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from fedmeta.data.episodes import Episodes
from fedmeta.federation.journal import Journal, Progress
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
    journal: Path | None = None
    """Where each client saves its progress through the round's update, so that a killed run resumes
    it mid-update (``fedmeta.federation.journal``; set for cached attack rounds); users that train
    together (``update_together``: short benign updates) save nothing."""


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
        gen = self.generator(settings)
        journal = Journal.of(settings.journal, self.user, settings.phase, settings.round, self.steps)
        at = self.start(global_params, gen, journal)
        params, state, loss_sum = at.params, at.state, at.loss_sum
        bar = tqdm(range(at.step, self.steps), desc=f"round {settings.round}, user {self.user}", unit="step",
                   leave=False, initial=at.step, total=self.steps)
        for step in bar:
            episodes, progress = self.sample(gen), self.progress(settings, step)
            params, state, loss = self.learner.train_step(params, state, episodes, self.images, gen, progress)
            loss_sum += loss.detach()
            if journal is not None:
                journal.tick(Progress(step + 1, params, state, loss_sum), gen)
        return self.result(global_params, params, loss_sum)

    def start(self, global_params: Params, gen: torch.Generator, journal: Journal | None) -> Progress:
        """Where the update starts: the journal's last save, else step 0 from the global weights."""
        params = {k: v.detach() for k, v in global_params.items()}
        if journal is not None and (saved := journal.resume(params, gen)) is not None:
            return saved
        loss_sum = torch.zeros((), device=self.images.device)  # summed on the device: one host sync per update
        return Progress(0, params, self.learner.init_state(params), loss_sum)

    def generator(self, settings: RoundSettings) -> torch.Generator:
        """This user's random stream for the round: every episode and mini-batch it draws."""
        return stream(self.seed, "client", settings.phase, self.user, settings.round)

    def progress(self, settings: RoundSettings, step: int) -> float:
        """Where outer step ``step`` of the round lies in the whole schedule (for annealed rates)."""
        start, end = settings.progress
        return start + (end - start) * step / self.steps

    def result(self, global_params: Params, params: Params, loss_sum: Tensor) -> ClientUpdate:
        delta = {k: self.boost * v for k, v in subtract(params, global_params).items()}
        return ClientUpdate(self.user, delta, self.examples, {"loss": float(loss_sum) / max(self.steps, 1)})


def batchable(clients: Sequence[MetaClient]) -> bool:
    """Whether ``update_together`` can run these clients as one computation: one learner that has
    a users-batched step (Reptile), one image store, the same number of outer steps."""
    first = clients[0]
    return hasattr(first.learner, "train_step_users") and all(
        c.learner is first.learner and c.images is first.images and c.steps == first.steps for c in clients)


def update_together(clients: Sequence[MetaClient], global_params: Params,
                    settings: RoundSettings) -> list[ClientUpdate]:
    """``[c.update(global_params, settings) for c in clients]`` as one batched computation (the
    users' weights and Adam moments stacked, one ``vmap`` per inner step: ``reptile_step_users``).

    Each user still draws its episodes and mini-batches from its own stream, in the order its
    ``update`` draws them, so the updates equal the sequential ones up to float round-off (tested).
    Pays on a GPU, where a step of one small Conv4 is launch-bound; on a CPU it does not."""
    if not batchable(clients):
        raise ValueError("update_together needs clients of one Reptile learner, one image store and one length")
    first, users = clients[0], len(clients)
    gens = [c.generator(settings) for c in clients]
    params = {k: v.detach().unsqueeze(0).repeat(users, *([1] * v.dim())) for k, v in global_params.items()}
    state = first.learner.init_state(global_params).expand(users)
    loss_sum = torch.zeros(users, device=first.images.device)
    for step in tqdm(range(first.steps), desc=f"round {settings.round}, {users} users", unit="step", leave=False):
        inputs = [c.learner.step_inputs(c.sample(g), c.images, g) for c, g in zip(clients, gens, strict=True)]
        xs, ys = zip(*inputs, strict=True)
        params, state, loss = first.learner.train_step_users(params, state, torch.stack(xs), torch.stack(ys),
                                                             first.progress(settings, step))
        loss_sum += loss.detach()
    return [c.result(global_params, {k: v[i] for k, v in params.items()}, loss_sum[i]) for i, c in enumerate(clients)]
