"""Robust meta-learning: where to put adversarial training in MAML (Wang et al., ICLR 2021).

All learners below adapt to a task exactly as MAML does, and all are evaluated the same way:
a few SGD steps on the *clean* support set, then accuracy under attack. They differ only in the
meta-loss of a task, i.e. in what the meta-initialisation is trained to do after adaptation:

- ``maml``: cross-entropy of the adapted weights on the clean query set (the core ``Maml``).
- ``adml`` (Yin et al., 2018): adversarial examples in both loops. Two adaptations per task, one
  on the clean support set and one on adversarial support sets (re-attacked before every inner
  step); the meta-loss averages the clean query loss of the adversarially adapted weights and the
  adversarial query loss of the cleanly adapted ones.
- ``rmaml-at``: R-MAML with adversarial training in the meta-update only: clean query
  cross-entropy plus ``at_weight`` times the cross-entropy on attacked queries.
- ``rmaml-trades``: R-MAML with the TRADES regulariser in the meta-update only: clean query
  cross-entropy plus ``beta * KL(p(x) || p(x + delta))`` over support and query images, where
  delta maximises that KL. The natural branch is not detached, as in TRADES.

R-MAML's finding is that robustness in the meta-update alone carries over to a clean fine-tuning
at test time, at a fraction of ADML's cost. Training attacks are FGSM with random start (one
step of 1.25 epsilon), as in the reference code (wangren09/MetaAdv); they target the adapted
weights, and they are constants for the meta-gradient.

BatchNorm uses batch statistics throughout: attacked and clean batches are forwarded separately,
so each is normalised by its own statistics, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmeta.attacks.evasion import LinfAttack, cross_entropy_of, pixels
from fedmeta.config.sections import MetaConfig, RobustConfig
from fedmeta.data.episodes import Episodes
from fedmeta.meta.adam import AdamState
from fedmeta.meta.learner import Maml, MetaLearner, make_learner, outer_rate
from fedmeta.meta.maml import Task, meta_update, sgd_adapt
from fedmeta.models.conv4 import Conv4, Params
from fedmeta.registry import LEARNERS


def frozen(params: Params) -> Params:
    """The weights as constants: what an attack differentiates (only with respect to its input)."""
    return {k: v.detach() for k, v in params.items()}


def adversarial_query_loss(
    model: Conv4, adapted: Params, query: Task, attack: LinfAttack, gen: torch.Generator, weight: float
) -> Tensor:
    """R-MAML-AT: clean query cross-entropy + ``weight`` * cross-entropy on attacked queries."""
    x, y = query
    adv = attack(cross_entropy_of(partial(model, frozen(adapted)), y), x, gen)
    return F.cross_entropy(model(adapted, x), y) + weight * F.cross_entropy(model(adapted, adv), y)


def trades_loss(
    model: Conv4, adapted: Params, support: Task, query: Task, attack: LinfAttack, gen: torch.Generator, beta: float
) -> Tensor:
    """R-MAML-TRADES: clean query cross-entropy + ``beta`` * KL(p(x) || p(x + delta)) on support and query.

    The KL needs no labels, so it regularises the support images as well (and could take
    unlabeled ones). The attack maximises the same KL against the natural prediction, starting
    from a random point of the ball (at delta = 0 the KL and its gradient vanish).
    """
    x = torch.cat([support[0], query[0]])
    natural = F.log_softmax(model(adapted, x), dim=-1)
    target = natural.detach()
    kl_to = lambda xa: F.kl_div(F.log_softmax(model(frozen(adapted), xa), dim=-1), target, log_target=True,  # noqa: E731
                                reduction="batchmean")
    adv = attack(kl_to, x, gen)
    kl = F.kl_div(F.log_softmax(model(adapted, adv), dim=-1), natural, log_target=True, reduction="batchmean")
    return F.cross_entropy(model(adapted, query[0]), query[1]) + beta * kl


def adversarial_adapt(
    model: Conv4, params: Params, support: Task, attack: LinfAttack, gen: torch.Generator, *,
    steps: int, lr: float, create_graph: bool,
) -> Params:
    """ADML's robust adaptation: each SGD step on the support set attacked against the current weights."""
    x, y = support
    for _ in range(steps):
        adv = attack(cross_entropy_of(partial(model, frozen(params)), y), x, gen)
        params = sgd_adapt(model, params, adv, y, steps=1, lr=lr, create_graph=create_graph)
    return params


