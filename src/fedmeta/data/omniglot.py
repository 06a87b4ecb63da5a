"""Omniglot: 1623 handwritten characters x 20 drawers, as 28x28 gray images with ink = 1.

The two npz files (``images_background``, ``images_evaluation``) are concatenated into 1623
characters, inverted (the files store white = True) and resized 105 -> 28 with PIL's LANCZOS filter
on 8-bit gray images. (Resizing the original 1-bit PNGs, as Finn's ``resize_images.py`` does,
silently falls back to nearest-neighbour in PIL; we resize gray images so LANCZOS really applies.)
Rotations by 90, 180 and 270 degrees become extra classes, for meta-training characters only.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fedmeta.data.files import DataError, cached_array, expected_checksums, resolve_root, verified
from fedmeta.data.pool import ClassPool

NPZ_FILES = ("omniglot/images_background.npz", "omniglot/images_evaluation.npz")
CHARACTERS_CSV = "omniglot/characters.csv"
SIZE = 28
ROTATIONS = (0, 90, 180, 270)


@dataclass(frozen=True)
class Omniglot:
    images: Tensor  # uint8 [1623, 20, 28, 28, 1], ink = 255
    names: tuple[str, ...]  # "Alphabet/characterNN", by global character index
    root: Path

    def pool(self, characters: Tensor, rotations: bool) -> ClassPool:
        """The characters as classes; with ``rotations`` each character gives 4 classes."""
        chars = self.images[characters]
        names = [self.names[i] for i in characters.tolist()]
        if not rotations:
            return ClassPool.from_class_major(chars, names)
        turned = torch.stack([torch.rot90(chars, k, dims=(2, 3)) for k in range(4)], dim=1)
        turned_names = [f"{n}/rot{deg}" for n in names for deg in ROTATIONS]
        return ClassPool.from_class_major(turned.flatten(0, 1), turned_names)


def load_omniglot(root: str | None = None) -> Omniglot:
    """All 1623 characters, decoded once and then read from the cache."""
    base = resolve_root(root)
    paths = [verified(base, name) for name in NPZ_FILES]
    key = [expected_checksums()[n] for n in NPZ_FILES] + [f"lanczos-{SIZE}-ink255"]
    images = cached_array(key, lambda: _decode(paths), "omniglot")
    return Omniglot(torch.from_numpy(images), _character_names(base), base)


def _decode(paths: list[Path]) -> np.ndarray:
    parts = []
    for path in paths:
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz.files:
                raise DataError(f"{path} has no 'images' array (expected bool [C, 20, 105, 105])")
            parts.append(npz["images"])
    white = np.concatenate(parts)  # bool, True = background
    ink = np.where(white, 0, 255).astype(np.uint8)
    out = np.empty((*ink.shape[:2], SIZE, SIZE, 1), dtype=np.uint8)
    for c in range(ink.shape[0]):
        for k in range(ink.shape[1]):
            img = Image.fromarray(ink[c, k], mode="L").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
            out[c, k, :, :, 0] = np.asarray(img)
    return out


def _character_names(base: Path) -> tuple[str, ...]:
    with verified(base, CHARACTERS_CSV).open(newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["char_id"]))
    return tuple(f"{r['alphabet']}/{r['character']}" for r in rows)
