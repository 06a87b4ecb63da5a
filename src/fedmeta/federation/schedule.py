"""Who takes part in which round.

Each round the server samples ``per_round`` (M_r) users; malicious users are never drawn at
random, only in their own attack rounds (the paper: one attacker, exactly once, in round 1), where
the k attackers of that round join ``per_round - k`` benign users. Draws come from a per-round stream of the seed, so round r's
participants do not depend on earlier rounds and a resumed run picks the same users.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedmeta.rng import stream


@dataclass(frozen=True)
class Schedule:
    users: int
    per_round: int
    seed: int
    attackers: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    """Malicious user -> the main-phase rounds it takes part in (possibly none)."""

    @property
    def benign(self) -> list[int]:
        return [u for u in range(self.users) if u not in self.attackers]

    def attacking(self, round_: int, phase: str = "main") -> list[int]:
        return [u for u, rounds in self.attackers.items() if phase == "main" and round_ in rounds]

    def participants(self, round_: int, phase: str = "main") -> list[int]:
        """Sorted user ids taking part in ``round_`` of ``phase`` (e.g. "pretrain", "main")."""
        attacking = self.attacking(round_, phase)
        benign = torch.tensor(self.benign)
        draws = self.per_round - len(attacking)
        if draws > len(benign):
            raise ValueError(f"cannot pick {draws} benign users from {len(benign)}")
        chosen = benign[torch.randperm(len(benign), generator=stream(self.seed, "schedule", phase, round_))[:draws]]
        return sorted(chosen.tolist() + attacking)
