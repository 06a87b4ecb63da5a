"""The configured network for a dataset's images."""

from __future__ import annotations

from fedmeta.config.sections import ModelConfig
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
