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


def sample_classes(
    num_classes: int, episodes: int, ways: int, gen: torch.Generator, include: Tensor | None = None
) -> Tensor:
    """``[episodes, ways]`` distinct class ids per episode, in random order.

    Classes in ``include`` (``[k]``: the same in every episode, e.g. the backdoor target;
    ``[episodes, k]``: per episode) always take part; the other ways are drawn from the
    remaining classes, and every way's position is random.
    """
    include = torch.empty(0, dtype=torch.long) if include is None else torch.as_tensor(include, dtype=torch.long)
    if ways > num_classes or include.shape[-1] > ways:
        raise ValueError(f"cannot draw {ways} ways from {num_classes} classes including {include.tolist()}")
    keys = torch.rand(episodes, num_classes, generator=gen)
    if not include.numel():
        return keys.argsort(dim=1)[:, :ways]
    keys.scatter_(1, include.expand(episodes, -1), -1.0)  # sort first, so they are always drawn...
    chosen = keys.argsort(dim=1)[:, :ways]
    return chosen.gather(1, torch.rand(episodes, ways, generator=gen).argsort(dim=1))  # ...at random ways


def sample_examples(
    pool: ClassPool,
    classes: Tensor,
    per_class: int,
    gen: torch.Generator,
    lo: Tensor | None = None,
    hi: Tensor | None = None,
) -> Tensor:
    """Image rows of ``per_class`` distinct examples of each class: ``[*classes.shape, per_class]``.

    Examples come from positions ``lo[c] <= k < hi[c]`` of each class's row (default: all of
    them); held-out evaluation keeps support and query candidates apart this way.
    """
    lo = torch.zeros_like(pool.counts) if lo is None else lo
    hi = pool.counts if hi is None else hi
    lo, hi = lo[classes], hi[classes]
    if bool((hi - lo < per_class).any()):
        raise ValueError(f"a class has fewer than {per_class} examples to draw from")
    keys = torch.rand(*classes.shape, pool.index.shape[1], generator=gen)
    positions = torch.arange(pool.index.shape[1])
    keys.masked_fill_((positions < lo[..., None]) | (positions >= hi[..., None]), 2.0)  # outside sorts last
    chosen = keys.argsort(dim=-1)[..., :per_class]
    return pool.index[classes[..., None], chosen]


def sample_episodes(
    pool: ClassPool,
    episodes: int,
    ways: int,
    shots: int,
    queries: int,
    gen: torch.Generator,
    include: Tensor | None = None,
    split: Tensor | None = None,
) -> Episodes:
    """Episodes of ``pool``; with ``split``, support examples come from positions below
    ``split[c]`` of each class and queries from the positions at and above it."""
    classes = sample_classes(pool.num_classes, episodes, ways, gen, include)
    if split is None:
        rows = sample_examples(pool, classes, shots + queries, gen)
    else:
        support = sample_examples(pool, classes, shots, gen, hi=split)
        rows = torch.cat([support, sample_examples(pool, classes, queries, gen, lo=split)], dim=-1)
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
