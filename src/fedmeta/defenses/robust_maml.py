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

Two options of the R-MAML learners (``robust.unlabeled_per_class``, ``robust.contrastive_weight``;
both off by default, and then the meta-step is exactly the one without them):

- *Unlabeled data* (R-MAML-TRADES). The reference code (MetaAdv, ``CIFARFS/train_trades_cifar.ipynb``
  with ``LoadUnlableCIFAR.py`` and ``MetaFT.py``) gives every task ``batchsiz`` unlabeled images per
  class (of the first ``n_way`` support images: every class in 1-shot, the setting run here): a
  classifier pre-trained on the meta-training classes pseudo-labels each support image, and
  the task draws that many images from an external pool pre-sorted by the same classes. The images
  join support and query in the TRADES KL only (``cat(x_spt, x_qry, x_unlab)``, KL averaged over all
  of them); no label of theirs reaches the loss. Here the unlabeled images come from the
  meta-training pool itself, so the episode's class ids do the pseudo-labeller's job exactly:
  ``unlabeled_per_class`` more images of each of the task's classes, drawn in the same draw as, and
  disjoint from, its support and query examples (which stay the ones drawn without the option).
- *Auxiliary contrastive task* (R-MAML-AT and -TRADES). The paper credits an auxiliary contrastive
  learning task with extra robustness; the reference code has none, so the formulation is ours:
  SimCLR's NT-Xent (Chen et al., 2020) on the trunk embeddings of the adapted weights, where the
  two views of an image are a random augmentation of it (crop-and-resize, flip, brightness and
  contrast; pure torch, ``augment``) and the adversarial example the robust term already computed
  (as in adversarial contrastive learning: Jiang et al., 2020; Kim et al., 2020). Pulling an image's
  adversarial embedding towards a clean view of it, and away from the other images of the task,
  is a robustness term in representation space; reusing the robust term's attack costs no extra
  attack (one extra forward and backward, of the augmented view); and without SimCLR's projection
  head the meta-model has no extra weights, so federation, checkpoints and evaluation are unchanged.
  Rotation prediction, the other common self-supervised task, would need a rotation head, and a
  rotated Omniglot character is a different class in this project's rotation-augmented splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmeta.attacks.evasion import PIXEL_RANGE, LinfAttack, cross_entropy_of, pixels
from fedmeta.config.sections import MetaConfig, RobustConfig
from fedmeta.data.episodes import Episodes, gather, sample_episodes
from fedmeta.data.pool import ClassPool
from fedmeta.meta.adam import AdamState
from fedmeta.meta.learner import Maml, MetaLearner, make_learner, outer_rate
from fedmeta.meta.maml import Task, meta_update, sgd_adapt
from fedmeta.models.conv4 import Conv4, Params
from fedmeta.registry import LEARNERS

CROP_AREA = 0.5
"""Smallest fraction of the image a random crop keeps (SimCLR's 0.08 would leave too little of a 28-pixel character)."""
JITTER = 0.4
"""Brightness and contrast factors are drawn from [1 - JITTER, 1 + JITTER] (SimCLR's colour jitter at strength 0.5)."""


