"""The run folder and the one run loop every experiment uses.

``DIR/config.toml``    the fully resolved config (run it again with ``fedmeta run DIR/config.toml``)
``DIR/metrics.jsonl``  one JSON object per evaluation point, flushed and fsync-ed as it is written
``DIR/summary.json``   final numbers, written last: its presence means the run finished
``DIR/checkpoint.safetensors``  everything needed to continue (weights, optimiser, rule and RNG states)
``DIR/weights.safetensors``     the final weights

An experiment is a list of *stages* (cases, learners, attack points...), each a sequence of
*steps* (rounds, iterations, users...). ``Session`` walks them: it resumes at the stage and step
of the last checkpoint, shows a progress bar, writes metric lines and prints a log line per point,
and takes checkpoints. A checkpoint records how many metric lines existed when it was taken;
resuming truncates ``metrics.jsonl`` to that count and replays from the checkpoint. Since every
random stream is in the checkpoint, the replayed lines are identical to those an uninterrupted
run writes, and no line is lost or doubled.

Every tensor file fedmeta writes (checkpoints, caches, weights) is safetensors with JSON metadata,
written atomically (a unique temporary file, ``fsync``, then rename): nothing is unpickled, and a
kill leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

T = TypeVar("T")


class RunError(RuntimeError):
    """The run folder cannot be used as asked."""


# --- tensor files -------------------------------------------------------------------------------


def write_tensors(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any] | None = None) -> None:
    """Atomically write ``tensors`` with JSON-able ``meta`` (each value stored as JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={k: json.dumps(v) for k, v in (meta or {}).items()})
        _fsync_replace(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_tensors(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the JSON metadata of a file ``write_tensors`` wrote."""
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return load_file(str(path), device=str(device)), meta


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    _fsync_replace(Path(tmp), path)


def _fsync_replace(tmp: Path, path: Path) -> None:
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def restore_generator(state: Tensor) -> torch.Generator:
    gen = torch.Generator()
    gen.set_state(state)
    return gen


# --- the run folder -----------------------------------------------------------------------------


class RunDir:
    CONFIG = "config.toml"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    CHECKPOINT = "checkpoint.safetensors"
    WEIGHTS = "weights.safetensors"

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def open(cls, path: Path, config: Any) -> RunDir:
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
            atomic_write(existing, text.encode())
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
            atomic_write(path, "".join(lines[:count]).encode())

    # checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Atomically replace the checkpoint; ``state`` is JSON-able progress (stage, step, ...)."""
        write_tensors(self.path / self.CHECKPOINT, tensors, {"state": state, "metric_lines": len(self.records())})

    def resume(self) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The last checkpoint (tensors, state), with metrics truncated to match; None if fresh."""
        path = self.path / self.CHECKPOINT
        if not path.is_file():
            self._truncate_metrics(0)
            return None
        tensors, meta = read_tensors(path)
        self._truncate_metrics(int(meta["metric_lines"]))
        return tensors, meta["state"]

    # results ---------------------------------------------------------------------------------
    def save_weights(self, params: dict[str, Tensor], name: str | None = None) -> None:
        write_tensors(self.path / (name or self.WEIGHTS), params)

    def finish(self, summary: dict[str, Any]) -> None:
        atomic_write(self.path / self.SUMMARY, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        (self.path / self.CHECKPOINT).unlink(missing_ok=True)


# --- the run loop -------------------------------------------------------------------------------


class Session:
    """One pass of an experiment over its stages and steps, resumable at any checkpoint.

    ``keys`` are the metrics each log line shows. Use::

        session = Session(out, METRICS)
        for index, case, resumed in session.stages(cases):
            params, start = (restore(resumed.tensors), resumed.step) if resumed else (fresh(), 0)
            for r in session.steps(start, rounds, desc=f"case {case}", unit="round"):
                ...
                session.log(record)
                session.checkpoint(tensors, step=r + 1)
        return session.summary(...)
    """

    def __init__(self, out: RunDir, keys: Sequence[str]) -> None:
        self.out, self.keys = out, list(keys)
        resumed = out.resume()
        self._tensors, self.saved = resumed if resumed is not None else ({}, {})
        if resumed is not None:
            tqdm.write(f"resuming {out.path} at stage {self.saved.get('stage', 0)}, step {self.saved.get('step', '-')}")
        self.clock = time.perf_counter() - self.saved.get("elapsed_s", 0.0)
        self.stage = 0
        self._bar: tqdm | None = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.clock

    def stages(self, items: Sequence[T]) -> Iterator[tuple[int, T, Resumed | None]]:
        """``(index, item, resumed)`` for each stage not finished yet; ``resumed`` holds the
        checkpoint for the stage a run was killed in (else ``None``)."""
        first = self.saved.get("stage", 0)
        for index in range(first, len(items)):
            self.stage = index
            here = index == first and "step" in self.saved
            yield index, items[index], Resumed(self._tensors, self.saved) if here else None

    def resumed(self) -> Resumed | None:
        """The checkpoint of a single-stage experiment, if it is resuming."""
        return Resumed(self._tensors, self.saved) if "step" in self.saved else None

    def steps(self, start: int, stop: int, desc: str, unit: str) -> Iterator[int]:
        """``range(start, stop)`` with a progress bar."""
        self._bar = tqdm(range(start, stop), initial=start, total=stop, desc=desc, unit=unit)
        yield from self._bar

    def postfix(self, **values: Any) -> None:
        """Show ``values`` (e.g. the loss) beside the current progress bar."""
        self._bar.set_postfix(**values)

    def log(self, record: dict[str, Any], note: str = "", quiet: bool = False) -> None:
        """Write a metrics line and (unless ``quiet``) print it with the time elapsed."""
        self.out.log(record)
        if not quiet:
            tqdm.write(" | ".join([format_record(record, self.keys), *([note] if note else []),
                                   f"total {format_duration(self.elapsed)}"]))

    def checkpoint(self, tensors: dict[str, Tensor], step: int | None = None, **state: Any) -> None:
        """Checkpoint the current stage at ``step`` (steps done); ``step=None``: the stage is done."""
        self.saved = {"stage": self.stage if step is not None else self.stage + 1, **state,
                      "elapsed_s": self.elapsed, **({"step": step} if step is not None else {})}
        self.out.save_checkpoint(tensors, self.saved)

    def summary(self, **fields: Any) -> dict[str, Any]:
        """``fields`` with the wall time of the whole run (resumed parts included)."""
        wall = self.elapsed
        return {**fields, "wall_time_s": round(wall, 1), "wall_time": format_duration(wall)}


class Resumed:
    """A stage's checkpoint: its tensors, the step it reached and the rest of its JSON state."""

    def __init__(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        self.tensors, self.state = tensors, state

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def take(self, prefix: str, like: dict[str, Tensor]) -> dict[str, Tensor]:
        """The tensors ``prefix + name`` for each name of ``like``, on its device."""
        return {k: self.tensors[prefix + k].to(v.device) for k, v in like.items()}

    def group(self, prefix: str, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Every tensor under ``prefix`` (the prefix removed)."""
        return {k.removeprefix(prefix): v.to(device) for k, v in self.tensors.items() if k.startswith(prefix)}


# --- lines --------------------------------------------------------------------------------------


def accuracy_fields(name: str, acc: Any) -> dict[str, Any]:
    """``{name: mean, name_ci95: half-width}`` for a metrics line (``acc``: an ``Accuracy``)."""
    return {name: round(acc.mean, 6), f"{name}_ci95": round(acc.ci95, 6)}


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_record(record: dict[str, Any], keys: list[str]) -> str:
    """One log line: the position, then each accuracy as a percentage with its interval."""
    where = " ".join(f"{k} {record[k]}" for k in ("learner", "case", "user", "round", "step", "defense") if k in record)
    parts = []
    for key in keys:
        if key in record:
            ci = record.get(f"{key}_ci95")
            parts.append(f"{key} {100 * record[key]:.2f}%" + (f" ±{100 * ci:.2f}" if ci is not None else ""))
    return f"[{where}] " + " | ".join(parts)
