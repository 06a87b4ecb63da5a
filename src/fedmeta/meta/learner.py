"""The one small interface every meta-learner offers to clients, servers and experiments.

A learner turns a class pool and a generator into training episodes (index tensors, gathered in
one go) and hands the tensors to its pure update function (``reptile_step``, ``maml_step``). It
also knows how to fine-tune on a support set at meta-test time. Its optimiser state is a plain
object (``AdamState``) that callers carry, reset or checkpoint; the learner itself holds only
settings, so one learner serves every user of a federation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from fedmeta.config import MetaConfig
from fedmeta.data.episodes import Episodes, gather, minibatch_order, sample_episodes
from fedmeta.data.pool import ClassPool
from fedmeta.meta.adam import AdamState
from fedmeta.meta.maml import Task, maml_step, sgd_adapt
from fedmeta.meta.reptile import adam_finetune, reptile_step, reptile_step_batched, reptile_step_users
from fedmeta.models.build import build_model
from fedmeta.models.conv4 import Conv4, Params
from fedmeta.registry import LEARNERS


class MetaLearner(Protocol):
    model: Conv4

    def init_state(self, params: Params) -> AdamState: ...

    def train_step(
        self, params: Params, state: AdamState, episodes: Episodes, images: Tensor, gen: torch.Generator, progress: float
    ) -> tuple[Params, AdamState, Tensor]:
        """One outer step on ``episodes`` (rows into ``images``); ``progress`` in [0, 1) anneals rates."""
        ...

    def sample(self, pool: ClassPool, gen: torch.Generator) -> Episodes:
        """The episodes of one outer step."""
        ...

    def adapt_order(self, examples: int, steps: int, batch: int, episodes: int, gen: torch.Generator) -> Tensor:
        """``[episodes, steps, batch]``: which support examples each fine-tuning step uses."""
        ...

    def adapt_path(self, params: Params, x: Tensor, y: Tensor, order: Tensor, lr: float) -> Iterator[Params]:
        """Fine-tune on a support set (meta-test time), one step per row of ``order``, yielding
        the weights after each step."""
        ...


def adapt(learner: MetaLearner, params: Params, x: Tensor, y: Tensor, order: Tensor, lr: float) -> Params:
    """The weights at the end of ``learner.adapt_path`` (``params`` if there are no steps)."""
    weights = params
    for weights in learner.adapt_path(params, x, y, order, lr):
        pass
    return weights


def outer_rate(cfg: MetaConfig, progress: float) -> float:
    """The outer step size, linearly annealed to ``meta_lr_final`` when that is set."""
    if cfg.meta_lr_final is None:
        return cfg.meta_lr
    return (1.0 - progress) * cfg.meta_lr + progress * cfg.meta_lr_final


@dataclass(frozen=True)
class Reptile:
    model: Conv4
    cfg: MetaConfig
    batched: bool = False

    def init_state(self, params: Params) -> AdamState:
        return AdamState.zeros(list(params.values()))

    def sample(self, pool: ClassPool, gen: torch.Generator) -> Episodes:
        return sample_episodes(pool, self.cfg.meta_batch, self.cfg.ways, self.cfg.shots, 0, gen)

    def train_step(
        self, params: Params, state: AdamState, episodes: Episodes, images: Tensor, gen: torch.Generator, progress: float
    ) -> tuple[Params, AdamState, Tensor]:
        x, y = self.step_inputs(episodes, images, gen)
        if self.batched:
            return reptile_step_batched(self.model, params, state, x, y, **self._rates(progress))
        return reptile_step(self.model, params, state, x, y, carry=self.cfg.adam_carry, **self._rates(progress))

    def step_inputs(self, episodes: Episodes, images: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """The inner mini-batches of one outer step: ``x [B, e, b, C, H, W]``, ``y [B, e, b]`` (draws
        the mini-batch order from ``gen``, after the episodes)."""
        cfg = self.cfg
        count = episodes.rows.shape[0]
        order = minibatch_order(episodes.support.shape[1], cfg.inner_steps, cfg.inner_batch, count, gen)
        x = gather(images, episodes.support.gather(1, order.flatten(1)).view_as(order))
        return x, episodes.support_labels()[order].to(x.device)

    def train_step_users(
        self, params: Params, state: AdamState, x: Tensor, y: Tensor, progress: float
    ) -> tuple[Params, AdamState, Tensor]:
        """``train_step`` of several users at once, from their stacked ``step_inputs``
        (``reptile_step_users``; ``params`` and ``state`` stacked per user)."""
        return reptile_step_users(self.model, params, state, x, y, carry=self.cfg.adam_carry, **self._rates(progress))

    def _rates(self, progress: float) -> dict[str, float]:
        return dict(lr=self.cfg.inner_lr, beta2=self.cfg.adam_beta2, epsilon=outer_rate(self.cfg, progress))

    def adapt_order(self, examples: int, steps: int, batch: int, episodes: int, gen: torch.Generator) -> Tensor:
        return minibatch_order(examples, steps, min(batch, examples), episodes, gen)

    def adapt_path(self, params: Params, x: Tensor, y: Tensor, order: Tensor, lr: float) -> Iterator[Params]:
        return adam_finetune(self.model, params, x, y, order, lr=lr, beta2=self.cfg.adam_beta2)


@dataclass(frozen=True)
class Maml:
    model: Conv4
    cfg: MetaConfig

    @property
    def first_order(self) -> bool:
        return self.cfg.algorithm == "fomaml"

    def init_state(self, params: Params) -> AdamState:
        return AdamState.zeros(list(params.values()))

    def sample(self, pool: ClassPool, gen: torch.Generator) -> Episodes:
        return sample_episodes(pool, self.cfg.meta_batch, self.cfg.ways, self.cfg.shots, self.cfg.queries, gen)

    def tasks(self, episodes: Episodes, images: Tensor) -> tuple[Task, Task]:
        """Support and query sets of all episodes: (x ``[T, S, C, H, W]``, y ``[T, S]``) each."""
        support = gather(images, episodes.support)
        query = gather(images, episodes.query)
        sy = episodes.support_labels().to(support.device).expand(len(support), -1)
        qy = episodes.query_labels().to(query.device).expand(len(query), -1)
        return (support, sy), (query, qy)

    def train_step(
        self, params: Params, state: AdamState, episodes: Episodes, images: Tensor, gen: torch.Generator, progress: float
    ) -> tuple[Params, AdamState, Tensor]:
        support, query = self.tasks(episodes, images)
        return maml_step(
            self.model,
            params,
            state,
            support,
            query,
            inner_steps=self.cfg.inner_steps,
            inner_lr=self.cfg.inner_lr,
            meta_lr=outer_rate(self.cfg, progress),
            first_order=self.first_order,
        )

    def adapt_order(self, examples: int, steps: int, batch: int, episodes: int, gen: torch.Generator) -> Tensor:
        """MAML fine-tunes on the full support set at every step."""
        return torch.arange(examples).expand(episodes, steps, examples)

    def adapt_path(self, params: Params, x: Tensor, y: Tensor, order: Tensor, lr: float) -> Iterator[Params]:
        weights = {k: v.detach() for k, v in params.items()}
        for _ in order:
            with torch.enable_grad():
                leaves = {k: v.requires_grad_() for k, v in weights.items()}
                stepped = sgd_adapt(self.model, leaves, x, y, steps=1, lr=lr, create_graph=False)
            weights = {k: v.detach() for k, v in stepped.items()}
            yield weights


def make_learner(model: Conv4, cfg: MetaConfig, batched: bool = False, robust: Any = None,
                 name: str | None = None) -> MetaLearner:
    """The registered learner ``name`` (default: ``meta.algorithm``); ``robust`` configures the
    robust MAML variants (``fedmeta.defenses.robust_maml``)."""
    return LEARNERS.get(name or cfg.algorithm).factory(model, cfg, batched=batched, robust=robust)


def build_learner(cfg: Any, image_shape: tuple[int, int, int], meta: MetaConfig | None = None) -> MetaLearner:
    """The configured model for images ``(H, W, C)`` and the meta-learner that trains it
    (``meta`` overrides ``cfg.meta``, e.g. for pre-training or an attacker's longer inner loop)."""
    meta = meta or cfg.meta
    return make_learner(build_model(cfg.model, image_shape, meta.ways), meta, cfg.runtime.batched)


@LEARNERS.register("reptile")
def reptile(model: Conv4, cfg: MetaConfig, batched: bool = False, robust: Any = None) -> MetaLearner:
    """Reptile (Nichol et al., 2018), as in openai/supervised-reptile."""
    return Reptile(model, cfg, batched)


@LEARNERS.register("maml")
@LEARNERS.register("fomaml")
def maml(model: Conv4, cfg: MetaConfig, batched: bool = False, robust: Any = None) -> MetaLearner:
    """MAML (Finn et al., 2017); first-order when meta.algorithm = 'fomaml'."""
    return Maml(model, cfg)
