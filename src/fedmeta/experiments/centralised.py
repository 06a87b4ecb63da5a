"""The centralised meta-training loop (one learner, all meta-training classes), shared by
pre-training and the robustness comparison.

``Training`` is everything a checkpoint must restore (weights, the learner's optimiser state, the
random streams of episodes and of the training step, the iteration, the training time);
``meta_train`` runs it to ``iterations`` in a ``Session`` and calls ``point`` every ``every``
iterations and at the end, where the experiment evaluates, logs and checkpoints. A non-finite loss
or weight stops it with ``Diverged`` naming the iteration, before anything non-finite is
evaluated or checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fedmeta.data.pool import ClassPool
from fedmeta.meta.adam import AdamState
from fedmeta.meta.learner import MetaLearner
from fedmeta.models.conv4 import Params
from fedmeta.runs import Resumed, Session, restore_generator
from fedmeta.runtime import Diverged, check_finite, synchronized_time

LOSS_EVERY = 50  # iterations between progress-bar loss updates (each one syncs with the device)


@dataclass
class Training:
    params: Params
    state: AdamState
    episode_gen: torch.Generator
    step_gen: torch.Generator  # the training step's own randomness (may be ``episode_gen`` itself)
    iteration: int = 0
    train_s: float = 0.0  # training time, evaluations excluded

    def tensors(self) -> dict[str, Tensor]:
        names = list(self.params)
        own = {} if self.step_gen is self.episode_gen else {"rng.step": self.step_gen.get_state()}
        return ({f"params.{k}": v for k, v in self.params.items()} | self.state.to_tensors("state.", names)
                | {"rng.episodes": self.episode_gen.get_state()} | own)

    def progress(self) -> dict[str, float]:
        """The JSON half of a checkpoint (with ``tensors``)."""
        return {"train_s": self.train_s}

    @classmethod
    def restore(cls, resumed: Resumed, like: Params, device: torch.device) -> Training:
        episodes = restore_generator(resumed.tensors["rng.episodes"])
        step = restore_generator(resumed.tensors["rng.step"]) if "rng.step" in resumed.tensors else episodes
        return cls(resumed.take("params.", like), AdamState.from_tensors(resumed.group("", device), "state.", list(like)),
                   episodes, step, resumed.step, resumed.state.get("train_s", 0.0))


def meta_train(session: Session, learner: MetaLearner, train: ClassPool, run: Training, iterations: int, every: int,
               point: Callable[[Training], None], desc: str) -> Training:
    """Train ``run`` up to ``iterations``, calling ``point(run)`` every ``every`` iterations and at the end."""
    device = next(iter(run.params.values())).device
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device)  # the first iteration with a non-finite loss, on the device: no sync
    segment = synchronized_time(device)
    for it in session.steps(run.iteration, iterations, desc=desc, unit="it"):
        episodes = learner.sample(train, run.episode_gen)
        run.params, run.state, loss = learner.train_step(run.params, run.state, episodes, train.images, run.step_gen,
                                                         it / iterations)
        loss_sum += loss
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), it + 1, first_bad)
        run.iteration = it + 1
        if run.iteration % LOSS_EVERY == 0:
            mean_loss, bad = torch.stack([loss_sum / LOSS_EVERY, first_bad.to(loss_sum.dtype)]).tolist()  # one sync
            _stop_if_diverged(int(bad), desc)
            session.postfix(loss=f"{mean_loss:.3f}")
            loss_sum.zero_()
        if run.iteration % every == 0 or run.iteration == iterations:
            _stop_if_diverged(int(first_bad), desc)
            check_finite(run.params, f"{desc}: iteration {run.iteration}")  # before it is evaluated or checkpointed
            run.train_s += synchronized_time(device) - segment
            point(run)
            segment = synchronized_time(device)
    return run


def _stop_if_diverged(iteration: int, desc: str) -> None:
    if iteration >= 0:
        raise Diverged(f"{desc}: the loss is not finite at iteration {iteration}; lower the learning rates "
                       "(meta.inner_lr, meta.meta_lr) and start a new run (the folder keeps the last good checkpoint)")
