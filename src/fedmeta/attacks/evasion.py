"""Test-time evasion: L-infinity FGSM and PGD on batches of images, and accuracy under attack.

An attack only sees a *loss closure* (adversarial inputs -> scalar loss to maximise), so the same
code attacks a plain classifier, a model with adapted fast weights inside a meta-learner's
training loss, a TRADES KL term, or a non-transductive classifier that runs every query with the
support set. Adversarial examples are always detached: in adversarial training the perturbation
is the solution of the inner maximisation and is treated as a constant (Danskin's theorem).

Every attack is projected gradient ascent on the sign of the input gradient: PGD is ``steps`` such
steps from a random start in the epsilon-ball (Madry et al., 2018); FGSM is one step of size
epsilon from the clean input (Goodfellow et al., 2015); FGSM-RS is one step of 1.25 epsilon from a
random start (Wong et al., 2020, "fast adversarial training"), which R-MAML uses during training.
After every step the perturbation is projected back onto the epsilon-ball and the image onto the
valid pixel range [0, 1], so an adversarial example is always a valid image near the clean one.

Accuracy under attack is the worst case over the clean input and the attacked one (both are in the
epsilon-ball): a query counts as robust only if both are classified correctly, so robust accuracy
never exceeds standard accuracy, even when a random start happens to fix a wrong prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmeta.config import EvalConfig
from fedmeta.data.episodes import Episodes, gather, sample_episodes
from fedmeta.data.pool import ClassPool
from fedmeta.meta.evaluation import Accuracy, EpisodeScore, evaluate_episodes, logits_fn
from fedmeta.meta.learner import MetaLearner
from fedmeta.models.conv4 import Params

LossFn = Callable[[Tensor], Tensor]
"""Adversarial inputs -> the scalar loss the attacker maximises (e.g. a cross-entropy)."""

PIXEL_RANGE = (0.0, 1.0)


def pixels(levels: float) -> float:
    """A radius or step given in 8-bit pixel levels (8 -> 8/255) in the [0, 1] image range."""
    return levels / 255.0


@dataclass(frozen=True)
class LinfAttack:
    """Sign-gradient ascent in an L-infinity ball; every length is in [0, 1] image units."""

    epsilon: float
    step: float
    steps: int
    random_start: bool
    restarts: int = 1
    """Independent random starts; a query counts as robust only if it withstands every one."""

    @classmethod
    def pgd(cls, epsilon: float, step: float, steps: int, restarts: int = 1) -> LinfAttack:
        return cls(epsilon, step, steps, random_start=True, restarts=restarts)

    @classmethod
    def fgsm(cls, epsilon: float) -> LinfAttack:
        return cls(epsilon, epsilon, 1, random_start=False)

    @classmethod
    def fgsm_rs(cls, epsilon: float, step_factor: float = 1.25) -> LinfAttack:
        return cls(epsilon, step_factor * epsilon, 1, random_start=True)

    def __call__(self, loss_fn: LossFn, x: Tensor, gen: torch.Generator) -> Tensor:
        """One run of the attack (one random start); ``restarts`` are taken by the scorer."""
        return pgd(loss_fn, x, epsilon=self.epsilon, step=self.step, steps=self.steps,
                   random_start=self.random_start, gen=gen)


def pgd(
    loss_fn: LossFn,
    x: Tensor,
    *,
    epsilon: float,
    step: float,
    steps: int,
    random_start: bool,
    gen: torch.Generator,
) -> Tensor:
    """``steps`` projected sign-gradient ascent steps on ``loss_fn`` from ``x`` (detached result).

    The random start is uniform in the epsilon-ball and drawn from ``gen`` (a CPU generator, so
    the same seed gives the same attack on any device). With ``steps = 0`` there is no attack:
    the clean input comes back, so a sweep over steps starts at the clean accuracy.
    """
    x = x.detach()
    if steps == 0:
        return x
    adv = x
    if random_start:
        noise = torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        adv = project(x + (2 * noise - 1) * epsilon, x, epsilon)
    for _ in range(steps):
        adv = adv.clone().requires_grad_()
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss_fn(adv), adv)
        adv = project(adv.detach() + step * grad.sign(), x, epsilon)
    return adv


def project(adv: Tensor, x: Tensor, epsilon: float) -> Tensor:
    """``adv`` moved into the epsilon-ball around ``x``, then into the pixel range."""
    return (x + (adv - x).clamp(-epsilon, epsilon)).clamp(*PIXEL_RANGE)


def cross_entropy_of(logits: Callable[[Tensor], Tensor], labels: Tensor) -> LossFn:
    """The untargeted attack objective: cross-entropy of the classifier against the true labels."""
    return lambda x: F.cross_entropy(logits(x), labels)


def attacked_query_accuracy(
    learner: MetaLearner,
    images: Tensor,
    episodes: Episodes,
    attacks: Mapping[str, LinfAttack],
    transductive: bool,
    gens: Mapping[str, torch.Generator],
) -> EpisodeScore:
    """Scores each adapted episode by its clean query accuracy and its accuracy under each attack.

    The attacks target the adapted weights through the same classifier that is evaluated (one
    batch of all queries when transductive; each query with the support set otherwise), so BatchNorm
    statistics are the ones the attacked prediction really uses. Returns ``standard`` and one entry
    per attack name, each the worst case over the clean input and every restart of the attack, per
    query (as restarts are counted for per-example classifiers; with a transductive batch the
    restarts' worst cases may come from different batches, which only makes the attack stronger).
    Each attack draws its random starts from ``gens[name]``, so adding an attack leaves the others'
    numbers unchanged when it has its own generator.
    """
    labels = episodes.query_labels().to(images.device)

    def score(adapted: Params, support: Tensor, i: int) -> dict[str, Tensor]:
        queries = gather(images, episodes.query[i])
        logits = logits_fn(learner.model, adapted, support, transductive)
        correct = lambda x: logits(x).argmax(-1) == labels  # noqa: E731
        with torch.no_grad():
            clean = correct(queries)
        out = {"standard": clean.float().mean()}
        loss = cross_entropy_of(logits, labels)
        for name, attack in attacks.items():
            robust = clean
            for _ in range(attack.restarts):
                adv = attack(loss, queries, gens[name])
                with torch.no_grad():
                    robust = robust & correct(adv)
            out[name] = robust.float().mean()
        return out

    return score


def robust_meta_test(
    learner: MetaLearner,
    params: Params,
    pool: ClassPool,
    cfg: EvalConfig,
    attacks: Mapping[str, LinfAttack],
    *,
    shots: int,
    episodes: int,
    lr: float,
    gen: torch.Generator,
    attack_gens: Mapping[str, torch.Generator],
    desc: str | None = None,
) -> dict[str, Accuracy]:
    """Standard accuracy and accuracy under each attack on fresh meta-test episodes of ``pool``.

    Fine-tuning is the learner's own adaptation on the *clean* support set (``cfg.steps`` steps),
    as in R-MAML's evaluation: the attacker strikes at test time, after adaptation.
    """
    sampled = sample_episodes(pool, episodes, cfg.ways, shots, cfg.queries, gen)
    score = attacked_query_accuracy(learner, pool.images, sampled, attacks, cfg.transductive, attack_gens)
    return evaluate_episodes(
        learner, params, pool.images, sampled, steps=cfg.steps, batch=cfg.batch, lr=lr, gen=gen, score=score, desc=desc
    )