def frozen(params: Params) -> Params:
    """The weights as constants: what an attack differentiates (only with respect to its input)."""
    return {k: v.detach() for k, v in params.items()}


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """A random SimCLR-style view of each image ``[N, C, H, W]`` in [0, 1], in one batched op each:
    a square crop of ``CROP_AREA``..1 of the area at a random place, resized back (bilinear, via
    ``affine_grid``), a horizontal flip with probability 1/2, then brightness and contrast jitter.
    The random numbers come from the CPU generator ``gen``, as the attacks' random starts do."""
    n = x.shape[0]
    side, shift_x, shift_y, flip, brightness, contrast = torch.rand(6, n, generator=gen).to(x.device)
    side = (CROP_AREA + (1.0 - CROP_AREA) * side).sqrt()
    zeros = torch.zeros_like(side)
    theta = torch.stack([torch.stack([side * torch.where(flip < 0.5, -1.0, 1.0), zeros, (2 * shift_x - 1) * (1 - side)]),
                         torch.stack([zeros, side, (2 * shift_y - 1) * (1 - side)])]).permute(2, 0, 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    view = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    view = view * (1 + JITTER * (2 * brightness - 1)).view(n, 1, 1, 1)
    mean = view.mean(dim=(1, 2, 3), keepdim=True)
    return ((view - mean) * (1 + JITTER * (2 * contrast - 1)).view(n, 1, 1, 1) + mean).clamp(*PIXEL_RANGE)


def nt_xent(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent loss of the pairs ``(a[i], b[i])`` (Chen et al., 2020, eq. 1).

    Each of the 2N embeddings is classified, by cosine similarity / ``temperature``, against the
    other 2N - 1; its pair is the right answer. The loss is the mean cross-entropy over the 2N.
    """
    z = F.normalize(torch.cat([a, b]), dim=1)
    n = a.shape[0]
    similarity = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -torch.inf)
    pairs = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(similarity, pairs)


@dataclass(frozen=True)
class Contrastive:
    """The auxiliary contrastive task: ``weight`` * NT-Xent(trunk(augment(x)), trunk(x_adv))."""

    weight: float
    temperature: float

    def __call__(self, model: Conv4, adapted: Params, clean: Tensor, adv: Tensor,
                 gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """The logits of ``adv`` (what the robust term needs; computed once, from the same
        embeddings) and the weighted contrastive loss."""
        adv_features = model.trunk(adapted, adv)
        view = model.trunk(adapted, augment(clean, gen))
        return model.head(adapted, adv_features), self.weight * nt_xent(view, adv_features, self.temperature)


def attacked_logits(model: Conv4, adapted: Params, clean: Tensor, adv: Tensor, gen: torch.Generator,
                    contrastive: Contrastive | None) -> tuple[Tensor, Tensor | None]:
    """The adapted logits of ``adv`` and, with the contrastive task, its loss on (``clean``, ``adv``)."""
    if contrastive is None:
        return model(adapted, adv), None
    return contrastive(model, adapted, clean, adv, gen)


def plus(loss: Tensor, auxiliary: Tensor | None) -> Tensor:
    """``loss``, plus the auxiliary loss when there is one (nothing is added otherwise: the graph stays the same)."""
    return loss if auxiliary is None else loss + auxiliary


def adversarial_query_loss(
    model: Conv4, adapted: Params, query: Task, attack: LinfAttack, gen: torch.Generator, weight: float,
    contrastive: Contrastive | None = None,
) -> Tensor:
    """R-MAML-AT: clean query cross-entropy + ``weight`` * cross-entropy on attacked queries
    (+ the contrastive task on the queries and their attacked versions)."""
    x, y = query
    adv = attack(cross_entropy_of(partial(model, frozen(adapted)), y), x, gen)
    adv_logits, auxiliary = attacked_logits(model, adapted, x, adv, gen, contrastive)
    return plus(F.cross_entropy(model(adapted, x), y) + weight * F.cross_entropy(adv_logits, y), auxiliary)


def trades_loss(
    model: Conv4, adapted: Params, support: Task, query: Task, attack: LinfAttack, gen: torch.Generator, beta: float,
    unlabeled: Tensor | None = None, contrastive: Contrastive | None = None,
) -> Tensor:
    """R-MAML-TRADES: clean query cross-entropy + ``beta`` * KL(p(x) || p(x + delta)) on support,
    query and ``unlabeled`` images (+ the contrastive task on all of them).

    The KL needs no labels, so it regularises the support images as well, and unlabeled ones (as
    MetaAdv's ``MetaFT.py``: one batch, KL averaged over every image). The attack maximises the same
    KL against the natural prediction, starting from a random point of the ball (at delta = 0 the
    KL and its gradient vanish).
    """
    x = torch.cat([support[0], query[0]] + ([] if unlabeled is None else [unlabeled]))
    natural = F.log_softmax(model(adapted, x), dim=-1)
    target = natural.detach()
    kl_to = lambda xa: F.kl_div(F.log_softmax(model(frozen(adapted), xa), dim=-1), target, log_target=True,
                                reduction="batchmean")
    adv = attack(kl_to, x, gen)
    adv_logits, auxiliary = attacked_logits(model, adapted, x, adv, gen, contrastive)
    kl = F.kl_div(F.log_softmax(adv_logits, dim=-1), natural, log_target=True, reduction="batchmean")
    return plus(F.cross_entropy(model(adapted, query[0]), query[1]) + beta * kl, auxiliary)


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
class WithUnlabeled(Episodes):
    """Episodes that also carry unlabeled rows of their classes: ``[episodes, ways * per_class]``."""

    unlabeled: Tensor


@dataclass(frozen=True)
class RobustMaml(Maml):
    """MAML with a robust meta-loss; sampling and (clean) adaptation are MAML's.

    ``gen`` in ``train_step`` feeds the random starts of the training attacks (and the augmented
    views of the contrastive task). With ``unlabeled_per_class`` (R-MAML-TRADES only), ``sample``
    draws that many more images of each class of a task, and ``tasks`` appends them to its query
    images after the labelled ones (the query labels stay the labelled ones').
    """

    method: str
    attack: LinfAttack
    trades_beta: float
    at_weight: float
    unlabeled_per_class: int = 0
    contrastive: Contrastive | None = None

    def __post_init__(self) -> None:
        if self.method not in ROBUST_METHODS:
            raise ValueError(f"RobustMaml method must be one of {ROBUST_METHODS}, got {self.method!r}")
        if self.unlabeled_per_class and self.method != "rmaml-trades":
            raise ValueError(f"unlabeled images enter the TRADES KL only; '{self.method}' has no use for them")
        if self.contrastive is not None and self.method == "adml":
            raise ValueError("the contrastive task is an option of the R-MAML learners (rmaml-at, rmaml-trades)")

    def sample(self, pool: ClassPool, gen: torch.Generator) -> Episodes:
        if not self.unlabeled_per_class:
            return super().sample(pool, gen)
        cfg = self.cfg
        labelled = cfg.shots + cfg.queries
        # One draw of every class's examples; its first ``labelled`` are the ones drawn without the option.
        drawn = sample_episodes(pool, cfg.meta_batch, cfg.ways, cfg.shots, cfg.queries + self.unlabeled_per_class, gen)
        return WithUnlabeled(drawn.rows[..., :labelled], drawn.classes, drawn.shots, drawn.rows[..., labelled:].flatten(1))

    def tasks(self, episodes: Episodes, images: Tensor) -> tuple[Task, Task]:
        support, query = super().tasks(episodes, images)
        if not isinstance(episodes, WithUnlabeled):
            return support, query
        return support, (torch.cat([query[0], gather(images, episodes.unlabeled)], dim=1), query[1])

    def task_loss(self, params: Params, support: Task, query: Task, gen: torch.Generator) -> Tensor:
        inner = {"steps": self.cfg.inner_steps, "lr": self.cfg.inner_lr, "create_graph": not self.first_order}
        if self.method == "adml":
            return adml_loss(self.model, params, support, query, self.attack, gen, **inner)
        adapted = sgd_adapt(self.model, params, *support, **inner)
        if self.method == "rmaml-at":
            return adversarial_query_loss(self.model, adapted, query, self.attack, gen, self.at_weight, self.contrastive)
        images, labels = query
        unlabeled = images[len(labels):] if self.unlabeled_per_class else None
        return trades_loss(self.model, adapted, support, (images[: len(labels)], labels), self.attack, gen,
                           self.trades_beta, unlabeled, self.contrastive)

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
        contrastive = (Contrastive(robust.contrastive_weight, robust.contrastive_temperature)
                       if robust.contrastive_weight and method != "adml" else None)
        unlabeled = robust.unlabeled_per_class if method == "rmaml-trades" else 0
        return RobustMaml(model, meta, method, attack, robust.trades_beta, robust.at_weight, unlabeled, contrastive)

    factory.__doc__ = {"adml": "ADML (Yin et al., 2018): adversarial examples in both loops.",
                       "rmaml-at": "R-MAML-AT (Wang et al., 2021): adversarial query loss in the meta-update.",
                       "rmaml-trades": "R-MAML-TRADES (Wang et al., 2021): TRADES KL term in the meta-update."}[method]
    return factory


for _method in ROBUST_METHODS:
    LEARNERS.register(_method, robust=True)(_robust(_method))
