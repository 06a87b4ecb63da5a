"""A long client update's progress on disk, so that a killed run resumes it where it stopped.

The run loop checkpoints between rounds, so a kill loses at most the round in progress. That is
nothing for a benign user (seconds to minutes) but everything for the paper's attacker, whose one
update is 50,000 episodes x 50 epochs (days on a CPU; ``omniglot-exp1a-medium``'s 5,000 x 50, hours).
A round whose ``RoundSettings.journal`` names a folder therefore has each client save, every
``SAVE_EVERY`` seconds, what its training loop carries: the weights, the optimiser state, its
random stream and its summed loss. The next start of the same round goes on from the last save,
and the update equals an uninterrupted one bit for bit (tested): every draw comes from the saved
stream, and the tensors are saved exactly.

The attack-round cache (``fedmeta.scenario.cache.attack_round_updates``) sets the folder: its
entry's key fixes the global model and the settings the round starts from, and the folder goes
once the entry is written. A save that is damaged is named and the update starts again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from fedmeta.meta.adam import AdamState
from fedmeta.models.conv4 import Params
from fedmeta.storage import CorruptFile, read_tensors, write_tensors

SAVE_EVERY = 120.0
"""Seconds of training between two saves: a kill loses at most this much (a save takes milliseconds)."""


@dataclass(frozen=True)
class Progress:
    """What a client's training loop carries from one outer step to the next."""

    step: int  # outer steps done
    params: Params
    state: AdamState
    loss_sum: Tensor


@dataclass
class Journal:
    """The saves of one user's update in one round (phase and round name its file, since a round's
    clients may also train on other streams: an adaptive attacker's benign estimates)."""

    path: Path
    steps: int  # the update's outer steps: a save of an update of another length is not resumed
    last: float = field(default_factory=time.monotonic)

    @classmethod
    def of(cls, folder: Path | None, user: int, phase: str, round_: int, steps: int) -> Journal | None:
        """The journal of ``user``'s update, or None when the round keeps none (``folder`` None)."""
        if folder is None:
            return None
        return cls(folder / f"{phase.replace('/', '.')}-round-{round_}-user-{user}.safetensors", steps)

    def resume(self, like: Params, gen: torch.Generator) -> Progress | None:
        """The last save (``gen`` set to its stream's state), or None when there is none to go on from."""
        found = read_save(self.path, "starting the update again", "steps", self.steps, "an update of {} steps",
                          next(iter(like.values())).device)
        if found is None:
            return None
        tensors, meta = found
        names = list(like)
        gen.set_state(tensors["generator"].cpu())
        tqdm.write(f"resuming the update at step {meta['step']} of {self.steps} from {self.path}")
        return Progress(meta["step"], {k: _like(tensors[f"params.{k}"], v) for k, v in like.items()},
                        AdamState.from_tensors(tensors, "state.", names), tensors["loss_sum"])

    def tick(self, progress: Progress, gen: torch.Generator) -> None:
        """Save ``progress`` and ``gen``'s state if ``SAVE_EVERY`` seconds passed since the last save
        (or the start) and the update is not done; otherwise nothing (one clock read)."""
        if time.monotonic() - self.last < SAVE_EVERY or progress.step >= self.steps:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        names = list(progress.params)
        tensors = {f"params.{k}": v for k, v in progress.params.items()} | progress.state.to_tensors("state.", names)
        write_tensors(self.path, tensors | {"generator": gen.get_state(), "loss_sum": progress.loss_sum},
                      {"step": progress.step, "steps": self.steps})
        self.last = time.monotonic()


def read_save(path: Path, again: str, key: str, expected: object, saved: str = "{}",
              device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], dict] | None:
    """The tensors and metadata of the save at ``path``, or None when there is none, it is damaged,
    or its metadata's ``key`` is not ``expected`` (a save of other work): then ``again`` and the
    reason are printed, a mismatch as "saved ``saved`` (filled with the saved value), not ``expected``"."""
    if not path.is_file():
        return None
    try:
        tensors, meta = read_tensors(path, device)
    except CorruptFile as err:
        tqdm.write(f"{again}: {err}")
        return None
    if meta.get(key) != expected:
        tqdm.write(f"{again}: {path} saved {saved.format(meta.get(key))}, not {expected}")
        return None
    return tensors, meta


def _like(saved: Tensor, like: Tensor) -> Tensor:
    """``saved`` laid out in memory as ``like`` (a channels-last weight stays channels-last)."""
    return torch.empty_like(like).copy_(saved)
