"""The matching-network defense ("Backdoor Attacks on Federated Meta-Learning", Sec. 4).

A benign user stops trusting the decision logic of the shared model: it keeps only the Conv4 trunk
as an embedding f_theta and classifies a query x by attention over a labelled support set S,

    a(x, x_i) = softmax_i( beta_l * cos(alpha_l * f(x), f(x_i)) )     (x_i of class l)
    P(l | x)  = sum_{i: y_i = l} a(x, x_i)

with gates 0 <= alpha_{l,j} <= 1 per class and feature and a scale beta_l per class. Classes are the
N ways of an episode (which class plays way l is random), so alpha and beta are N x F and N numbers.

Before fine-tuning, the trunk is pulled towards a fresh Glorot initialisation,
theta' = delta * theta_G + (1 - delta) * theta_glorot, to weaken what the attacker planted; then
alpha and beta are trained alone for a few iterations (theta' fixed), then everything jointly, on
episodes of the user's own examples. Nothing of this needs the server, so it also works when the
server only sees the sum of the updates (secure aggregation).

Everything here is a pure function of tensors and parameter dicts, like the meta-learners.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmeta.data.episodes import gather
from fedmeta.meta.adam import AdamState, adam_step_
from fedmeta.models.conv4 import Conv4, Params, glorot, trunk_params

GATES, SCALE = "match.gates", "match.scale"


def init_head(ways: int, features: int, scale: float) -> Params:
    """Gates fully open (plain cosine attention) and one scale per way."""
    return {GATES: torch.ones(ways, features), SCALE: torch.full((ways,), float(scale))}


def mix_with_glorot(params: Params, delta: float, gen: torch.Generator) -> Params:
    """theta' = delta * theta + (1 - delta) * theta_glorot over the trunk (the head is dropped).

    Convolution kernels mix with a Glorot-uniform draw; BatchNorm's scale and shift mix with their
    initial values (1 and 0), for which Glorot is not defined.
    """
    fresh = {
        k: glorot(tuple(v.shape), gen).to(v) if v.dim() > 1 else (torch.ones_like(v) if k.endswith("bn.weight") else torch.zeros_like(v))
        for k, v in trunk_params(params).items()
    }
    return {k: delta * v + (1.0 - delta) * fresh[k] for k, v in trunk_params(params).items()}


def attention_log_probs(head: Params, queries: Tensor, support: Tensor, labels: Tensor, ways: int) -> Tensor:
    """log P(l | x) ``[Q, ways]`` from query features ``[Q, F]`` and support features ``[S, F]``
    (or ``[Q, S, F]``: one set per query, as non-transductive embedding gives)."""
    gated = queries[:, None, :] * head[GATES][labels]  # [Q, S, F]: alpha of each support example's class
    scores = F.cosine_similarity(gated, support.expand_as(gated), dim=-1) * head[SCALE][labels]  # [Q, S]
    log_attention = scores.log_softmax(dim=-1)
    same_class = labels[None, :] == torch.arange(ways, device=labels.device)[:, None]  # [ways, S]
    masked = log_attention[:, None, :].masked_fill(~same_class, float("-inf"))  # [Q, ways, S]
    return masked.logsumexp(dim=-1)


def log_probs(model: Conv4, weights: Params, support: Tensor, labels: Tensor, inputs: Tensor, ways: int,
              transductive: bool) -> Tensor:
    """log P(l | x) for ``inputs``: embedded together with the support set (transductive), or each
    alone with it, so that no input sees another's batch statistics.

    Non-transductive, one batch per input (the trunk runs it channels-last), as
    ``meta.evaluation.logits_fn`` does: the former ``vmap`` over inputs held every input's activations
    at once (5.5 GB for 75 mini-ImageNet queries beside 25 support images, Conv4-32, against 0.3 GB)
    and was slower (4.4x at that size, 1.6x on Omniglot with Conv4-64; one thread, same scores to 3e-6)."""
    if transductive:
        features = model.trunk(weights, torch.cat([support, inputs]))
        return attention_log_probs(weights, features[len(support):], features[: len(support)], labels, ways)
    features = [model.trunk(weights, torch.cat([support, x[None]])) for x in inputs]
    query_features = torch.stack([f[-1] for f in features])
    support_features = torch.stack([f[:-1] for f in features])
    return attention_log_probs(weights, query_features, support_features, labels, ways)


def finetune(
    model: Conv4,
    weights: Params,
    images: Tensor,
    support_rows: Tensor,
    query_rows: Tensor,
    labels: tuple[Tensor, Tensor],
    *,
    ways: int,
    head_steps: int,
    train_head: bool,
    lr: float,
) -> Iterator[Params]:
    """Episodic training of the matching network; yields the weights after each step.

    ``support_rows`` ``[steps, episodes, S]`` and ``query_rows`` ``[steps, episodes, Q]`` are drawn
    up front; each step averages the query log-loss over its episodes. The first ``head_steps``
    steps train only alpha and beta; with ``train_head`` off they stay fixed throughout (ablation).
    Gates are projected back into [0, 1] after every step. The yielded dict is updated in place
    by the next step: copy it to keep it.
    """
    support_labels, query_labels = labels
    weights = {k: v.clone() for k, v in weights.items()}
    head = [GATES, SCALE] if train_head else []
    everything = head + [k for k in weights if k not in (GATES, SCALE)]
    first = (head, AdamState.zeros([weights[k] for k in head]))
    second = (everything, AdamState.zeros([weights[k] for k in everything]))
    for step in range(support_rows.shape[0]):
        names, state = first if step < head_steps else second
        if not names:  # nothing to train in this phase
            yield weights
            continue
        leaves = [weights[k].requires_grad_() for k in names]
        loss = sum(
            F.nll_loss(episode_log_probs(model, weights, images, s, q, support_labels, ways), query_labels)
            for s, q in zip(support_rows[step], query_rows[step])
        ) / support_rows.shape[1]
        grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            adam_step_(leaves, grads, state, lr=lr, beta1=0.9, beta2=0.999)
            weights[GATES].clamp_(0.0, 1.0)
        weights = {k: v.detach() for k, v in weights.items()}
        yield weights


def episode_log_probs(model: Conv4, weights: Params, images: Tensor, support: Tensor, query: Tensor, labels: Tensor,
                       ways: int) -> Tensor:
    """Training forward pass: support and queries in one batch, as matching networks train."""
    features = model.trunk(weights, gather(images, torch.cat([support, query])))
    return attention_log_probs(weights, features[len(support):], features[: len(support)], labels, ways)
