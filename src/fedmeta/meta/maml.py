"""MAML (Finn et al., 2017): second order, or first order (FOMAML).

A task's contribution is the gradient, with respect to the meta-parameters omega, of the query loss
of the weights adapted on the support set by a few SGD steps. Second order keeps the inner steps in
the graph (``create_graph=True``); first order treats the inner gradients as constants, so the
meta-gradient is the query gradient at the adapted weights.

``task_meta_gradient`` is what a federated MAML task learner would share with a server; the
membership-inference attack differentiates through it again (``create_graph=True``), which is
why it is a pure function of tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmeta.meta.adam import AdamState, adam_step_
from fedmeta.models.conv4 import Params
from fedmeta.models.protocol import Model

Perturb = Callable[[list[Tensor]], list[Tensor]]
"""Maps the inner gradients of one step to those actually stepped on (e.g. a noise defense)."""

MetaGradient = Callable[..., Params]
"""``(support, query, *, create_graph=False, perturb=None) -> g``: ``task_meta_gradient`` with
the model, weights and protocol fixed (a ``functools.partial``), i.e. one task learner."""

Task = tuple[Tensor, Tensor]
"""(images ``[S, C, H, W]``, labels ``[S]``) of one support or query set."""

TaskLoss = Callable[[Params, Task, Task], Tensor]
"""(meta-parameters, support, query) -> the task's meta-loss, differentiable in the meta-parameters."""


def sgd_adapt(
    model: Model,
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float,
    create_graph: bool,
    perturb: Perturb | None = None,
) -> Params:
    """``steps`` full-batch SGD steps from ``params`` on (x, y).

    With ``create_graph`` the result stays differentiable with respect to ``params`` (and ``x``)
    through the inner gradients (second-order MAML); without it the inner gradients are constants.
    """
    for _ in range(steps):
        loss = F.cross_entropy(model(params, x), y)
        grads = list(torch.autograd.grad(loss, list(params.values()), create_graph=create_graph))
        if perturb is not None:
            grads = perturb(grads)
        params = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
    return params


def task_meta_loss(
    model: Model,
    params: Params,
    support: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor],
    *,
    steps: int,
    lr: float,
    first_order: bool,
) -> Tensor:
    """Query loss of the weights adapted on the support set (differentiable in ``params``)."""
    adapted = sgd_adapt(model, params, *support, steps=steps, lr=lr, create_graph=not first_order)
    return F.cross_entropy(model(adapted, query[0]), query[1])


def task_meta_gradient(
    model: Model,
    params: Params,
    support: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor],
    *,
    steps: int,
    lr: float,
    first_order: bool = False,
    create_graph: bool = False,
    perturb: Perturb | None = None,
) -> Params:
    """d(query loss after adaptation) / d(params) for one task.

    First order, this is the query gradient at the adapted weights. It still depends on the
    support images through those weights, so with ``create_graph`` the inner loop keeps its graph
    either way: an attacker can then differentiate the shared gradient with respect to any image.
    """
    leaves = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
    adapted = sgd_adapt(
        model, leaves, *support, steps=steps, lr=lr, create_graph=create_graph or not first_order, perturb=perturb
    )
    loss = F.cross_entropy(model(adapted, query[0]), query[1])
    wrt = adapted if first_order else leaves
    grads = torch.autograd.grad(loss, list(wrt.values()), create_graph=create_graph)
    return dict(zip(leaves, grads))


def meta_update(
    params: Params, adam: AdamState, task_loss: TaskLoss, support: Task, query: Task, *, meta_lr: float
) -> tuple[Params, AdamState, Tensor]:
    """One outer Adam step on the mean ``task_loss`` of the tasks ``support[0][t]``, ``query[0][t]``, ...

    ``support`` is (x ``[T, S, C, H, W]``, y ``[T, S]``), ``query`` likewise. The meta-loss is a
    parameter so that variants of MAML (e.g. robust meta-losses) share this outer loop.
    """
    names = list(params)
    leaves = [params[k].detach().clone().requires_grad_() for k in names]
    tasks = support[0].shape[0]
    total = torch.zeros((), device=support[0].device)
    for t in range(tasks):
        loss = task_loss(dict(zip(names, leaves)), (support[0][t], support[1][t]), (query[0][t], query[1][t]))
        (loss / tasks).backward()  # frees each task's graph before the next
        total += loss.detach()
    with torch.no_grad():
        adam_step_(leaves, [p.grad for p in leaves], adam, lr=meta_lr, beta1=0.9, beta2=0.999)
    return {k: p.detach() for k, p in zip(names, leaves)}, adam, total / tasks


def maml_step(
    model: Model,
    params: Params,
    adam: AdamState,
    support: Task,
    query: Task,
    *,
    inner_steps: int,
    inner_lr: float,
    meta_lr: float,
    first_order: bool,
) -> tuple[Params, AdamState, Tensor]:
    """One MAML meta-update (see ``meta_update`` for the shapes)."""
    task_loss = partial(task_meta_loss, model, steps=inner_steps, lr=inner_lr, first_order=first_order)
    return meta_update(params, adam, task_loss, support, query, meta_lr=meta_lr)
