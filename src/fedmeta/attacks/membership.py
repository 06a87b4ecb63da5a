"""Membership inference on federated MAML by gradient inversion from a prior (paper 001).

A MAML task learner shares g = d L_q(theta(omega; D_s); D_q) / d omega. The honest-but-curious
server holds a target image x* and asks whether x* is in the learner's support set (support
attack) or query set (query attack). Following the paper (Figs. 2-4), it runs a
gradient-matching reconstruction of one slot of that set *started from x\\** and compares what
comes out with what went in: a member already reproduces the shared gradient, so it barely
moves; a non-member is pulled towards the example that is really there.

What the server knows decides what it can predict (``fedmeta.experiments.membership`` names
the threat models): the informed server (Balle et al.'s informed adversary, an upper bound on
leakage) knows omega, the protocol, the task-relative labels and every example of the task except
the attacked slot, so without a defense the gradient predicted at a member x* equals the shared
gradient exactly and x* is a global minimiser of the matching loss; a realistic server fills the
slots it does not know with public data; under aggregation it knows the number k of tasks summed
and estimates the others' mean (``expected_observation``). No server sees a defense's noise.

Scores (higher means "member"):

- ``l0-cos``, ``l0-l2``: minus the matching loss at x* before any iteration (one meta-gradient);
  the strongest simple test here, reported beside the paper's rules so that a defense is not
  judged only against a weak rule. Under Gaussian noise on g the L2 residual is the likelihood
  ratio statistic, so both distances are kept.
- ``lt``: minus the matching loss after the inversion;
- ``distance``: minus ||x_T - x*||_2, the paper's "the output is similar to the input";
- ``class``: 1 if a reference classifier gives x_T the class of x*, else 0: the paper's rule.

Metrics with bootstrap intervals: ``fedmeta.attacks.mia_metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmeta.data.episodes import gather
from fedmeta.data.pool import ClassPool
from fedmeta.meta.adam import AdamState, adam_step_
from fedmeta.meta.maml import MetaGradient
from fedmeta.models.conv4 import Params
from fedmeta.models.protocol import Model

Target = Literal["support", "query"]
Distance = Literal["cos", "l2"]
ZERO_SCORES = ("l0-cos", "l0-l2")
INVERSION_SCORES = ("lt", "distance", "class")

Predictor = Callable[[Tensor, bool], Params]
"""``(candidate image, create_graph) -> the observation the server expects if it is a member``."""


def place(
    support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor], target: Target, slot: int, x: Tensor
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The task with image ``x`` in position ``slot`` of its support or query set."""
    images, labels = support if target == "support" else query
    replaced = (torch.cat([images[:slot], x[None], images[slot + 1 :]]), labels)
    return (replaced, query) if target == "support" else (support, replaced)


def expected_observation(
    meta_gradient: MetaGradient,
    support: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor],
    target: Target,
    slot: int,
    *,
    k: int = 1,
    others: Params | None = None,
) -> Predictor:
    """What the server expects to observe if a candidate fills the slot.

    With k > 1 the server sees the mean of k tasks' gradients (secure aggregation); it replaces
    the k - 1 unknown ones by ``others``, the mean gradient of tasks it simulates with its own data.
    """

    def predict(x: Tensor, create_graph: bool) -> Params:
        g = meta_gradient(*place(support, query, target, slot, x), create_graph=create_graph)
        if k == 1:
            return g
        assert others is not None, "aggregation needs the expected gradient of the other tasks"
        return {name: (g[name] + (k - 1) * others[name]) / k for name in g}

    return predict


def gradient_distance(a: Params, b: Params, kind: Distance) -> Tensor:
    """``cos``: 1 - cosine of the two gradients as single vectors (Inverting Gradients' 'sim');
    ``l2``: squared Euclidean distance (DLG)."""
    if kind == "l2":
        return sum(((a[k] - b[k]) ** 2).sum() for k in a)
    dot = sum((a[k] * b[k]).sum() for k in a)
    norms = sum(a[k].pow(2).sum() for k in a).sqrt() * sum(b[k].pow(2).sum() for k in b).sqrt()
    return 1 - dot / norms.clamp_min(1e-30)


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation with means, as in Inverting Gradients."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


