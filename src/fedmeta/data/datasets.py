"""From a ``[data]`` config to meta-training and meta-test class pools."""

from __future__ import annotations

from dataclasses import dataclass

from fedmeta.config import DataConfig
from fedmeta.data.idx import load_idx_dataset
from fedmeta.data.miniimagenet import load_miniimagenet
from fedmeta.data.omniglot import load_omniglot
from fedmeta.data.pool import ClassPool
from fedmeta.data.splits import seeded_omniglot_split, torchmeta_omniglot_split
from fedmeta.rng import stream


@dataclass(frozen=True)
class MetaSplits:
    """Disjoint class pools: meta-train, meta-validation (may be empty) and meta-test."""

    train: ClassPool
    val: ClassPool | None
    test: ClassPool

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape


def load_meta_splits(cfg: DataConfig, seed: int) -> MetaSplits:
    if cfg.dataset == "omniglot":
        data = load_omniglot(cfg.root)
        if cfg.omniglot_split == "seeded-1200":
            split = seeded_omniglot_split(stream(seed, "omniglot-split"))
        else:
            split = torchmeta_omniglot_split(data.root)
        val = data.pool(split["val"], rotations=False) if "val" in split else None
        return MetaSplits(data.pool(split["train"], cfg.rotations), val, data.pool(split["test"], rotations=False))
    if cfg.dataset == "miniimagenet":
        data = load_miniimagenet(cfg.root)
        return MetaSplits(data.pool(data.splits["train"]), data.pool(data.splits["val"]), data.pool(data.splits["test"]))
    # MNIST-like sets have 10 classes: tasks differ by examples, so meta-train draws from the
    # official train part and meta-test from t10k.
    return MetaSplits(load_idx_dataset(cfg.dataset, "train", cfg.root), None, load_idx_dataset(cfg.dataset, "t10k", cfg.root))
