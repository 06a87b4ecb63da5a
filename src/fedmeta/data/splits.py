"""Class splits: which classes meta-train, which meta-test, and which examples are held out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from torch import Tensor

from fedmeta.data.files import verified
from fedmeta.data.omniglot import CHARACTERS_CSV

OMNIGLOT_CHARACTERS = 1623
OMNIGLOT_TRAIN = 1200


def seeded_omniglot_split(gen: torch.Generator) -> dict[str, Tensor]:
    """Finn's / Nichol's split: a seeded shuffle of the 1623 characters, 1200 train / 423 test."""
    order = torch.randperm(OMNIGLOT_CHARACTERS, generator=gen)
    return {"train": order[:OMNIGLOT_TRAIN].sort().values, "test": order[OMNIGLOT_TRAIN:].sort().values}


def torchmeta_omniglot_split(root: Path) -> dict[str, Tensor]:
    """Vinyals' split as shipped with torchmeta: 1028 train / 172 val / 423 test characters."""
    with verified(root, CHARACTERS_CSV).open(newline="") as f:
        by_name = {(r["set"], r["alphabet"], r["character"]): int(r["char_id"]) - 1 for r in csv.DictReader(f)}
    split = {}
    for part in ("train", "val", "test"):
        listing = json.loads(verified(root, f"omniglot/splits-torchmeta/{part}.json").read_text())
        ids = [by_name[(s, a, c)] for s, alphabets in listing.items() for a, chars in alphabets.items() for c in chars]
        split[part] = torch.tensor(sorted(ids))
    return split


def partition(items: Tensor, parts: int, gen: torch.Generator) -> list[Tensor]:
    """A seeded split of ``items`` into ``parts`` disjoint, near-equal, sorted groups."""
    shuffled = items[torch.randperm(len(items), generator=gen)]
    return [chunk.sort().values for chunk in shuffled.tensor_split(parts)]


def holdout_positions(classes: int, per_class: int, held_out: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-class example positions split into (kept ``[classes, per_class - held_out]``, held out)."""
    order = torch.rand(classes, per_class, generator=gen).argsort(dim=1)
    return order[:, held_out:].sort(dim=1).values, order[:, :held_out].sort(dim=1).values
