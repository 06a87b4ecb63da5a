"""DP-SGD on the gradient a MAML task learner shares, with its epsilon from Opacus's RDP accountant.

The Gaussian mechanism of DP-SGD (Abadi et al., "Deep Learning with Differential Privacy",
CCS 2016), applied where paper 001's task learner releases its meta-gradient: the meta-loss is a
mean of terms, each term's gradient is clipped to L2 norm ``clip`` (C), the clipped gradients are
summed, Gaussian noise N(0, (sigma C)^2 I) is added and the sum is divided by the number of terms:

    g~ = (sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / n,    clip_C(v) = v * min(1, C / ||v||).

``unit`` says what a term is, hence what the guarantee protects:

- ``example``: one term per query example, g_i = d l(theta(omega; D_s); x_i, y_i) / d omega,
  as in DP-SGD. It bounds each query example's influence by C. A support example enters every
  term through the adapted weights theta, so it moves all n terms.
- ``task``: one term, the whole task's meta-gradient (user-level clipping, as in DP-FedAvg,
  McMahan et al., ICLR 2018). It bounds the influence of the whole task.

Which epsilon: the accountant is Opacus's ``RDPAccountant`` (Renyi DP of the Gaussian
mechanism, Mironov 2017, converted to (epsilon, delta)), a term released once per round without
subsampling (sample rate 1), ``releases`` times in all. ``epsilon`` is Opacus's convention,
add/remove one clipped term (sensitivity C). The membership game replaces one example by another
in a slot of a task whose number of terms is fixed, and two clipped terms differ by up to 2C:
``epsilon_substitution`` (noise multiplier sigma / 2) is the guarantee for that, for a task
(``task``) or a query example (``example``); a support example under ``example`` moves all n
terms (sensitivity 2nC), a group the logged values do not cover. Sigma = 1, delta = 1e-5, one
release: 4.73 and 10.73.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fedmeta.defenses.noise import gaussian_like
from fedmeta.meta.maml import MetaGradient
from fedmeta.models.conv4 import Params

Unit = Literal["example", "task"]


@dataclass(frozen=True)
class DpSgd:
    noise_multiplier: float  # sigma: noise std in units of the clipping norm
    clip: float  # C
    unit: Unit = "example"

    kind = "dp"

    @property
    def scale(self) -> float:
        """The sweep's axis, as for the noise defenses."""
        return self.noise_multiplier


def clip_to(grads: Params, bound: float) -> Params:
    """``grads`` scaled to L2 norm at most ``bound`` (all tensors as one vector)."""
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
    factor = (bound / norm.clamp_min(1e-12)).clamp(max=1.0)
    return {k: g * factor for k, g in grads.items()}


def terms(meta_gradient: MetaGradient, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor], unit: Unit
          ) -> list[Params]:
    """The gradients of the meta-loss's terms whose mean is the task's meta-gradient."""
    if unit == "task":
        return [meta_gradient(support, query)]
    return [meta_gradient(support, (query[0][i : i + 1], query[1][i : i + 1])) for i in range(len(query[1]))]


def private_gradient(
    meta_gradient: MetaGradient,
    support: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor],
    dp: DpSgd,
    gen: torch.Generator,
) -> Params:
    """What a DP-SGD task learner shares for one task (see the module docstring)."""
    clipped = [clip_to(g, dp.clip) for g in terms(meta_gradient, support, query, dp.unit)]
    total = {k: torch.stack([g[k] for g in clipped]).sum(0) for k in clipped[0]}
    return {k: (v + gaussian_like(v, dp.noise_multiplier * dp.clip, gen)) / len(clipped) for k, v in total.items()}


def epsilon(noise_multiplier: float, *, releases: int, delta: float, sensitivity: float = 1.0) -> float:
    """epsilon at ``delta`` of ``releases`` Gaussian releases of noise multiplier sigma (sample rate
    1) whose neighbouring inputs move the clipped sum by ``sensitivity`` x C (1: add/remove a term,
    Opacus's convention; 2: replace one)."""
    from opacus.accountants import RDPAccountant  # imports Opacus's training engine too: only when asked

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier / sensitivity, 1.0, releases)]
    return float(accountant.get_epsilon(delta))
