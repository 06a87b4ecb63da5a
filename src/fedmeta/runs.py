"""The run folder: what a run leaves behind, and how it resumes after a kill.

``DIR/config.toml``    the fully resolved config (run it again with ``fedmeta run DIR/config.toml``)
``DIR/metrics.jsonl``  one JSON object per evaluation point, flushed and fsync-ed as it is written
``DIR/summary.json``   final numbers, written last: its presence means the run finished
``DIR/checkpoint.safetensors``  everything needed to continue (weights, optimiser and RNG states)
``DIR/weights.safetensors``     the final weights

A checkpoint records how many metric lines existed when it was taken. Resuming truncates
``metrics.jsonl`` to that count and replays from the checkpoint; since every random stream is in
the checkpoint, the replayed lines are identical to those an uninterrupted run writes, and no line
is lost or doubled. Checkpoints are safetensors (tensors + JSON metadata): nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedmeta.config import Config


class RunError(RuntimeError):
    """The run folder cannot be used as asked."""


class RunDir:
    CONFIG = "config.toml"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    CHECKPOINT = "checkpoint.safetensors"
    WEIGHTS = "weights.safetensors"

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def open(cls, path: Path, config: Config) -> RunDir:
        """A new run folder, or an unfinished one with the same config (to resume)."""
        run = cls(path)
        text = config.to_toml()
        existing = path / cls.CONFIG
        if existing.is_file():
            if (path / cls.SUMMARY).is_file():
                raise RunError(f"{path} holds a finished run; choose another --out or delete it")
            if existing.read_text() != text:
                raise RunError(
                    f"{path} holds an unfinished run with a different config; resume it with the same "
                    f"config (fedmeta run {existing} --out {path}) or choose another --out"
                )
        else:
            path.mkdir(parents=True, exist_ok=True)
            _atomic_write(existing, text.encode())
        return run

    # metrics ---------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        with (self.path / self.METRICS).open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict[str, Any]]:
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _truncate_metrics(self, count: int) -> None:
        path = self.path / self.METRICS
        if path.is_file():
            lines = path.read_text().splitlines(keepends=True)
            _atomic_write(path, "".join(lines[:count]).encode())

    # checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Atomically replace the checkpoint; ``state`` is JSON-able progress (round, step, ...)."""
        meta = {"state": json.dumps(state), "metric_lines": str(len(self.records()))}
        tmp = self.path / f".{self.CHECKPOINT}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
        tmp.replace(self.path / self.CHECKPOINT)

    def resume(self) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The last checkpoint (tensors, state), with metrics truncated to match; None if fresh."""
        path = self.path / self.CHECKPOINT
        if not path.is_file():
            self._truncate_metrics(0)
            return None
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        self._truncate_metrics(int(meta["metric_lines"]))
        return load_file(str(path)), json.loads(meta["state"])

    # results ---------------------------------------------------------------------------------
    def save_weights(self, params: dict[str, Tensor], name: str | None = None) -> None:
        target = self.path / (name or self.WEIGHTS)
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(target))

    def finish(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.path / self.SUMMARY, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        (self.path / self.CHECKPOINT).unlink(missing_ok=True)


def restore_generator(state: Tensor) -> torch.Generator:
    gen = torch.Generator()
    gen.set_state(state)
    return gen


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
