"""Who takes part in which round.

Each round the server samples ``per_round`` (M_r) users; the attacker is never drawn at random,
only in its ``attack_rounds`` (the paper: exactly once, in round 1), where it joins
``per_round - 1`` benign users. Draws come from a per-round stream of the seed, so round r's
participants do not depend on earlier rounds and a resumed run picks the same users.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmeta.rng import stream


@dataclass(frozen=True)
class Schedule:
    users: int
    per_round: int
    seed: int
    attacker: int | None = None
    attack_rounds: tuple[int, ...] = ()

    @property
    def benign(self) -> list[int]:
        return [u for u in range(self.users) if u != self.attacker]

    def participants(self, round_: int, phase: str = "main") -> list[int]:
        """Sorted user ids taking part in ``round_`` of ``phase`` (e.g. "pretrain", "main")."""
        attacking = self.attacker is not None and phase == "main" and round_ in self.attack_rounds
        benign = torch.tensor(self.benign)
        draws = self.per_round - 1 if attacking else self.per_round
        if draws > len(benign):
            raise ValueError(f"cannot pick {draws} benign users from {len(benign)}")
        chosen = benign[torch.randperm(len(benign), generator=stream(self.seed, "schedule", phase, round_))[:draws]]
        return sorted(chosen.tolist() + ([self.attacker] if attacking else []))
