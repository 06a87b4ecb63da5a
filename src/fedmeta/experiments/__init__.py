"""Experiment families; each is ``run(config, run_dir) -> summary`` selected by ``experiment = ...``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedmeta.config import Config
from fedmeta.runs import RunDir

Experiment = Callable[[Config, RunDir], dict[str, Any]]


def get(name: str) -> Experiment:
    """The experiment's entry point (imported lazily, so the CLI starts fast)."""
    if name == "pretrain":
        from fedmeta.experiments.pretrain import run

        return run
    if name in ("backdoor-rounds", "backdoor-finetune"):
        from fedmeta.experiments.backdoor import run_finetune, run_rounds

        return run_rounds if name == "backdoor-rounds" else run_finetune
    if name == "membership":
        from fedmeta.experiments.membership import run

        return run
    raise KeyError(name)
