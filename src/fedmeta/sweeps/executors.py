"""Where a sweep's cells run: this process, a pool of local worker processes, or a Ray cluster.

Every executor runs the same ``run_cell`` and yields outcomes as cells finish. Worker processes
are started with "spawn" (torch after fork is fragile), each with ``cores // workers`` threads, so
they do not oversubscribe the cores (README, "Several experiments on one machine": 2 threads per
process beside another are 8x slower per step; ``OMP_WAIT_POLICY=PASSIVE`` did not help at 1
thread and costs 2.5x at 2, so it is left alone). A Ray address is checked with a plain TCP connection first, so an unreachable
cluster fails in seconds with the address in the message.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Protocol

from fedmeta.config import ConfigError
from fedmeta.runtime import exit_with_parent
from fedmeta.sweeps.cell import Outcome, Task, run_cell


def cores() -> int:
    """The CPU cores this process may use (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Executor(Protocol):
    name: str
    logs: bool
    """Whether cells' own output goes to log files (it would interleave on one terminal)."""

    def threads(self, configured: int | None) -> int | None:
        """The ``runtime.threads`` a cell runs with here (``None``: its config's)."""
        ...

    def run(self, tasks: list[Task]) -> Iterator[Outcome]:
        """Run the tasks, yielding each outcome as its cell finishes."""
        ...


class InProcess:
    """One cell after another, in this process, with the cells' own progress bars."""

    name = "in-process"
    logs = False

    def threads(self, configured: int | None) -> int | None:
        return None

    def run(self, tasks: list[Task]) -> Iterator[Outcome]:
        for task in tasks:
            yield run_cell(task)


class LocalPool:
    """``workers`` spawned processes sharing this machine's cores."""

    logs = True

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ConfigError(f"--workers takes a count >= 1, got {workers}")
        self.workers = workers
        self.name = f"{workers} local worker{'s' if workers > 1 else ''}"

    def threads(self, configured: int | None) -> int | None:
        share = max(1, cores() // self.workers)
        return min(configured, share) if configured else share

    def run(self, tasks: list[Task]) -> Iterator[Outcome]:
        with ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=exit_with_parent) as pool:
            futures = {pool.submit(run_cell, task): task for task in tasks}
            yield from _as_completed(futures)


def _as_completed(futures: dict[Future, Task]) -> Iterator[Outcome]:
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            error = future.exception()
            if error is None:
                yield future.result()
            else:  # the worker itself died (killed, out of memory): this cell failed, the others go on
                yield Outcome(futures[future].name, 0.0, error=f"worker died: {type(error).__name__}: {error}")


class RayCluster:
    """Ray tasks, one per cell, each asking for as many CPUs as it runs threads.

    ``address``: ``"auto"`` (the running cluster of this machine), ``"local"`` (start one in
    this process), ``host:port`` or ``ray://host:port``; if Ray is already initialised in this
    process (a script or test started it), that cluster is used. The cells' folders must be on a
    file system every node sees, with fedmeta installed on every node.
    """

    logs = True

    def __init__(self, address: str | None) -> None:
        if address not in (None, "auto", "local"):
            probe(address)  # before any folder is written
        self.address = address
        self.name = f"Ray ({address or 'current'})"

    def threads(self, configured: int | None) -> int | None:
        return configured or 1

    def run(self, tasks: list[Task]) -> Iterator[Outcome]:
        ray = connect(self.address)
        remote = ray.remote(run_cell)
        refs = {remote.options(num_cpus=task.threads or 1, max_retries=0).remote(task): task for task in tasks}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                yield ray.get(done[0])
            except Exception as err:  # noqa: BLE001 - a crashed worker fails its cell only
                yield Outcome(refs[done[0]].name, 0.0, error=f"Ray task failed: {type(err).__name__}: {err}")


def connect(address: str | None):
    """The ``ray`` module, initialised on ``address`` (see ``RayCluster``)."""
    try:
        import ray
    except ImportError as err:
        raise ConfigError(f"--ray needs Ray: pip install 'fedmeta[flower]' ({err})") from None
    if ray.is_initialized():
        return ray
    if address == "local":
        ray.init(num_cpus=cores(), include_dashboard=False, log_to_driver=False)
    elif address == "auto":
        try:
            ray.init(address="auto", log_to_driver=False)
        except ConnectionError as err:
            raise ConfigError(f"--ray auto: no running Ray cluster on this machine ({err})") from None
    else:
        probe(address or "")
        ray.init(address=address, log_to_driver=False)
    return ray


def probe(address: str, timeout: float = 3.0) -> None:
    """Refuse, within ``timeout`` seconds, a ``host:port`` nobody listens on."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--ray takes auto, local, HOST:PORT or ray://HOST:PORT, got '{address}'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}") from None
