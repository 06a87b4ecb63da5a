"""Plumbing shared by the experiments: building the model and learner, and the per-point log line."""

from __future__ import annotations

from typing import Any

from fedmeta.config import Config
from fedmeta.meta.evaluation import Accuracy
from fedmeta.meta.learner import MetaLearner, make_learner
from fedmeta.models.conv4 import Conv4


def build_model(cfg: Config, image_shape: tuple[int, int, int]) -> Conv4:
    """The configured Conv4 for images ``(H, W, C)``."""
    height, _, channels = image_shape
    return Conv4(channels, height, cfg.meta.ways, cfg.model.filters, cfg.model.downsample)


def build_learner(cfg: Config, image_shape: tuple[int, int, int]) -> MetaLearner:
    """The configured Conv4 and the meta-learner that trains it."""
    return make_learner(build_model(cfg, image_shape), cfg.meta, cfg.runtime.batched)


def accuracy_fields(name: str, acc: Accuracy) -> dict[str, Any]:
    """``{name: mean, name_ci95: half-width}`` for a metrics line."""
    return {name: round(acc.mean, 6), f"{name}_ci95": round(acc.ci95, 6)}


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_record(record: dict[str, Any], keys: list[str]) -> str:
    """One log line: the position, then each accuracy as a percentage with its interval."""
    where = " ".join(f"{k} {record[k]}" for k in ("learner", "case", "user", "round", "step") if k in record)
    parts = []
    for key in keys:
        if key in record:
            ci = record.get(f"{key}_ci95")
            parts.append(f"{key} {100 * record[key]:.2f}%" + (f" ±{100 * ci:.2f}" if ci is not None else ""))
    return f"[{where}] " + " | ".join(parts)
