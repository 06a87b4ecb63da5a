"""What the filtering rules share: which updates to keep, and the mean of those kept.

FLAME and FreqFed keep the majority cluster that HDBSCAN finds among the local models
G + delta_i (or among features of them); DnC keeps the updates with low outlier scores. All of them then average what
they kept with the weights alpha_i renormalised over it (with equal weights: the plain mean of
the kept updates, as the papers average them). A rule that keeps nothing logs it, and the round
leaves the model unchanged.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.cluster import HDBSCAN
from sklearn.metrics.pairwise import cosine_distances
from torch import Tensor

log = logging.getLogger(__name__)


def majority_cluster(features: np.ndarray) -> np.ndarray:
    """Which rows ``[n, k]`` lie in the majority cluster of HDBSCAN on their pairwise cosine
    distances (FLAME, Nguyen et al. 2022; FreqFed, Fereidooni et al. 2024): min_cluster_size =
    n // 2 + 1, so at most one cluster holds a majority; single clusters allowed; the others are noise.

    ``min_samples = 2`` here is the ``min_samples = 1`` of the ``hdbscan`` package that FLAME's and
    FreqFed's reference implementations call: scikit-learn counts the point itself among its
    neighbours and that package does not (scikit-learn's HDBSCAN documentation, Notes), so both
    give every point its nearest neighbour's distance as core distance. One update is kept as it is.

    What "majority cluster" means here: with min_cluster_size > n / 2 no two clusters can coexist,
    so HDBSCAN's single-cluster labelling decides (scikit-learn and ``hdbscan`` alike): a row is in
    the cluster if it is still there when the cluster, shrinking as the distance threshold falls,
    drops below min_cluster_size. The admitted rows are the densest majority; a benign update
    that is merely farther from the others than they are from each other is noise too.
    """
    n = len(features)
    if n == 1:
        return np.ones(1, dtype=bool)
    distances = cosine_distances(features.astype(np.float64)).clip(min=0.0)
    labels = HDBSCAN(metric="precomputed", min_cluster_size=n // 2 + 1, min_samples=2, allow_single_cluster=True,
                     copy=True).fit(distances).labels_
    clusters, sizes = np.unique(labels[labels >= 0], return_counts=True)
    if not len(clusters):
        return np.zeros(n, dtype=bool)
    return labels == clusters[sizes.argmax()]


def local_models(updates: Tensor, model: Tensor | None, rule: str) -> Tensor:
    """The local models W_i = G + delta_i ``[n, d]`` (float64) that FLAME and FreqFed cluster.

    Their cosine distances are not the updates': adding the common G changes every angle, and
    with ||G|| far above ||delta_i|| (about 20 against 0.2 in the quick presets) the cosine
    distance between two models is about half the squared Euclidean distance of their updates
    orthogonal to G over ||G||^2, so an update's size counts where the updates' cosines ignore it. ``model``: the flat
    global weights G, which the server passes to rules with ``sees_model``."""
    if model is None:
        raise ValueError(f"{rule} clusters the local models G + delta_i: call it with model= (the flat global "
                         "weights; fedmeta's server passes them)")
    return updates.double() + model.double()


def kept_mean(updates: Tensor, weights: Tensor, keep: Tensor, rule: str) -> Tensor:
    """The mean of the rows where ``keep`` (a bool mask) holds, weighted by ``weights``
    renormalised over them; zero (the model unchanged) when ``rule`` kept none, which is logged."""
    keep = torch.as_tensor(keep, dtype=torch.bool, device=updates.device)
    if not bool(keep.any()):
        log.warning("%s excluded every update of the round; the global model is unchanged", rule)
        return torch.zeros_like(updates[0])
    alpha = weights[keep]
    return (alpha / alpha.sum()) @ updates[keep]
