"""Experiment families; each is ``run(config, run_dir, engine) -> summary``, chosen by ``experiment``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from fedmeta.config import Config, ConfigError
from fedmeta.federation.engine import IN_PROCESS, Engine
from fedmeta.runs import RunDir, RunError, empty_phases

Experiment = Callable[[Config, RunDir, Engine], dict[str, Any]]

ENTRY_POINTS = {
    "pretrain": "fedmeta.experiments.pretrain:run",
    "backdoor-rounds": "fedmeta.experiments.backdoor:run_rounds",
    "backdoor-finetune": "fedmeta.experiments.backdoor:run_finetune",
    "defense-finetune": "fedmeta.experiments.backdoor:run_local_defense",
    "defense-comparison": "fedmeta.experiments.comparison:run",
    "backdoor-core": "fedmeta.experiments.core:run",
    "robustness": "fedmeta.experiments.robustness:run",
    "robustness-federated": "fedmeta.experiments.robustness:run_federated",
    "membership": "fedmeta.experiments.membership:run",
}


def get(name: str) -> Experiment:
    """The experiment's entry point (imported lazily, so the CLI starts fast)."""
    module, _, function = ENTRY_POINTS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def check_engine(cfg: Config, engine: str) -> None:
    """Refuse, before any work, an engine (by name) the experiment cannot use: only federations
    have clients to place elsewhere (membership's distributed MAML does not run through the
    federation yet)."""
    if engine != IN_PROCESS.name and not cfg.federated:
        raise ConfigError(f"experiment '{cfg.experiment}' has no federation to distribute: it runs on the in-process "
                          f"engine only (got --engine {engine})")


def run(cfg: Config, out: RunDir, engine: Engine = IN_PROCESS) -> dict[str, Any]:
    """Run ``cfg`` into ``out`` with its clients on ``engine``; returns the summary (also written)."""
    check_engine(cfg, engine.name)
    summary = get(cfg.experiment)(cfg, out, engine)
    summary |= {"engine": engine.name, **getattr(engine, "stats", dict)()}
    out.finish(summary)
    if unscored := summary.get("not_scored"):
        raise RunError(f"{len(unscored)} point(s) not scored, their attack diverged: "
                       + "; ".join(f"{name}: {why}" for name, why in unscored.items())
                       + f" (the other points are in {out.path / RunDir.METRICS})")
    if empty := empty_phases(summary):
        raise RunError(f"no round of {', '.join(empty)} applied any update (every update rejected as non-finite, or "
                       f"missing): its model never trained; the counts are in {out.path / RunDir.SUMMARY}")
    return summary
