"""Sweeps: the cells of a grid of config values x seeds, one run folder each, resumable.

``DIR/base.toml``     the resolved base config (every cell is it plus the cell's overrides)
``DIR/sweep.json``    the grid, the seeds, and each cell's overrides, status and error
``DIR/<cell>/``       one run folder per cell, named by its settings: ``key=value__...__seed=N``
``DIR/logs/<cell>.log``  a cell's progress and log lines when it ran in a worker or on Ray
``DIR/.lock``         held while a sweep runs, so two sweeps never share a folder

Running a sweep again skips finished cells (their ``summary.json``) and resumes unfinished ones
from their checkpoints; new grid values or seeds add cells. A folder made from a different base
config is refused, since its cells could not be compared with the new ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fedmeta.runs import RunDir, RunError, config_changes, matches
from fedmeta.storage import Locked, acquire, atomic_write
from fedmeta.sweeps.cell import Outcome, Task
from fedmeta.sweeps.executors import Executor, InProcess, LocalPool, RayCluster
from fedmeta.sweeps.grid import Cell, Plan, plan, split_values

__all__ = ["BASE", "STATE", "Executor", "InProcess", "LocalPool", "Plan", "RayCluster", "Result", "plan", "run_sweep",
           "split_values"]

BASE = "base.toml"
STATE = "sweep.json"
LOGS = "logs"
LOCK = ".lock"
SAME_BASE_IGNORES = ("description", "data.root", "runtime.threads")
"""Base-config keys that may differ between invocations of one sweep: they do not change results."""


@dataclass
class Result:
    """What a sweep did: cells skipped as finished, finished now, failed (name -> error)."""

    skipped: list[str]
    done: list[str]
    failed: dict[str, str]


def run_sweep(sweep: Plan, out: Path, executor: Executor, echo: Callable[[str], Any] = tqdm.write,
              finished: Callable[[str], Any] | None = None) -> Result:
    """Run every unfinished cell of ``sweep`` into ``out`` on ``executor``; ``finished`` is called
    with each cell's name as soon as it finishes (``fedmeta sweep --keep``: copy it somewhere safe),
    also when it wrote its summary and then failed (a membership point not scored, a phase that
    applied no update): a report reads such a cell, and a rerun skips it as finished."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    fd = _lock(out)
    try:
        _check_base(out, sweep)
        state = _state(out, sweep)
        before = [c.name for c in sweep.cells if (out / c.name / RunDir.SUMMARY).is_file()]
        todo = [c for c in sweep.cells if c.name not in before]
        if before:
            echo(f"skipping {len(before)} finished cell(s) of {len(sweep.cells)}")
        result = Result(before, [], {})
        for outcome in _progress(executor.run([_task(out, c, sweep, executor) for c in todo]), len(todo), executor):
            _record(out, state, outcome, result)
            echo(_line(outcome, len(result.done) + len(result.failed), len(todo)))
            if finished is not None and (outcome.error is None or (out / outcome.name / RunDir.SUMMARY).is_file()):
                finished(outcome.name)
        return result
    finally:
        os.close(fd)


def _lock(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    try:
        return acquire(out / LOCK, f"sweep folder {out}")
    except Locked as err:
        raise RunError(f"{err}; wait for it to finish or choose another --out") from None


def _check_base(out: Path, sweep: Plan) -> None:
    """Write ``base.toml``, or refuse a folder whose base config differs (keys named)."""
    path = out / BASE
    new = sweep.base.to_toml()
    if path.is_file():
        differ = [k for k in config_changes(path, sweep.base) if not matches(k, SAME_BASE_IGNORES)]
        if differ:
            raise RunError(f"{out} holds a sweep of a different base config ({', '.join(differ[:5])} differ); "
                           "run it with its own base config or choose another --out")
    elif any(p.name not in (LOCK,) for p in out.iterdir()):
        raise RunError(f"--out {out} is not a sweep folder (no {BASE}); choose an empty or new folder")
    atomic_write(path, new.encode())


def _state(out: Path, sweep: Plan) -> dict[str, Any]:
    path = out / STATE
    state = json.loads(path.read_text()) if path.is_file() else {"cells": {}}
    state["grid"] = {**state.get("grid", {}), **sweep.grid}
    state["seeds"] = max(state.get("seeds", 0), sweep.seeds)
    for cell in sweep.cells:
        state["cells"].setdefault(cell.name, {"overrides": list(cell.overrides), "status": "pending"})
    for name, entry in state["cells"].items():  # a cell that finished after its worker was cut off, or by hand
        if entry["status"] != "done" and (out / name / RunDir.SUMMARY).is_file():
            entry.update(status="done", error=None)
    _save(out, state)
    return state


def _save(out: Path, state: dict[str, Any]) -> None:
    atomic_write(out / STATE, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())


def _task(out: Path, cell: Cell, sweep: Plan, executor: Executor) -> Task:
    log = str(out / LOGS / f"{cell.name}.log") if executor.logs else None
    return Task(cell.name, str(out / cell.name), str(out / BASE), cell.overrides,
                executor.threads(sweep.base.runtime.threads), log)


def _progress(outcomes, total: int, executor: Executor):
    """One bar over the cells (below the cells' own bars when they run in this process)."""
    bar = tqdm(outcomes, total=total, desc=f"sweep ({executor.name})", unit="cell", position=0, leave=True)
    yield from bar


def _record(out: Path, state: dict[str, Any], outcome: Outcome, result: Result) -> None:
    entry = state["cells"][outcome.name]
    if outcome.error is None:
        result.done.append(outcome.name)
        entry.update(status="done", error=None, seconds=round(outcome.seconds, 1))
    else:
        result.failed[outcome.name] = outcome.error
        entry.update(status="failed", error=outcome.error)
    _save(out, state)


def _line(outcome: Outcome, count: int, total: int) -> str:
    where = f"[{count}/{total}] {outcome.name}"
    if outcome.error is not None:
        return f"{where}  FAILED: {outcome.error}"
    numbers = " | ".join(f"{k} {100 * v:.2f}%" for k, v in outcome.headline.items())
    return f"{where}  done in {outcome.seconds:.0f}s  {numbers}"
