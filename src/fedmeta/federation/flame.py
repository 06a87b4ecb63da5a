"""FLAME (Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022).

A backdoor update points elsewhere than the benign ones (clustering finds it), and one that hides
among them must stay small to do so (clipping bounds it), and what little is left of it is
drowned by noise. Algorithm 1 of the paper, on the round's n updates delta_i from the global
model G:

1. c_ij = 1 - cos(W_i, W_j) between the local models W_i = G + delta_i; HDBSCAN on c with
   min_cluster_size = n // 2 + 1 (allowing a single cluster): the updates of the majority cluster
   are admitted, the others (noise) are not;
2. S = median of ||delta_i|| over *all* n updates (the paper's e_i, the distance of each local model
   to the global one);
3. each admitted update is clipped to S: delta_i * min(1, S / ||delta_i||), and the clipped
   updates are averaged (with the weights alpha_i renormalised over them: the paper's plain mean
   when weights are equal);
4. Gaussian noise of standard deviation lambda * S is added to every coordinate (lambda = 0.001
   for image classification in the paper, 0.01 for word prediction).

Differences, and why:

- Clustering the updates instead of the models is not the same (``subsets.local_models``): it
  ignores how large an update is, and a boosted one can join the benign cluster. That variant,
  fedmeta's FLAME until 2026-12-06, remains as ``cluster = "updates"``, an ablation.
- FLPoison (``aggregators/flame.py``) and BackFed (``flame_server.py``) scale the noise of each
  layer by the standard deviation of that layer's weights (lambda * S * std(W_layer)); the paper,
  and this rule, use lambda * S for every coordinate. FLPoison admits the cluster labelled 0 and
  BackFed the largest one, falling back to all clients when HDBSCAN finds no cluster; here the
  largest is admitted, and a round with no cluster (every update noise) is logged and leaves the
  model unchanged. BackFed (commit a00c07d) clusters the *global* model's last two layers, the
  same vector for every client: a bug there, not a variant to copy.
- HDBSCAN is scikit-learn's (``fedmeta.federation.subsets.majority_cluster``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from fedmeta.federation.aggregation import Options
from fedmeta.federation.subsets import kept_mean, local_models, majority_cluster
from fedmeta.registry import RULES


class FlameOptions(Options):
    noise: float = Field(0.001, ge=0.0, le=1.0)
    """lambda: the noise std in units of the median update norm S (the paper: 0.001 for images)."""
    cluster: Literal["models", "updates"] = "models"
    """What HDBSCAN clusters: the local models G + delta_i (the paper), or the updates alone (an ablation)."""


@RULES.register("flame", options=FlameOptions)
@dataclass(frozen=True)
class Flame:
    """FLAME (Nguyen et al., 2022): HDBSCAN on the local models' cosine distances keeps the
    majority cluster, clipped to the median norm, averaged, plus Gaussian noise of std lambda x
    median norm."""

    noise: float = 0.001
    cluster: str = "models"
    sees_model: ClassVar[bool] = True

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator, users: Sequence[int] | None = None,
                 model: Tensor | None = None) -> Tensor:
        points = local_models(updates, model, "flame") if self.cluster == "models" else updates.double()
        admitted = majority_cluster(points.cpu().numpy())
        norms = updates.norm(dim=1, keepdim=True)
        bound = torch.quantile(norms, 0.5)  # the median; for even n the mean of the two middle norms
        clipped = updates * torch.where(norms > bound, bound / norms, 1.0)
        mean = kept_mean(clipped, weights, torch.from_numpy(admitted), "flame")
        if not admitted.any():
            return mean
        return mean + self.noise * bound * torch.randn(mean.shape, generator=gen).to(mean.device)
