"""The local-pool engine: a round's client updates in worker processes on this machine.

The users of a round are independent: same global weights, fresh optimiser state, their own
random streams (``federation.client``), so they can train side by side. Sequentially, a round's
cost grows linearly with M_r (3.3 s for 1 user, 39.8 s for 12 at E = 50 here). This engine gives
each of them a spawned worker process with one thread (README, "Several experiments on one
machine": one thread per process is what survives a shared machine). A worker rebuilds the
federation's clients from the resolved config and the ``Phase`` with the federation builder, as a
Flower node does, keeps them for the later rounds, and runs the same ``Client.update``.

The server stays in this process: schedule, screening, arrival order and rule are
``Server.aggregate``'s, and the updates come back in the sequential server's order, so the run
equals the in-process engine's up to thread round-off (tested). Client updates are computed on
this machine (``local``), so attack rounds are cached as in-process. For CPUs: a worker runs on
the CPU whatever ``runtime.device`` says.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import tomllib
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from tqdm import tqdm

from fedmeta import runtime
from fedmeta.config import Config, RuntimeConfig, validate
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.server import Client, Server
from fedmeta.federation.updates import ClientUpdate
from fedmeta.models.conv4 import Params
from fedmeta.scenario.builder import Phase, Population, build_clients, build_population


@dataclasses.dataclass(frozen=True)
class PoolServer(Server):
    """``Server`` whose round's client updates are computed by ``pool``'s workers."""

    pool: ProcessPoolExecutor = dataclasses.field(kw_only=True)
    config: str = dataclasses.field(kw_only=True)  # the run's resolved config (TOML): what a worker rebuilds from
    phase: Phase = dataclasses.field(kw_only=True)

    def compute(self, users: list[int], params: Params, settings: RoundSettings) -> list[ClientUpdate]:
        device = next(iter(params.values())).device
        weights = {k: v.detach().cpu() for k, v in params.items()}
        futures = [self.pool.submit(worker_update, self.config, self.phase, user, weights, settings) for user in users]
        return [_on(future.result(), device) for future in futures]


class LocalPool:
    """Every client of a round computes its update in one of ``workers`` single-threaded
    processes (default: as many as this process's threads, ``runtime.threads`` or one per core)."""

    name = "local-pool"
    local = True

    def __init__(self, workers: int | None = None) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"a pool needs at least one worker, got {workers}")
        self.workers = workers

    @functools.cached_property
    def size(self) -> int:
        """Fixed at the first federation (after ``runtime.setup`` set this process's threads)."""
        return self.workers or torch.get_num_threads()

    @functools.cached_property
    def pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.size, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet)

    def stats(self) -> dict[str, Any]:
        """For the summary: how many worker processes computed the updates."""
        return {"pool_workers": self.size}

    def serve(self, server: Server, cfg: Config, phase: Phase, rule: str) -> Server:
        parts = {f.name: getattr(server, f.name) for f in dataclasses.fields(Server)}
        return PoolServer(**parts, pool=self.pool, config=cfg.to_toml(), phase=phase)


def worker_update(config: str, phase: Phase, user: int, params: Params, settings: RoundSettings) -> ClientUpdate:
    """In a worker: ``user``'s update of the round, by the client the builder makes for it."""
    client = _clients(config, phase)[user]
    torch.set_num_threads(1)  # building a population applies the config's runtime settings
    return client.update(params, settings)


def _on(update: ClientUpdate, device: torch.device) -> ClientUpdate:
    return dataclasses.replace(update, delta={k: v.to(device) for k, v in update.delta.items()})


def _quiet() -> None:
    """Workers run on the CPU with one thread and no progress bars (they would interleave on one
    terminal): tqdm reads ``TQDM_DISABLE`` only when imported, which unpickling this function did."""
    runtime.setup(RuntimeConfig(device="cpu", threads=1))
    runtime.exit_with_parent()
    tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)


@functools.lru_cache(maxsize=2)
def _clients(config: str, phase: Phase) -> dict[int, Client]:
    """The federation's clients, built as the server built them (kept: a worker serves many rounds)."""
    return build_clients(_config(config), phase, _population(config, phase.case))


@functools.lru_cache(maxsize=1)
def _population(config: str, case: str) -> Population:
    """Who holds which data (the same for every phase of a case: built once per worker)."""
    return build_population(_config(config), Phase(case=case))


@functools.lru_cache(maxsize=1)
def _config(config: str) -> Config:
    """The run's config (its plugins imported in the worker too), on the CPU with one thread."""
    cfg = validate(tomllib.loads(config))
    return cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"device": "cpu", "threads": 1})})
