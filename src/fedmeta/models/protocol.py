"""What meta-learners and attacks need from a model: a parameter dict and a pure forward pass."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from fedmeta.models.conv4 import Params


class Model(Protocol):
    """A network as pure functions: ``init`` draws a parameter dict, calling it gives logits.

    ``Conv4``, ``SmallConv`` and ``Mlp`` all satisfy it; MAML and the gradient-inversion attack
    only ever call ``model(params, x)``, so any of them can be meta-trained and attacked.
    """

    ways: int

    def init(self, gen: torch.Generator) -> Params: ...

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        """Logits ``[N, ways]`` of images ``[N, C, H, W]``."""
        ...
