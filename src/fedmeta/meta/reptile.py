"""Reptile (Nichol et al., 2018), as in openai/supervised-reptile.

One outer step: for each of B episodes, start from theta and take e Adam steps (beta1 = 0) on
mini-batches of the episode's N*K examples, giving theta_j; then
theta <- theta + epsilon * (mean_j theta_j - theta).

Adam's moments carry over between episodes and outer steps (supervised-reptile keeps one optimiser
for the whole run). ``carry="sequential"`` passes them from one episode of the meta-batch to the
next, exactly like the reference; ``carry="parallel"`` starts every episode of the meta-batch from
the same moments and averages them afterwards, which is what lets the B episodes run at once as
one ``torch.func.vmap`` computation (``reptile_step_batched``, for GPUs; on a 2-core CPU it is
about 2x slower than the loop). The loop and ``vmap`` paths give the same parameters (tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from fedmeta.meta.adam import AdamState, adam_step_
from fedmeta.models.conv4 import Conv4, Params

Carry = Literal["sequential", "parallel"]


def reptile_step(
    model: Conv4,
    params: Params,
    adam: AdamState,
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    beta2: float,
    epsilon: float,
    carry: Carry = "sequential",
) -> tuple[Params, AdamState, Tensor]:
    """One outer step over episodes ``x[j, s]`` (mini-batch ``s`` of episode ``j``), ``y`` alike.

    ``x`` is ``[B, e, b, C, H, W]``, ``y`` is ``[B, e, b]``. Returns the new parameters, the
    carried Adam state and the mean training loss (a tensor: no host sync here).
    """
    names = list(params)
    start = [params[k].detach() for k in names]

    def episode(j: int, state: AdamState) -> tuple[list[Tensor], AdamState, Tensor]:
        weights = [p.clone().requires_grad_() for p in start]
        loss_sum = torch.zeros((), device=x.device)
        for s in range(x.shape[1]):
            loss = F.cross_entropy(model(dict(zip(names, weights)), x[j, s]), y[j, s])
            grads = torch.autograd.grad(loss, weights)
            with torch.no_grad():
                adam_step_(weights, grads, state, lr=lr, beta1=0.0, beta2=beta2)
            loss_sum += loss.detach()
        return [w.detach() for w in weights], state, loss_sum

    results = [episode(j, adam if carry == "sequential" else adam.clone()) for j in range(x.shape[0])]
    if carry == "parallel":
        adam = AdamState.mean([state for _, state, _ in results])
    total = [torch.stack(ws).sum(0) for ws in zip(*(weights for weights, _, _ in results))]
    loss = torch.stack([loss for _, _, loss in results]).sum() / (x.shape[0] * x.shape[1])
    return _interpolate(names, start, total, x.shape[0], epsilon), adam, loss


def reptile_step_batched(
    model: Conv4,
    params: Params,
    adam: AdamState,
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    beta2: float,
    epsilon: float,
) -> tuple[Params, AdamState, Tensor]:
    """``reptile_step`` with ``carry="parallel"``, all B episodes at once through ``vmap``: the
    one-user case of ``reptile_step_users``."""
    one = {k: v[None] for k, v in params.items()}
    new, state, loss = reptile_step_users(model, one, adam.expand(1), x[None], y[None], lr=lr, beta2=beta2,
                                          epsilon=epsilon, carry="parallel")
    state = AdamState([t[0] for t in state.exp_avg], [t[0] for t in state.exp_avg_sq], state.step)
    return {k: v[0] for k, v in new.items()}, state, loss[0]


def reptile_step_users(
    model: Conv4,
    params: Params,
    adam: AdamState,
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    beta2: float,
    epsilon: float,
    carry: Carry = "sequential",
) -> tuple[Params, AdamState, Tensor]:
    """``reptile_step`` of U users at once: every tensor has a leading user dimension.

    ``params`` and ``adam`` are stacked ``[U, ...]`` (each user's own weights and moments), ``x`` is
    ``[U, B, e, b, C, H, W]``, ``y`` ``[U, B, e, b]``; returns the users' new parameters and
    states, stacked, and their mean losses ``[U]``. One ``vmap`` over users (and, with
    ``carry="parallel"``, over their episodes too) replaces U x B launches of every kernel by one:
    what a launch-bound GPU needs. ``carry="sequential"`` keeps the reference's moments passing
    from episode to episode, as the loop does."""
    names = list(params)
    users, batch, steps = x.shape[:3]
    flat = carry == "parallel"  # users x episodes in one vmapped dimension

    def loss_fn(p: Params, xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
        loss = F.cross_entropy(model(p, xb), yb)
        return loss, loss.detach()

    grad_fn = vmap(grad(loss_fn, has_aux=True))
    start = {k: params[k].detach() for k in names}
    spread = lambda t: t.repeat_interleave(batch, dim=0) if flat else t  # noqa: E731  [U, ...] -> [U*B, ...]
    state = AdamState([spread(t) for t in adam.exp_avg], [spread(t) for t in adam.exp_avg_sq],
                      [t.clone() for t in adam.step])
    total = {k: torch.zeros_like(start[k]) for k in names}
    loss_sum = torch.zeros(users, device=x.device)
    for j in [None] if flat else range(batch):
        weights = {k: spread(start[k]).clone() for k in names}
        xj, yj = (x.flatten(0, 1), y.flatten(0, 1)) if flat else (x[:, j], y[:, j])
        for s in range(steps):
            grads, losses = grad_fn(weights, xj[:, s], yj[:, s])
            adam_step_([weights[k] for k in names], [grads[k] for k in names], state, lr=lr, beta1=0.0, beta2=beta2)
            loss_sum += losses.view(users, -1).sum(1)
        for k in names:
            total[k] += weights[k].view(users, -1, *start[k].shape[1:]).sum(1)
    if flat:
        per_user = lambda t: t.view(users, batch, *t.shape[1:]).mean(1)  # noqa: E731
        state = AdamState([per_user(t) for t in state.exp_avg], [per_user(t) for t in state.exp_avg_sq], state.step)
    new = {k: p + epsilon * (total[k] / batch - p) for k, p in start.items()}
    return new, state, loss_sum / (batch * steps)


def _interpolate(names: list[str], start: list[Tensor], total: list[Tensor], count: int, epsilon: float) -> Params:
    """theta + epsilon * (total / count - theta)."""
    return {k: p + epsilon * (t / count - p) for k, p, t in zip(names, start, total)}


def adam_finetune(
    model: Conv4,
    params: Params,
    x: Tensor,
    y: Tensor,
    order: Tensor,
    *,
    lr: float,
    beta2: float,
) -> Iterator[Params]:
    """Fine-tune a copy of ``params`` on one support set with fresh Adam (beta1 = 0).

    ``order`` is ``[steps, batch]``, positions into ``x``/``y`` for each mini-batch. This is
    Reptile's adaptation at meta-test time; the moments start from zero for every episode.
    Yields the weights after every step (views of the live weights: use each before the next),
    so a caller can follow accuracy along the way or keep only the last. ``order`` goes to the
    device of ``x`` once, not at every step (a no-op when the caller moved it already).
    """
    names = list(params)
    order = order.to(x.device)
    weights = [params[k].detach().clone().requires_grad_() for k in names]
    state = AdamState.zeros(weights)
    for idx in order:
        loss = F.cross_entropy(model(dict(zip(names, weights)), x[idx]), y[idx])
        grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            adam_step_(weights, grads, state, lr=lr, beta1=0.0, beta2=beta2)
        yield {k: w.detach() for k, w in zip(names, weights)}
