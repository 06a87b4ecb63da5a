"""A fully connected network: the architecture family of the paper's Proposition 3.1.

The proposition concerns a biased fully connected layer preceded by another fully connected
layer; in plain federated learning such a layer gives its input away analytically (weight
gradient / bias gradient), while under MAML the inner-loop Hessian mixes the support set into
every coordinate. Offering the MLP beside the convolutional nets lets a study compare how much each
architecture leaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmeta.models.conv4 import Params, glorot


@dataclass(frozen=True)
class Mlp:
    inputs: int
    ways: int
    hidden: tuple[int, ...] = (128, 64)

    def init(self, gen: torch.Generator) -> Params:
        """Glorot-uniform weights, zero biases."""
        params: Params = {}
        widths = (self.inputs, *self.hidden, self.ways)
        names = [f"hidden.{i}" for i in range(len(self.hidden))] + ["head"]
        for name, fan_in, fan_out in zip(names, widths[:-1], widths[1:]):
            params[f"{name}.weight"] = glorot((fan_out, fan_in), gen)
            params[f"{name}.bias"] = torch.zeros(fan_out)
        return params

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        """Logits ``[N, ways]`` of images ``[N, C, H, W]`` (flattened)."""
        x = x.flatten(1)
        for i in range(len(self.hidden)):
            x = F.relu(F.linear(x, params[f"hidden.{i}.weight"], params[f"hidden.{i}.bias"]))
        return F.linear(x, params["head.weight"], params["head.bias"])
