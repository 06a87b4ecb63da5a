"""Experiment families; each is ``run(config, run_dir) -> summary`` selected by ``experiment = ...``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from fedmeta.config import Config
from fedmeta.runs import RunDir

Experiment = Callable[[Config, RunDir], dict[str, Any]]


ENTRY_POINTS = {
    "pretrain": "fedmeta.experiments.pretrain:run",
    "backdoor-rounds": "fedmeta.experiments.backdoor:run_rounds",
    "backdoor-finetune": "fedmeta.experiments.backdoor:run_finetune",
    "defense-finetune": "fedmeta.experiments.defense:run",
    "defense-comparison": "fedmeta.experiments.comparison:run",
    "robustness": "fedmeta.experiments.robustness:run",
    "robustness-federated": "fedmeta.experiments.robustness:run_federated",
    "membership": "fedmeta.experiments.membership:run",
}


def get(name: str) -> Experiment:
    """The experiment's entry point (imported lazily, so the CLI starts fast)."""
    module, _, function = ENTRY_POINTS[name].partition(":")
    return getattr(importlib.import_module(module), function)
