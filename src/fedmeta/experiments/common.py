"""Plumbing shared by the experiments: building the model and learner, and the per-point log line."""

from __future__ import annotations

from typing import Any

from fedmeta.config import Config, ModelConfig
from fedmeta.meta.evaluation import Accuracy
from fedmeta.meta.learner import MetaLearner, make_learner
from fedmeta.models.conv4 import Conv4
from fedmeta.models.mlp import Mlp
from fedmeta.models.protocol import Model
from fedmeta.models.smallconv import SmallConv


def build_model(cfg: ModelConfig, image_shape: tuple[int, int, int], ways: int) -> Model:
    """The configured network for images ``(H, W, C)`` and ``ways`` classes."""
    height, width, channels = image_shape
    if cfg.architecture == "smallconv":
        return SmallConv(channels, height, ways, cfg.filters)
    if cfg.architecture == "mlp":
        return Mlp(height * width * channels, ways, tuple(cfg.hidden))
    return Conv4(channels, height, ways, cfg.filters, cfg.downsample)


def build_learner(cfg: Config, image_shape: tuple[int, int, int]) -> MetaLearner:
    """The configured model for images ``(H, W, C)`` and the meta-learner that trains it."""
    return make_learner(build_model(cfg.model, image_shape, cfg.meta.ways), cfg.meta, cfg.runtime.batched)


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
