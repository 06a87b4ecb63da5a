"""FLTrust (Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via Trust
Bootstrapping", NDSS 2021).

The server holds a small clean root set and trains on it each round, like a client, from the
same global model: its update g_0 is the direction the server trusts. Algorithm 1 of the paper:

1. trust score TS_i = ReLU(cos(g_i, g_0)): an update pointing away from the root update gets 0;
2. each update is rescaled to the root update's norm: g_i * ||g_0|| / ||g_i|| (a boosted update
   gains nothing from its size);
3. g = sum_i TS_i * rescaled g_i / sum_j TS_j.

Here the trust scores multiply the weights alpha_i (with equal weights: the paper's formula). If
every score is 0 (or the root update is 0) the round is logged and leaves the model unchanged.

The root update comes from the server (``Server.reference``, registered here with
``reference=True``): ``scenario.builder.build_server`` gives the server its own benign client,
trained on ``root_classes`` classes x ``root_examples`` examples of benign meta-training data
(the paper's root set has 100 examples; the defaults are 10 x 10), and the server passes its
update to the rule as ``reference=``. Where that client's data come from is the builder's
business (see ``build_server``); the rule only compares updates. It needs every update on its
own, so it cannot run under secure aggregation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import PositiveInt
from torch import Tensor

from fedmeta.federation.aggregation import Options
from fedmeta.registry import RULES

log = logging.getLogger(__name__)


class RootOptions(Options):
    """The server's root set, for rules registered with ``reference=True`` (read by the builder)."""

    root_classes: PositiveInt = 10
    """Classes in the server's clean root set (drawn from the benign users' meta-training classes)."""
    root_examples: PositiveInt = 10
    """Examples of each root class."""


def trust_weights(updates: Tensor, reference: Tensor) -> Tensor:
    """FLTrust's trust scores ``[n]``: ReLU of each update's cosine similarity to ``reference``."""
    return torch.nn.functional.cosine_similarity(updates, reference[None, :], dim=1).clamp_min(0.0)


@dataclass(frozen=True)
class FLTrust:
    """FLTrust (Cao et al., 2021): updates rescaled to the server's root update and weighted by
    ReLU(cosine) with it."""

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator, users: Sequence[int] | None = None,
                 reference: Tensor | None = None) -> Tensor:
        if reference is None:
            raise ValueError("fltrust needs the server's root update (reference=); build the server with "
                             "fedmeta.scenario.builder.build_server, which gives it a reference client")
        trust = trust_weights(updates, reference) * weights
        if float(trust.sum()) == 0.0:
            log.warning("fltrust: no update has a positive cosine with the root update; the global model is unchanged")
            return torch.zeros_like(reference)
        rescaled = updates * (reference.norm() / updates.norm(dim=1, keepdim=True).clamp_min(torch.finfo(updates.dtype).tiny))
        return (trust / trust.sum()) @ rescaled


@RULES.register("fltrust", options=RootOptions, reference=True)
def fltrust(root_classes: int, root_examples: int) -> FLTrust:
    """FLTrust (Cao et al., 2021): trust = ReLU(cosine with the server's root update), each update
    rescaled to the root update's norm, the trust-weighted mean."""
    return FLTrust()
