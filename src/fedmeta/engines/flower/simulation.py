"""``fedmeta run CONFIG --engine flower``: the experiment in Flower's simulation engine.

One virtual SuperNode per user (``partition-id`` = user id), ClientApps in Ray actors of one CPU
each, the ServerApp in a thread of this process. Ray starts and stops with every call (about
6-9 s on 2 cores), so this pays off only when rounds are long or to check an app before deploying it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedmeta.config import Config


def run_simulation(cfg: Config, out: Path, serverapp: Any, clientapp: Any, actors: int | None = None) -> dict[str, Any]:
    """Run ``cfg`` with the apps into the run folder ``out`` (resumable, as in-process) and return
    its summary. ``serverapp`` must keep its runs in ``out``'s parent (the run config names only the
    run: ``out.name``). ``actors``: ClientApps running at once (default: the CPU count, at most one per user).
    """
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation  # the public run_simulation returns nothing
    from flwr.supercore.telemetry import EventType

    users = cfg.federation.users
    actors = actors or min(users, os.cpu_count() or 1)
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"config": cfg.to_toml(), "run": out.name})
    _run_simulation(
        num_supernodes=users, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        server_app=serverapp, client_app=clientapp, backend_name="ray", server_app_context=context,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": actors, "logging_level": "ERROR", "log_to_driver": False}},
    )
    summary = out / "summary.json"
    if not summary.is_file():
        raise RuntimeError(f"the Flower simulation ended without finishing {out} (see the log above)")
    return json.loads(summary.read_text())