@dataclass(frozen=True)
class Inversion:
    start: Tensor  # x*, the prior
    end: Tensor  # x_T, the reconstruction
    loss_start: float
    loss_end: float


def step_decay(optimiser: torch.optim.Optimizer, iterations: int) -> torch.optim.lr_scheduler.MultiStepLR:
    """Inverting Gradients' schedule (``MultiStepLR`` at 3/8, 5/8 and 7/8 of ``iterations``, x0.1)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimiser, [iterations * m // 8 for m in (3, 5, 7)], gamma=0.1)


def invert(
    predict: Predictor,
    observed: Params,
    prior: Tensor,
    *,
    iterations: int,
    lr: float,
    distance: Distance,
    tv: float = 0.0,
    signed: bool = False,
) -> Inversion:
    """Gradient matching on one image started from ``prior``, kept in the [0, 1] box.

    Adam with Inverting Gradients' step decay (x0.1 at 3/8, 5/8 and 7/8 of the iterations). The
    decay matters here: at an exact minimiser the matching gradient is round-off, and Adam
    rescales round-off to full-size steps, so a member random-walks away from x* at a rate the
    decay keeps small. ``signed`` steps on the sign of the gradient (Inverting Gradients' choice).
    """
    x = prior.detach().clone().requires_grad_()
    optimiser = torch.optim.Adam([x], lr=lr)
    decay = step_decay(optimiser, iterations)
    first = None  # the loss at the prior, kept as a tensor: no host sync inside the loop
    for _ in range(iterations):
        loss = gradient_distance(predict(x, True), observed, distance)
        first = loss.detach() if first is None else first
        objective = loss + tv * total_variation(x) if tv else loss
        (grad,) = torch.autograd.grad(objective, [x])
        x.grad = grad.sign() if signed else grad
        optimiser.step()
        decay.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
    end = x.detach()
    final = float(gradient_distance(predict(end, False), observed, distance))
    return Inversion(prior.detach(), end, final if first is None else float(first), final)


def zero_scores(predict: Predictor, observed: Params, prior: Tensor) -> dict[str, float]:
    """The matching losses at the prior itself, negated (no optimisation)."""
    expected = predict(prior, False)
    return {f"l0-{kind}": -float(gradient_distance(expected, observed, kind)) for kind in ("cos", "l2")}


def inversion_scores(inversion: Inversion, classify: Callable[[Tensor], Tensor]) -> dict[str, float]:
    """The scores read off a reconstruction (``classify``: images -> predicted dataset classes)."""
    classes = classify(torch.stack([inversion.start, inversion.end]))
    return {
        "lt": -inversion.loss_end,
        "distance": -float((inversion.end - inversion.start).norm()),
        "class": float(classes[0] == classes[1]),
    }


def fit_classifier(model: Model, pool: ClassPool, *, steps: int, batch: int, lr: float, gen: torch.Generator) -> Params:
    """The server's reference classifier over the dataset's classes, for the class rule.

    The paper compares "input and output classes" without saying with what classifier; this one
    is trained by Adam on ``pool``, the server's own data (the train split, disjoint from every
    attacked task and candidate).
    """
    rows = torch.cat([pool.rows_of(c) for c in range(pool.num_classes)])
    labels = torch.arange(pool.num_classes).repeat_interleave(pool.counts)
    params = {k: v.to(pool.images.device).requires_grad_() for k, v in model.init(gen).items()}
    state = AdamState.zeros(list(params.values()))
    for _ in range(steps):
        pick = torch.randint(len(rows), (batch,), generator=gen)
        x = gather(pool.images, rows[pick])
        loss = F.cross_entropy(model(params, x), labels[pick].to(x.device))
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            adam_step_(list(params.values()), grads, state, lr=lr, beta1=0.9, beta2=0.999)
    return {k: v.detach() for k, v in params.items()}
