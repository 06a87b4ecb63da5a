"""The run folder and the one run loop every experiment uses.

``DIR/config.toml``    the fully resolved config (run it again with ``fedmeta run DIR/config.toml``)
``DIR/metrics.jsonl``  one JSON object per evaluation point, flushed and fsync-ed as it is written
                       (strict JSON: a value that is not a number, such as a rejected update's loss, is null)
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

Every tensor file (``fedmeta.storage``) is written atomically and carries a content hash checked
when it is read: a corrupt checkpoint is named, never resumed from. A running process locks its
folder (``DIR/.lock`` names it), so two runs never write one folder.
"""

from __future__ import annotations

import json
import math
import os
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor
from tqdm import tqdm

from fedmeta.config import ConfigError, validate
from fedmeta.runtime import machine
from fedmeta.storage import CorruptFile, Locked, acquire, atomic_write, read_tensors, write_tensors

T = TypeVar("T")


class RunError(RuntimeError):
    """The run folder cannot be used as asked."""


def restore_generator(state: Tensor) -> torch.Generator:
    gen = torch.Generator()
    gen.set_state(state)
    return gen


# --- the run folder -----------------------------------------------------------------------------

FREE_KEYS = ("description", "data.root", "runtime.threads", "eval.", "federation.reply_timeout")
"""Keys a run may be resumed with changed: they do not change what was already computed (the
data files are checked against their checksums wherever they are; threads change float
round-off only; evaluation settings apply to the points still to come). ``resumes.jsonl`` records
each change and the metric line it took effect at."""

_HELD: dict[Path, int] = {}
"""Run folders this process holds the lock of (a process may open its own folder again)."""


