"""The Flower App of fedmeta: Flower's entry points, wired to fedmeta's experiments.

``serverapp`` runs the experiment of the run config with the Flower engine (experiments sit above
the engines, so the wiring lives here, at the top, beside the CLI), into the run folders of the
SuperLink's operator (``FEDMETA_RUNS``); ``clientapp`` is the engine's ClientApp. ``flwr run``
finds both through ``engines/flower/app/pyproject.toml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmeta.config import Config
from fedmeta.engines.flower.apps import Operator, clientapp, make_serverapp
from fedmeta.engines.flower.simulation import run_simulation
from fedmeta.experiments import run

serverapp = make_serverapp(run)

__all__ = ["clientapp", "serverapp", "simulate"]


def simulate(cfg: Config, out: Path, actors: int | None = None) -> dict[str, Any]:
    """``fedmeta run CONFIG --engine flower``: ``cfg`` on Flower's simulation engine (Ray), into
    ``out`` (whoever runs the simulation is the server's operator)."""
    out = out.resolve()
    return run_simulation(cfg, out, make_serverapp(run, Operator(out.parent)), clientapp, actors)