def adml_loss(
    model: Conv4, params: Params, support: Task, query: Task, attack: LinfAttack, gen: torch.Generator, *,
    steps: int, lr: float, create_graph: bool,
) -> Tensor:
    """ADML: mean of the clean query loss of the adversarially adapted weights and the adversarial
    query loss of the cleanly adapted weights."""
    clean = sgd_adapt(model, params, *support, steps=steps, lr=lr, create_graph=create_graph)
    robust = adversarial_adapt(model, params, support, attack, gen, steps=steps, lr=lr, create_graph=create_graph)
    x, y = query
    adv = attack(cross_entropy_of(partial(model, frozen(clean)), y), x, gen)
    return 0.5 * (F.cross_entropy(model(robust, x), y) + F.cross_entropy(model(clean, adv), y))


ROBUST_METHODS = ("adml", "rmaml-at", "rmaml-trades")


@dataclass(frozen=True)
class RobustMaml(Maml):
    """MAML with a robust meta-loss; sampling and (clean) adaptation are MAML's.

    ``gen`` in ``train_step`` feeds the random starts of the training attacks.
    """

    method: str
    attack: LinfAttack
    trades_beta: float
    at_weight: float

    def __post_init__(self) -> None:
        if self.method not in ROBUST_METHODS:
            raise ValueError(f"RobustMaml method must be one of {ROBUST_METHODS}, got {self.method!r}")

    def task_loss(self, params: Params, support: Task, query: Task, gen: torch.Generator) -> Tensor:
        inner = dict(steps=self.cfg.inner_steps, lr=self.cfg.inner_lr, create_graph=not self.first_order)
        if self.method == "adml":
            return adml_loss(self.model, params, support, query, self.attack, gen, **inner)
        adapted = sgd_adapt(self.model, params, *support, **inner)
        if self.method == "rmaml-at":
            return adversarial_query_loss(self.model, adapted, query, self.attack, gen, self.at_weight)
        return trades_loss(self.model, adapted, support, query, self.attack, gen, self.trades_beta)

    def train_step(
        self, params: Params, state: AdamState, episodes: Episodes, images: Tensor, gen: torch.Generator, progress: float
    ) -> tuple[Params, AdamState, Tensor]:
        support, query = self.tasks(episodes, images)
        task_loss = partial(self.task_loss, gen=gen)
        return meta_update(params, state, task_loss, support, query, meta_lr=outer_rate(self.cfg, progress))


def make_robust_learner(model: Conv4, meta: MetaConfig, robust: RobustConfig, name: str) -> MetaLearner:
    """The learner ``name`` (``maml`` is the core MAML learner itself, so the baseline is exact)."""
    return make_learner(model, meta, robust=robust, name=name)


def _robust(method: str):
    def factory(model: Conv4, meta: MetaConfig, batched: bool = False, robust: RobustConfig | None = None) -> MetaLearner:
        if robust is None:
            raise ValueError(f"the learner '{method}' needs the [robust] settings")
        attack = LinfAttack.fgsm_rs(pixels(robust.epsilon), robust.fgsm_step)
        return RobustMaml(model, meta, method, attack, robust.trades_beta, robust.at_weight)

    factory.__doc__ = {"adml": "ADML (Yin et al., 2018): adversarial examples in both loops.",
                       "rmaml-at": "R-MAML-AT (Wang et al., 2021): adversarial query loss in the meta-update.",
                       "rmaml-trades": "R-MAML-TRADES (Wang et al., 2021): TRADES KL term in the meta-update."}[method]
    return factory


for _method in ROBUST_METHODS:
    LEARNERS.register(_method, robust=True)(_robust(_method))
