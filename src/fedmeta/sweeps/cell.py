"""Running one cell: the one function every executor calls (in this process, in a worker
process, in a Ray task), so a cell's numbers do not depend on where it ran.

Only plain data crosses process boundaries (``Task`` in, ``Outcome`` out), and the function
imports the experiments lazily: a spawned worker starts without torch until it runs a cell.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Task:
    """What a worker needs to run a cell: its folder, the base config file and the overrides
    (``threads``, if set, replaces ``runtime.threads``: a key a run may resume with changed)."""

    name: str
    path: str
    source: str
    overrides: tuple[str, ...]
    threads: int | None = None
    log: str | None = None


@dataclass(frozen=True)
class Outcome:
    """A finished or failed cell: its headline numbers, or the error that stopped it."""

    name: str
    seconds: float
    headline: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def run_cell(task: Task) -> Outcome:
    """Run (or resume) the cell; never raises for a failing cell, so the other cells go on."""
    start = time.perf_counter()
    try:
        with _output(task.log):
            summary = _run(task)
    except Exception as err:  # noqa: BLE001 - any failure of one cell is reported, the sweep goes on
        if task.log:
            with open(task.log, "a") as f:
                traceback.print_exc(file=f)
        return Outcome(task.name, time.perf_counter() - start, error=f"{type(err).__name__}: {err}")
    return Outcome(task.name, time.perf_counter() - start, headline=headline(summary))


def _run(task: Task) -> dict[str, Any]:
    from fedmeta import experiments
    from fedmeta.config import load_config
    from fedmeta.federation.engine import IN_PROCESS
    from fedmeta.runs import RunDir

    threads = [f"runtime.threads={task.threads}"] if task.threads else []
    cfg = load_config(task.source, [*task.overrides, *threads])
    return experiments.run(cfg, RunDir.open(Path(task.path), cfg), IN_PROCESS)


@contextlib.contextmanager
def _output(log: str | None):
    """Send the cell's progress bars and lines to ``log`` (workers), or leave them on the terminal."""
    if log is None:
        yield
        return
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's top-level accuracies (what the line of a finished cell shows)."""
    return {k: v for k, v in summary.items() if isinstance(v, float) and k.endswith("accuracy")}