class RunDir:
    CONFIG = "config.toml"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    CHECKPOINT = "checkpoint.safetensors"
    WEIGHTS = "weights.safetensors"
    LOCK = ".lock"
    RESUMES = "resumes.jsonl"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._changes: dict[str, list[Any]] = {}

    @classmethod
    def open(cls, path: Path, config: Any) -> RunDir:
        """A new run folder, or an unfinished one of the same run (to resume), locked by this
        process until it finishes. Refused: a folder another process is writing, a finished run,
        another run, a folder with files fedmeta did not write."""
        run = cls(path)
        try:
            run._claim()
            existing = path / cls.CONFIG
            if existing.is_file():
                run._check_same_run(existing, config)
            atomic_write(existing, config.to_toml().encode())
        except OSError as err:
            raise RunError(f"cannot use --out {path}: {err.strerror or err}") from None
        return run

    def _claim(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--out {self.path} is a file, not a folder")
        if self.path.is_dir():
            entries = sorted(p.name for p in self.path.iterdir())
            # names fedmeta writes count as ours only beside its config or lock: a folder of someone's
            # figure.png and weights.safetensors is not a run folder, whose files a run may replace
            foreign = [n for n in entries if not _ours(n)] or ([] if {self.CONFIG, self.LOCK} & set(entries) else entries)
            if foreign:
                raise RunError(f"--out {self.path} holds files fedmeta did not write ({', '.join(foreign[:5])}"
                               f"{', ...' if len(foreign) > 5 else ''}); choose an empty or new folder")
        key = self.path.resolve()
        if key not in _HELD:
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                _HELD[key] = acquire(self.path / self.LOCK, str(self.path))
            except Locked as err:
                raise RunError(f"{err}; wait for it to finish or choose another --out") from None
        for tmp in self.path.glob(".*.tmp"):  # a killed writer's leftovers (ours: the folder is locked)
            tmp.unlink(missing_ok=True)

    def _check_same_run(self, existing: Path, config: Any) -> None:
        if (self.path / self.SUMMARY).is_file():
            raise RunError(f"{self.path} holds a finished run; choose another --out or delete it")
        changed = config_changes(existing, config)
        fixed = [k for k in changed if not matches(k, FREE_KEYS)]
        if fixed:
            raise RunError(
                f"{self.path} holds an unfinished run with a different config ({', '.join(fixed[:5])} differ); resume it "
                f"with the same config (fedmeta run {existing} --out {self.path}) or choose another --out")
        self._changes = changed

    def close(self) -> None:
        """Release the folder's lock (a finished run's, or one this process gives up)."""
        fd = _HELD.pop(self.path.resolve(), None)
        if fd is not None:
            os.close(fd)

    # metrics ---------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        with (self.path / self.METRICS).open("a") as f:
            f.write(strict_json(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict[str, Any]]:
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _lines(self) -> list[str]:
        path = self.path / self.METRICS
        return path.read_text().splitlines(keepends=True) if path.is_file() else []

    def _truncate_metrics(self, count: int) -> None:
        lines = self._lines()
        if len(lines) != count:
            atomic_write(self.path / self.METRICS, "".join(lines[:count]).encode())
        if self._changes:
            with (self.path / self.RESUMES).open("a") as f:
                f.write(strict_json({"from_metric_line": count, "changed": self._changes}) + "\n")
            tqdm.write(f"resuming with changed {', '.join(self._changes)} (metric lines from {count} on)")
            self._changes = {}

    # checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Atomically replace the checkpoint; ``state`` is JSON-able progress (stage, step, ...)."""
        write_tensors(self.path / self.CHECKPOINT, tensors, {"state": state, "metric_lines": len(self._lines())})

    def resume(self) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The last checkpoint (tensors, state), with metrics truncated to match; None if fresh."""
        path = self.path / self.CHECKPOINT
        if not path.is_file():
            self._truncate_metrics(0)
            return None
        try:
            tensors, meta = read_tensors(path)
        except CorruptFile as err:
            raise RunError(f"corrupt checkpoint {err}; delete {self.path} to start the run again") from None
        self._truncate_metrics(int(meta["metric_lines"]))
        return tensors, meta["state"]

    # results ---------------------------------------------------------------------------------
    def save_weights(self, params: dict[str, Tensor], name: str | None = None) -> None:
        write_tensors(self.path / (name or self.WEIGHTS), params)

    def finish(self, summary: dict[str, Any]) -> None:
        atomic_write(self.path / self.SUMMARY, (strict_json(summary, indent=2) + "\n").encode())
        (self.path / self.CHECKPOINT).unlink(missing_ok=True)
        self.close()


def strict_json(value: Any, indent: int | None = None) -> str:
    """``value`` as JSON with sorted keys and every NaN or infinity written as null: Python's
    ``NaN``/``Infinity`` literals are not JSON, and jq, JavaScript, pandas' strict readers and most
    other tools a user points at a results file refuse the whole file for one of them."""
    return json.dumps(_finite(value), indent=indent, sort_keys=True, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _ours(name: str) -> bool:
    """Whether a run folder's entry is one fedmeta writes (results, figures, lock, temporary files)."""
    fixed = {RunDir.CONFIG, RunDir.METRICS, RunDir.SUMMARY, RunDir.LOCK, RunDir.RESUMES}
    return name in fixed or name.endswith((".safetensors", ".png")) or (name.startswith(".") and name.endswith(".tmp"))


def matches(key: str, patterns: Sequence[str]) -> bool:
    """Whether dotted ``key`` is one of ``patterns`` (a pattern ending in "." covers a whole section)."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def config_changes(path: Path, config: Any) -> dict[str, list[Any]]:
    """``{key: [in the file at path, in config]}`` for every key that differs, both validated
    first (so keys a newer fedmeta added with their defaults do not count as changes); settings
    of attack strategies no attacker runs do not count (``in_use``)."""
    try:
        old = flat_keys(in_use(validate(tomllib.loads(path.read_text())).model_dump(mode="json")))
    except (ConfigError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is not a config this fedmeta can read ({err})") from None
    new = flat_keys(in_use(config.model_dump(mode="json")))
    return {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def in_use(tree: dict[str, Any]) -> dict[str, Any]:
    """A config (as a dict) without the ``[attacks.<name>]`` tables of strategies no attacker
    runs: a preset sets every strategy's length so that a swapped strategy does not train at the
    paper's, and those tables change nothing about a run (nor whether two runs are one setting)."""
    if not tree.get("attacks"):
        return tree
    used = {a.get("strategy", "boosted") for a in tree.get("attack", {}).get("attackers", [{}])}
    return {**tree, "attacks": {k: v for k, v in tree["attacks"].items() if k in used}}


def flat_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a nested dict."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= flat_keys(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


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
        self.federation: dict[str, dict[str, int]] = self.saved.get("federation", {})
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
                      "elapsed_s": self.elapsed, **({"step": step} if step is not None else {}),
                      **({"federation": self.federation} if self.federation else {})}
        self.out.save_checkpoint(tensors, self.saved)

    def count(self, phase: str, report: Any) -> None:
        """Add a federation round (a ``RoundReport``) to the tally of ``phase`` (e.g. ``main/a``)."""
        self._add(phase, report.fields())

    def count_log(self, phase: str, lines: list[dict[str, Any]]) -> None:
        """The tally of ``phase`` from its per-round log lines (pre-training's, kept in its cache)."""
        self.federation.pop(phase, None)
        for line in lines:
            self._add(phase, line)

    def _add(self, phase: str, fields: dict[str, Any]) -> None:
        tally = self.federation.setdefault(phase, dict.fromkeys(TALLY, 0))
        for key, value in _round_tally(fields).items():
            tally[key] += value

    def summary(self, **fields: Any) -> dict[str, Any]:
        """``fields`` with the wall time of the whole run (resumed parts included), the machine that
        finished it (``runtime.machine``) and, for a federation, what happened to the updates of
        each phase."""
        wall = self.elapsed
        tally = {"federation": self.federation,
                 "rejected": {p: t["rejected"] for p, t in self.federation.items()}} if self.federation else {}
        return {**fields, **tally, "wall_time_s": round(wall, 1), "wall_time": format_duration(wall),
                "machine": machine()}


TALLY = ("rounds", "empty_rounds", "updates", "aggregated", "rejected", "missing")
"""What a run's summary counts per federation phase: rounds, rounds that applied no update, and
the selected users' updates: applied, rejected (non-finite), never arrived."""


def _round_tally(fields: dict[str, Any]) -> dict[str, int]:
    aggregated = len(fields["aggregated"])
    return {"rounds": 1, "empty_rounds": int(aggregated == 0), "updates": len(fields["participants"]),
            "aggregated": aggregated, "rejected": len(fields["rejected"]), "missing": len(fields.get("missing", []))}


def empty_phases(summary: dict[str, Any]) -> list[str]:
    """The federation phases of a summary in which no round applied any update."""
    return [p for p, t in summary.get("federation", {}).items() if t["rounds"] and t["empty_rounds"] == t["rounds"]]


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
