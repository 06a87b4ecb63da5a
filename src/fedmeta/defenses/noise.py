"""The four noise-injection defenses of a MAML task learner (paper 001), and the gradient it shares.

Each defense adds fresh Gaussian noise, for every task, at one place of the task learner's
computation; the server never sees the noise. With ``s`` the defense's scale:

- ``gradient``: g + N(0, (s * rms(g))^2 I), output perturbation of the shared meta-gradient;
- ``support``:  X_s + N(0, s^2 I), the learner adapts on noisy support images (pixel units);
- ``query``:    X_q + N(0, s^2 I), the query loss is taken on noisy query images (pixel units);
- ``inner``:    theta <- theta - alpha * (grad L_s(theta) + xi), xi ~ N(0, (s * rms(grad L_s))^2 I),
  fresh at every inner step; xi is a constant of the graph, so g stays a second-order gradient.

The two gradient scales are relative to the root mean square coordinate of the gradient being
noised (all tensors together), so a scale means the same at any stage of training and for any
model; ``s = 1`` puts as much noise into every coordinate as a typical coordinate carries signal.
Images are not clipped back to [0, 1]: clipping would bias the noise towards the image's mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fedmeta.meta.maml import MetaGradient, Perturb
from fedmeta.models.conv4 import Params

DefenseKind = Literal["gradient", "support", "query", "inner"]
DEFENSES: tuple[DefenseKind, ...] = ("gradient", "support", "query", "inner")

@dataclass(frozen=True)
class Noise:
    kind: DefenseKind
    scale: float


def gaussian_like(x: Tensor, std: float | Tensor, gen: torch.Generator) -> Tensor:
    """N(0, std^2) noise shaped like ``x`` (drawn on the CPU from ``gen``, then moved)."""
    return (torch.randn(x.shape, generator=gen) * std).to(x.device, x.dtype)


def rms(tensors: list[Tensor]) -> Tensor:
    """Root mean square over all coordinates of ``tensors`` (detached: it only sets a scale)."""
    total = sum(t.detach().pow(2).sum() for t in tensors)
    return (total / sum(t.numel() for t in tensors)).sqrt()


def relative_noise(tensors: list[Tensor], scale: float, gen: torch.Generator) -> list[Tensor]:
    """``tensors`` plus Gaussian noise of ``scale`` times their RMS coordinate."""
    std = scale * rms(tensors).cpu()
    return [t + gaussian_like(t, std, gen) for t in tensors]


def inner_noise(scale: float, gen: torch.Generator) -> Perturb:
    """The inner-loop defense as a ``Perturb`` hook of ``sgd_adapt``."""
    return lambda grads: relative_noise(grads, scale, gen)


def shared_gradient(
    meta_gradient: MetaGradient,
    support: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor],
    noise: Noise | None,
    gen: torch.Generator,
) -> Params:
    """What a task learner sends the server for one task: its meta-gradient, under ``noise``."""
    if noise is None or noise.scale == 0:
        return meta_gradient(support, query)
    kind, scale = noise.kind, noise.scale
    if kind == "support":
        support = (support[0] + gaussian_like(support[0], scale, gen), support[1])
    if kind == "query":
        query = (query[0] + gaussian_like(query[0], scale, gen), query[1])
    g = meta_gradient(support, query, perturb=inner_noise(scale, gen) if kind == "inner" else None)
    if kind == "gradient":
        g = dict(zip(g, relative_noise(list(g.values()), scale, gen)))
    return g
