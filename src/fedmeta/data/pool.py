"""Images grouped by class: what every episode sampler draws from.

A ``ClassPool`` keeps all images as one uint8 tensor ``[rows, H, W, C]`` in memory and describes
each class by the row indices of its examples. Subsets of classes (a user's partition, the
meta-test classes) and subsets of examples (held-out validation images) are new index tables over
the *same* image tensor, so partitioning never copies pixels and episodes are index tensors until
the moment a batch is gathered.

Classes may have different numbers of examples (e.g. backdoor classes with 10 benign examples next
to meta-training classes with 15); the table is padded with ``-1`` and ``counts`` says how many
entries of each row are real.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ClassPool:
    images: Tensor  # uint8 [rows, H, W, C]
    index: Tensor  # int64 [classes, max_per_class], rows into ``images``; -1 pads
    counts: Tensor  # int64 [classes]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError("images must be a uint8 tensor [rows, H, W, C]")
        if self.index.shape[0] != len(self.names) or self.counts.shape[0] != len(self.names):
            raise ValueError("index, counts and names must describe the same classes")

    @classmethod
    def from_class_major(cls, images: Tensor, names: Sequence[str]) -> ClassPool:
        """A pool from a uint8 tensor ``[classes, per_class, H, W, C]`` (every class full)."""
        n_classes, per_class = images.shape[:2]
        index = torch.arange(n_classes * per_class).view(n_classes, per_class)
        return cls(images.reshape(-1, *images.shape[2:]), index, torch.full((n_classes,), per_class), tuple(names))

    @classmethod
    def from_labels(cls, images: Tensor, labels: Tensor, names: Sequence[str]) -> ClassPool:
        """A pool from flat images and integer labels ``0..len(names)-1`` (ragged classes)."""
        rows = [torch.nonzero(labels == c).flatten() for c in range(len(names))]
        return cls(images, _pad(rows), torch.tensor([len(r) for r in rows]), tuple(names))

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device) -> ClassPool:
        """The pool with its images on ``device`` (index tables stay on the CPU, where sampling runs)."""
        return ClassPool(self.images.to(device), self.index, self.counts, self.names)

    def rows_of(self, c: int) -> Tensor:
        """The image rows of class ``c``."""
        return self.index[c, : int(self.counts[c])]

    def classes(self, which: Tensor | Sequence[int]) -> ClassPool:
        """The pool restricted to some classes, in the given order."""
        which = torch.as_tensor(which, dtype=torch.long)
        names = tuple(self.names[i] for i in which.tolist())
        counts = self.counts[which]
        width = int(counts.max()) if len(which) else 0
        return ClassPool(self.images, self.index[which, :width], counts, names)

    def examples(self, which: Tensor) -> ClassPool:
        """Keep, for every class, the examples at positions ``which``.

        ``which`` is either ``[k]`` (the same positions in every class) or ``[classes, k]``
        (positions per class, e.g. from a seeded per-class permutation). Positions must be
        below each class's count.
        """
        which = torch.as_tensor(which, dtype=torch.long)
        if which.dim() == 1:
            which = which.expand(self.num_classes, -1)
        if bool((which >= self.counts[:, None]).any()):
            raise ValueError("example position beyond a class's number of examples")
        index = self.index.gather(1, which)
        return ClassPool(self.images, index, torch.full((self.num_classes,), which.shape[1]), self.names)

    def examples_at(self, positions: Sequence[Tensor]) -> ClassPool:
        """Keep, for class ``c``, the examples at ``positions[c]`` (any number per class)."""
        rows = [self.rows_of(c)[torch.as_tensor(p, dtype=torch.long)] for c, p in enumerate(positions)]
        return ClassPool(self.images, _pad(rows), torch.tensor([len(r) for r in rows]), self.names)

    def rebase(self, images: Tensor) -> ClassPool:
        """The same classes over a larger image store that begins with this pool's images."""
        if images.shape[1:] != self.images.shape[1:] or len(images) < len(self.images):
            raise ValueError("the new store must extend the current one")
        return ClassPool(images, self.index, self.counts, self.names)

    def merge(self, other: ClassPool) -> ClassPool:
        """All classes of both pools (the images are concatenated when they differ)."""
        if other.images is self.images:
            images, offset = self.images, 0
        else:
            images, offset = torch.cat([self.images, other.images]), self.images.shape[0]
        rows = [self.rows_of(c) for c in range(self.num_classes)]
        rows += [other.rows_of(c) + offset for c in range(other.num_classes)]
        counts = torch.cat([self.counts, other.counts])
        return ClassPool(images, _pad(rows), counts, self.names + other.names)


def _pad(rows: list[Tensor]) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    index = torch.full((len(rows), width), -1, dtype=torch.long)
    for c, r in enumerate(rows):
        index[c, : len(r)] = r
    return index
