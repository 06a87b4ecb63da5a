"""N-way K-shot episodes as index tensors.

Sampling never touches pixels: it returns image rows (into ``ClassPool.images``) for many episodes
at once, drawn with an explicit ``torch.Generator``. Pixels are gathered only when a batch is
needed (``gather``), as one indexing op, and converted to float in the model's input layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedmeta.data.pool import ClassPool


@dataclass(frozen=True)
class Episodes:
    """``rows[e, w, k]``: image row of the k-th example of way ``w`` in episode ``e``.

    The first ``shots`` examples of each way are the support set, the rest the queries.
    The label of way ``w`` is ``w``; which class plays which way is random.
    """

    rows: Tensor  # int64 [episodes, ways, shots + queries]
    classes: Tensor  # int64 [episodes, ways], class ids in the sampled pool
    shots: int

    @property
    def ways(self) -> int:
        return self.rows.shape[1]

    @property
    def support(self) -> Tensor:
        """Support rows, flattened way-major: ``[episodes, ways * shots]``."""
        return self.rows[:, :, : self.shots].flatten(1)

    @property
    def query(self) -> Tensor:
        """Query rows, flattened way-major: ``[episodes, ways * queries]``."""
        return self.rows[:, :, self.shots :].flatten(1)

    def support_labels(self) -> Tensor:
        return way_labels(self.ways, self.shots)

    def query_labels(self) -> Tensor:
        return way_labels(self.ways, self.rows.shape[2] - self.shots)


def way_labels(ways: int, per_way: int) -> Tensor:
    """Labels of a way-major flattened episode: ``[0]*per_way + [1]*per_way + ...``."""
    return torch.arange(ways).repeat_interleave(per_way)


def sample_classes(num_classes: int, episodes: int, ways: int, gen: torch.Generator) -> Tensor:
    """``[episodes, ways]`` distinct class ids per episode, in random order."""
    if ways > num_classes:
        raise ValueError(f"cannot draw {ways} ways from {num_classes} classes")
    return torch.rand(episodes, num_classes, generator=gen).argsort(dim=1)[:, :ways]


def sample_examples(pool: ClassPool, classes: Tensor, per_class: int, gen: torch.Generator) -> Tensor:
    """Image rows of ``per_class`` distinct examples of each given class: ``[*classes.shape, per_class]``."""
    counts = pool.counts[classes]
    if bool((counts < per_class).any()):
        raise ValueError(f"a class has fewer than {per_class} examples")
    keys = torch.rand(*classes.shape, pool.index.shape[1], generator=gen)
    keys.masked_fill_(torch.arange(pool.index.shape[1]) >= counts[..., None], 2.0)  # padding sorts last
    positions = keys.argsort(dim=-1)[..., :per_class]
    return pool.index[classes[..., None], positions]


def sample_episodes(
    pool: ClassPool, episodes: int, ways: int, shots: int, queries: int, gen: torch.Generator
) -> Episodes:
    classes = sample_classes(pool.num_classes, episodes, ways, gen)
    rows = sample_examples(pool, classes, shots + queries, gen)
    return Episodes(rows, classes, shots)


def minibatch_order(examples: int, steps: int, batch: int, episodes: int, gen: torch.Generator) -> Tensor:
    """Positions ``[episodes, steps, batch]`` into each episode's examples for ``steps`` mini-batches.

    As in supervised-reptile, mini-batches walk through shuffled passes over the examples without
    replacement; a batch may straddle two passes.
    """
    passes = -(-steps * batch // examples)
    order = torch.rand(episodes, passes, examples, generator=gen).argsort(dim=-1).flatten(1)
    return order[:, : steps * batch].view(episodes, steps, batch)


def gather(images: Tensor, rows: Tensor) -> Tensor:
    """Float images ``[*rows.shape, C, H, W]`` in [0, 1], channels-last in memory.

    Channels-last is what the CPU convolution kernels (oneDNN) run fastest on, and lets cuDNN use
    its NHWC kernels on GPUs. ``movedim`` is a view, so every ``[batch, C, H, W]`` slice keeps
    NHWC strides without a copy.
    """
    return images[rows].float().div_(255.0).movedim(-1, -3)
