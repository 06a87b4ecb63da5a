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
the top-left triangle of coefficients, i + j <= floor(P / 2). ``transform = "layers"`` does that:
each parameter tensor, as the server flattens it, is read as a matrix of its first dimension P by
the rest (a convolution kernel [out, in, k, k] as out x in*k*k, a bias or BatchNorm vector as a
column, whose 2-D DCT is its 1-D one), transformed with SciPy's ``dctn`` (``norm="ortho"``), and
its coefficients with i + j <= floor(low * P) are concatenated over the layers. The default
``transform = "flat"``, what fedmeta's FreqFed did before the layer shapes reached the rules and
what the threat matrix measured, applies the 1-D DCT-II to each whole flattened local model and
keeps its first ``floor(low * d) + 1`` coefficients (with ``low = 0.5``, indices k <= floor(d / 2):
about half of them, where the triangle keeps about an eighth of a square layer's, and the
transform runs across layer boundaries). The DCT is linear, but the cosines of the models'
spectra are not those of the updates' (``subsets.local_models``); transforming the updates alone,
fedmeta's FreqFed until 2026-12-06, remains as ``cluster = "updates"``, an ablation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from scipy.fft import dct, dctn
from torch import Tensor

from fedmeta.federation.aggregation import Options
from fedmeta.federation.subsets import kept_mean, local_models, majority_cluster
from fedmeta.federation.updates import layer_slices
from fedmeta.registry import RULES


class FreqFedOptions(Options):
    low: float = Field(0.5, gt=0.0, le=1.0)
    """How far up the frequencies go: flat, indices k <= low * d (0.5: half); per layer, i + j <= low * P."""
    cluster: Literal["models", "updates"] = "models"
    """Whose spectra HDBSCAN clusters: the local models G + delta_i (the paper), or the updates alone (an ablation)."""
    transform: Literal["flat", "layers"] = "flat"
    """``layers``: the paper's 2-D DCT of each layer, its triangle i + j <= floor(low * P) kept;
    ``flat``: the 1-D DCT of the whole flattened model, its first floor(low * d) + 1 coefficients."""


def low_frequencies(updates: Tensor, low: float) -> Tensor:
    """The first ``floor(low * d) + 1`` (at most d) DCT-II coefficients of each row ``[n, d]``, float64."""
    spectrum = dct(updates.double().cpu().numpy(), type=2, norm="ortho", axis=1)
    keep = min(updates.shape[1], int(low * updates.shape[1]) + 1)
    return torch.from_numpy(spectrum[:, :keep])


def layer_low_frequencies(rows: Tensor, shapes: Sequence[tuple[int, ...]], low: float) -> Tensor:
    """The low-frequency triangles of every layer of each row ``[n, d]``, concatenated, float64:
    a layer of shape ``(P, ...)`` is read as a P x (numel / P) matrix (a scalar as 1 x 1), and its
    orthonormal 2-D DCT-II coefficients (i, j) with i + j <= floor(low * P) are kept."""
    slices = layer_slices(shapes)
    if slices[-1].stop != rows.shape[1]:
        raise ValueError(f"the layer shapes {list(shapes)} do not add up to the updates' {rows.shape[1]} coordinates")
    flat, kept = rows.double().cpu().numpy(), []
    for shape, part in zip(shapes, slices, strict=True):
        p = shape[0] if shape else 1
        spectrum = dctn(flat[:, part].reshape(len(flat), p, -1), type=2, norm="ortho", axes=(1, 2))
        i, j = np.indices(spectrum.shape[1:])
        kept.append(spectrum[:, i + j <= int(low * p)])
    return torch.from_numpy(np.concatenate(kept, axis=1))


@RULES.register("freqfed", options=FreqFedOptions)
@dataclass(frozen=True)
class FreqFed:
    """FreqFed (Fereidooni et al., 2024): HDBSCAN on cosine distances of the low-frequency DCT
    components of the local models; the majority cluster's updates are averaged."""

    low: float = 0.5
    cluster: str = "models"
    transform: str = "flat"
    sees_model: ClassVar[bool] = True
    sees_shapes: ClassVar[bool] = True

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator, users: Sequence[int] | None = None,
                 model: Tensor | None = None, shapes: Sequence[tuple[int, ...]] | None = None) -> Tensor:
        points = local_models(updates, model, "freqfed") if self.cluster == "models" else updates
        if self.transform == "flat":
            features = low_frequencies(points, self.low)
        elif shapes is None:
            raise ValueError("freqfed with transform = 'layers' needs the layer shapes: call it with shapes= "
                             "(fedmeta's server passes them)")
        else:
            features = layer_low_frequencies(points, shapes, self.low)
        kept = majority_cluster(features.numpy())
        return kept_mean(updates, weights, torch.from_numpy(kept), "freqfed")
