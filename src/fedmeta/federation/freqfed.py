"""FreqFed (Fereidooni et al., "FreqFed: A Frequency Analysis-Based Approach for Mitigating
Poisoning Attacks in Federated Learning", NDSS 2024).

The energy of a model's weights concentrates in the low frequencies of their discrete cosine
transform, and poisoned updates differ from benign ones there. Per round:

1. V_i = DCT-II of the local model W_i = G + delta_i (SciPy's ``scipy.fft.dct``, ``norm="ortho"``);
2. F_i = its low-frequency components;
3. c_ij = 1 - cos(F_i, F_j); HDBSCAN with min_cluster_size = n // 2 + 1 (a single cluster allowed,
   as in FLAME): the cluster with the most members is kept;
4. the kept updates are averaged (FedAvg over the cluster: the weights alpha_i renormalised).
   No clipping and no noise.

Per layer or flattened: the paper transforms each weight matrix (P x Q) with a 2-D DCT and keeps
the top-left triangle of coefficients, i + j <= floor(P / 2). A rule here receives the updates
flattened, without layer shapes, so it applies the 1-D DCT-II to each whole flattened local model
(the update, with ``cluster = "updates"``) and
keeps its first ``floor(low * d) + 1`` coefficients (with ``low = 0.5``, indices k <= floor(d / 2):
the triangle's rule applied to one axis). The DCT is linear, but the cosines of the models'
spectra are not those of the updates' (``subsets.local_models``); transforming the updates alone,
fedmeta's FreqFed until 2026-12-06, remains as ``cluster = "updates"``, an ablation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field
from scipy.fft import dct
from torch import Tensor

from fedmeta.federation.aggregation import Options
from fedmeta.federation.subsets import kept_mean, local_models, majority_cluster
from fedmeta.registry import RULES


class FreqFedOptions(Options):
    low: float = Field(0.5, gt=0.0, le=1.0)
    """Fraction of the DCT coefficients kept, from the lowest frequency up (0.5: indices <= d / 2)."""
    cluster: Literal["models", "updates"] = "models"
    """Whose spectra HDBSCAN clusters: the local models G + delta_i (the paper), or the updates alone (an ablation)."""


def low_frequencies(updates: Tensor, low: float) -> Tensor:
    """The first ``floor(low * d) + 1`` (at most d) DCT-II coefficients of each row ``[n, d]``, float64."""
    spectrum = dct(updates.double().cpu().numpy(), type=2, norm="ortho", axis=1)
    keep = min(updates.shape[1], int(low * updates.shape[1]) + 1)
    return torch.from_numpy(spectrum[:, :keep])


@RULES.register("freqfed", options=FreqFedOptions)
@dataclass(frozen=True)
class FreqFed:
    """FreqFed (Fereidooni et al., 2024): HDBSCAN on cosine distances of the low-frequency DCT
    components of the local models; the majority cluster's updates are averaged."""

    low: float = 0.5
    cluster: str = "models"
    sees_model: ClassVar[bool] = True

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator, users: Sequence[int] | None = None,
                 model: Tensor | None = None) -> Tensor:
        points = local_models(updates, model, "freqfed") if self.cluster == "models" else updates
        kept = majority_cluster(low_frequencies(points, self.low).numpy())
        return kept_mean(updates, weights, torch.from_numpy(kept), "freqfed")
