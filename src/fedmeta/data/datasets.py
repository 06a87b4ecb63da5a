"""Registered datasets: from a ``[data]`` config to class pools.

A dataset (``DATASETS.register(name)`` on a class with no constructor arguments) gives

- ``meta_splits(cfg, seed)``: disjoint meta-training, meta-validation (may be ``None``) and
  meta-test classes (centralised training, robustness, membership, federated R-MAML);
- ``reserve(cfg, seed, count)``: the layout of the backdoor experiments: meta-training classes
  (with the group each belongs to: a group goes to one user whole), meta-test classes, and
  ``count`` reserved classes outside both (the backdoor classes, then the target): drawn per seed,
  or those ``cfg.reserved_classes`` names (``named``), taken out of the split that held them.

A dataset that cannot host the backdoor experiments leaves ``reserve`` out. ``sizes(cfg)`` (without
loading anything) gives the class and example counts a config is checked against before any work
starts (``fedmeta.config.limits``); a dataset without it is checked when it is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedmeta.config.sections import DataConfig
from fedmeta.data.files import DataError
from fedmeta.data.idx import load_idx_dataset
from fedmeta.data.miniimagenet import load_miniimagenet
from fedmeta.data.omniglot import load_omniglot
from fedmeta.data.pool import ClassPool
from fedmeta.data.splits import seeded_omniglot_split, torchmeta_omniglot_split
from fedmeta.registry import DATASETS
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


@dataclass(frozen=True)
class Reserved:
    """Meta-training, meta-test and reserved classes over one image store."""

    train: ClassPool
    groups: Tensor  # the group of each training class; a group goes to one user whole
    test: ClassPool
    reserved: ClassPool  # the backdoor classes, then the target

    def rebase(self, images: Tensor) -> Reserved:
        return Reserved(self.train.rebase(images), self.groups, self.test.rebase(images), self.reserved.rebase(images))


@dataclass(frozen=True)
class Sizes:
    """What a dataset holds, for checking a config against it before loading it."""

    image_shape: tuple[int, int, int]
    train_classes: int  # meta-training classes (rotations included)
    test_classes: int  # meta-test classes
    train_examples: int  # examples of the smallest meta-training class
    test_examples: int  # ... of the smallest meta-test class
    groups: int = 0  # backdoor layout: groups of training classes (each goes whole to one user); 0: no backdoor layout
    group_size: int = 1  # classes per group
    reservable: int = 0  # classes the backdoor layout can reserve
    reserve_from_test: bool = False  # reserved classes are taken out of the meta-test classes
    reserved_examples: int = 0  # examples of a reservable class


def load_meta_splits(cfg: DataConfig, seed: int) -> MetaSplits:
    return DATASETS.get(cfg.dataset).factory().meta_splits(cfg, seed)


def reserve(cfg: DataConfig, seed: int, count: int) -> Reserved:
    dataset = DATASETS.get(cfg.dataset).factory()
    if not hasattr(dataset, "reserve"):
        raise ValueError(f"the backdoor experiments need classes to reserve; data.dataset = '{cfg.dataset}' has none "
                         f"(use one of {', '.join(n for n in DATASETS.names() if hasattr(DATASETS.get(n).factory, 'reserve'))})")
    return dataset.reserve(cfg, seed, count)


def named(names: Sequence[str], wanted: list[str], count: int, dataset: str) -> Tensor:
    """The indices of the classes ``wanted`` names (``data.reserved_classes``), in its order."""
    index = {name: i for i, name in enumerate(names)}
    unknown = [w for w in wanted if w not in index]
    if unknown:
        raise DataError(f"data.reserved_classes: {dataset} has no class {unknown[0]!r} (e.g. {names[0]!r})")
    if len(wanted) != count:
        raise DataError(f"data.reserved_classes: {len(wanted)} names; the backdoor classes and the target need {count}")
    return torch.tensor([index[w] for w in wanted])


def without(classes: Tensor, chosen: Tensor) -> Tensor:
    """``classes`` less ``chosen``, in order."""
    return classes[~torch.isin(classes, chosen)]


@DATASETS.register("omniglot")
class OmniglotData:
    """Omniglot: 1623 handwritten characters x 20, 28x28 gray, rotations as extra training classes."""

    def meta_splits(self, cfg: DataConfig, seed: int) -> MetaSplits:
        data = load_omniglot(cfg.root)
        if cfg.omniglot_split == "seeded-1200":
            split = seeded_omniglot_split(stream(seed, "omniglot-split"))
        else:
            split = torchmeta_omniglot_split(data.root)
        val = data.pool(split["val"], rotations=False) if "val" in split else None
        return MetaSplits(data.pool(split["train"], cfg.rotations), val, data.pool(split["test"], rotations=False))

    def reserve(self, cfg: DataConfig, seed: int, count: int) -> Reserved:
        """1200 training characters (a group: one character and its rotations); the reserved
        classes are drawn from the 423 others, the rest of which are the meta-test classes (named
        ones: taken out of whichever of the two held them)."""
        gen = stream(seed, "reserve")
        data = load_omniglot(cfg.root)
        split = seeded_omniglot_split(stream(seed, "omniglot-split"))
        spare, characters = split["test"][torch.randperm(len(split["test"]), generator=gen)], split["train"]
        if cfg.reserved_classes:
            chosen = named(data.names, cfg.reserved_classes, count, "omniglot")
            characters, spare = without(characters, chosen), torch.cat([chosen, without(spare, chosen)])
        train = data.pool(characters, rotations=cfg.rotations)
        pool = train.merge(data.pool(spare, rotations=False))
        n = train.num_classes
        groups = torch.arange(n) // (4 if cfg.rotations else 1)
        return Reserved(pool.classes(torch.arange(n)), groups, pool.classes(torch.arange(n + count, pool.num_classes)),
                        pool.classes(torch.arange(n, n + count)))

    @staticmethod
    def sizes(cfg: DataConfig) -> Sizes:
        train, test = (1200, 423) if cfg.omniglot_split == "seeded-1200" else (1028, 423)
        turns = 4 if cfg.rotations else 1
        groups = 1200 - len(cfg.reserved_classes)  # named reserved characters may come out of meta-training
        return Sizes((28, 28, 1), train * turns, test, 20, 20, groups=groups, group_size=turns, reservable=423,
                     reserve_from_test=True, reserved_examples=20)


@DATASETS.register("miniimagenet")
class MiniImageNetData:
    """mini-ImageNet: Ravi & Larochelle's 64/16/20 classes x 600 images, 84x84 RGB."""

    def meta_splits(self, cfg: DataConfig, seed: int) -> MetaSplits:
        data = load_miniimagenet(cfg.root)
        return MetaSplits(data.pool(data.splits["train"]), data.pool(data.splits["val"]), data.pool(data.splits["test"]))

    def reserve(self, cfg: DataConfig, seed: int, count: int) -> Reserved:
        """The 64 training classes (each its own group); the reserved classes come from the 16
        validation classes, the 20 test classes are the meta-test classes (named ones: taken out of
        whichever split held them)."""
        gen = stream(seed, "reserve")
        data = load_miniimagenet(cfg.root)
        pool = ClassPool.from_class_major(data.images, data.names)
        val = data.splits["val"][torch.randperm(len(data.splits["val"]), generator=gen)]
        train, test, reserved = data.splits["train"], data.splits["test"], val[:count]
        if cfg.reserved_classes:
            reserved = named(data.names, cfg.reserved_classes, count, "miniimagenet")
            train, test = without(train, reserved), without(test, reserved)
        return Reserved(pool.classes(train), train.clone(), pool.classes(test), pool.classes(reserved))

    @staticmethod
    def sizes(cfg: DataConfig) -> Sizes:
        # named reserved classes may come out of meta-training or meta-test: checked as if from both
        train, test = 64 - len(cfg.reserved_classes), 20 - len(cfg.reserved_classes)
        return Sizes((84, 84, 3), train, test, 600, 600, groups=train, reservable=16, reserved_examples=600)


class _IdxData:
    """MNIST-like sets have 10 classes: tasks differ by examples, so meta-training draws from the
    official train part and meta-test from t10k."""

    name = ""
    smallest = (0, 0)  # examples of the rarest class in train and in t10k

    def meta_splits(self, cfg: DataConfig, seed: int) -> MetaSplits:
        return MetaSplits(load_idx_dataset(self.name, "train", cfg.root), None, load_idx_dataset(self.name, "t10k", cfg.root))

    @classmethod
    def sizes(cls, cfg: DataConfig) -> Sizes:
        return Sizes((28, 28, 1), 10, 10, *cls.smallest)


@DATASETS.register("mnist")
class MnistData(_IdxData):
    """MNIST: 10 digits, 28x28 gray (train / t10k)."""

    name = "mnist"
    smallest = (5421, 892)  # the digit 5


@DATASETS.register("fashionmnist")
class FashionMnistData(_IdxData):
    """Fashion-MNIST: 10 kinds of clothing, 28x28 gray (train / t10k)."""

    name = "fashionmnist"
    smallest = (6000, 1000)
