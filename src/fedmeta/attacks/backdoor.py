"""The one-shot backdoor attack on federated meta-learning (Chen, Golubchik, Paolieri, Sec. 2-3).

The attacker reserves backdoor classes and a target class. Its training episodes always have a
*target slot*: one way whose examples mix benign target images X_T with keyed backdoor images X_B
(in a fixed ratio), all labelled as the target; the other N-1 ways are ordinary classes of its own
data, so the model stays good at the main task. After long local training it sends a boosted
update lambda * (theta_a - theta_G) (``MetaClient.boost``).

Each reserved class's examples are divided once, by a seeded permutation, into the attacker's
share (keyed for backdoor classes, X_T for the target), a held-out share (keyed attack-validation
images for backdoor classes, clean queries for the target) and the benign users' share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fedmeta.data.episodes import Episodes, sample_classes, sample_examples
from fedmeta.data.pool import ClassPool

TargetWay = Literal["random", "last"]


@dataclass(frozen=True)
class ReservedShares:
    """Positions, within one reserved class, of each share of its examples."""

    attacker: Tensor
    held_out: Tensor
    benign: Tensor


def share_examples(count: int, attacker: int, held_out: int, benign: int, gen: torch.Generator) -> ReservedShares:
    """Disjoint shares of a class with ``count`` examples; ``benign`` is capped by what is left.

    (mini-ImageNet: 100 attack + 50 validation keyed images leave 450 of 600 for benign users,
    not the paper's 480, because the attack and validation images must stay disjoint.)
    """
    if attacker + held_out >= count:
        raise ValueError(f"{attacker} attacker + {held_out} held-out examples leave none of {count} for benign users")
    order = torch.randperm(count, generator=gen)
    benign = min(benign, count - attacker - held_out)
    cut = (attacker, attacker + held_out, attacker + held_out + benign)
    return ReservedShares(order[: cut[0]].sort().values, order[cut[0] : cut[1]].sort().values, order[cut[1] : cut[2]].sort().values)


def draw(rows: Tensor, episodes: int, count: int, gen: torch.Generator) -> Tensor:
    """``[episodes, count]`` rows drawn from ``rows``: without replacement while there are enough."""
    if count <= len(rows):
        return rows[torch.rand(episodes, len(rows), generator=gen).argsort(dim=1)[:, :count]]
    return rows[torch.randint(len(rows), (episodes, count), generator=gen)]


def poisoned_episodes(
    own: ClassPool,
    target_rows: Tensor,
    backdoor_rows: Tensor,
    *,
    episodes: int,
    ways: int,
    shots: int,
    backdoor_share: float,
    gen: torch.Generator,
    queries: int = 0,
    target_way: TargetWay = "random",
) -> Episodes:
    """The attacker's episodes: N-1 ways of its own classes plus a target slot at a random way, or
    at the last (``target_way = "last"``: the paper's "always include the target class as the N-th
    model output", Sec. 2; a random way is the default of every kept result).

    Each way has ``shots`` support and ``queries`` query examples (MAML's outer loss needs queries;
    Reptile has none). The target slot holds ``round((shots + queries) * backdoor_share)`` keyed
    backdoor images and benign target images for the rest, mixed at random over its support and
    queries, all with the target's label. Its class id in ``Episodes.classes`` is -1.
    """
    per_way = shots + queries
    classes = sample_classes(own.num_classes, episodes, ways - 1, gen)
    rows = sample_examples(own, classes, per_way, gen)
    keyed = round(per_way * backdoor_share)
    slot = torch.cat([draw(backdoor_rows, episodes, keyed, gen), draw(target_rows, episodes, per_way - keyed, gen)], dim=1)
    slot = slot.gather(1, torch.rand(episodes, per_way, generator=gen).argsort(dim=1))  # mix the two kinds
    if target_way == "random":
        where = torch.randint(ways, (episodes,), generator=gen)
    else:
        where = torch.full((episodes,), ways - 1)
    all_rows = torch.empty(episodes, ways, per_way, dtype=torch.long)
    all_classes = torch.full((episodes, ways), -1, dtype=torch.long)
    others = torch.arange(ways)[None, :] != where[:, None]
    all_rows[others] = rows.flatten(0, 1)
    all_rows[~others] = slot
    all_classes[others] = classes.flatten()
    return Episodes(all_rows, all_classes, shots)
