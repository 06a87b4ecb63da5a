"""MNIST and Fashion-MNIST from their original idx ``.gz`` files (ink = 255)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from fedmeta.data.files import DataError, resolve_root, verified
from fedmeta.data.pool import ClassPool

FOLDERS = {"mnist": "mnist", "fashionmnist": "fashion-mnist"}
CLASS_NAMES = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashionmnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
}
_MAGIC = {3: 0x00000803, 1: 0x00000801}


def load_idx_dataset(name: str, part: str = "train", root: str | None = None) -> ClassPool:
    """The ``train`` (60,000) or ``t10k`` (10,000) part of ``mnist`` / ``fashionmnist``, by class."""
    base = resolve_root(root)
    prefix = f"{FOLDERS[name]}/{part}"
    images = read_idx(verified(base, f"{prefix}-images-idx3-ubyte.gz"), dims=3)
    labels = read_idx(verified(base, f"{prefix}-labels-idx1-ubyte.gz"), dims=1)
    if len(images) != len(labels):
        raise DataError(f"{prefix}: {len(images)} images but {len(labels)} labels")
    return ClassPool.from_labels(
        torch.from_numpy(images[..., None].copy()), torch.from_numpy(labels.astype(np.int64)), CLASS_NAMES[name]
    )


def read_idx(path: Path, dims: int) -> np.ndarray:
    """An idx array: big-endian magic, one uint32 per dimension, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw, dtype=">u4", count=1 + dims)
    if int(header[0]) != _MAGIC[dims]:
        raise DataError(f"{path}: magic number {int(header[0]):#010x}, expected {_MAGIC[dims]:#010x}")
    shape = tuple(int(d) for d in header[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + dims))
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)
