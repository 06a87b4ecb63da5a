"""The small convolutional net of MAML on MNIST-like data: Conv4 without normalisation.

Four blocks of [3x3 conv with bias, ReLU, 2x2 max-pool], then a linear head: the trunk of Finn et
al.'s MAML (cbfinn/maml, 32 filters, max-pool) without BatchNorm. On 28x28 images the maps shrink
14 -> 7 -> 3 -> 1, so the head sees ``filters`` features.

Why no normalisation: with batch statistics one example's output depends on every other example
of its batch, so the gradient a task learner shares mixes all its examples through the
statistics. Without them the shared gradient is a plain function of each example, the setting in
which gradient inversion is studied (DLG, Inverting Gradients) and in which "a member reproduces
the observed gradient exactly" holds. As in ``Conv4``, ReLU runs after the pool (they commute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmeta.models.conv4 import BLOCKS, Params, channels_last, glorot


@dataclass(frozen=True)
class SmallConv:
    in_channels: int
    image_size: int
    ways: int
    filters: int = 32

    @property
    def feature_dim(self) -> int:
        return self.filters * (self.image_size // 2**BLOCKS) ** 2

    def init(self, gen: torch.Generator) -> Params:
        """Glorot-uniform weights, zero biases."""
        params: Params = {}
        cin = self.in_channels
        for i in range(BLOCKS):
            params[f"trunk.{i}.conv.weight"] = glorot((self.filters, cin, 3, 3), gen)
            params[f"trunk.{i}.conv.bias"] = torch.zeros(self.filters)
            cin = self.filters
        params["head.weight"] = glorot((self.ways, self.feature_dim), gen)
        params["head.bias"] = torch.zeros(self.ways)
        return params

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        """Logits ``[N, ways]`` of images ``[N, C, H, W]`` (run channels-last)."""
        x = channels_last(x)
        for i in range(BLOCKS):
            x = F.conv2d(x, params[f"trunk.{i}.conv.weight"], params[f"trunk.{i}.conv.bias"], padding=1)
            x = F.relu(F.max_pool2d(x, 2))
        return F.linear(x.flatten(1), params["head.weight"], params["head.bias"])
