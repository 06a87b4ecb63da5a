"""Conv4, the few-shot backbone of MAML and Reptile, as pure functions over a parameter dict.

Four blocks of [3x3 conv, BatchNorm, ReLU, 2x2 max-pool] (or, in supervised-reptile's Omniglot
variant, a stride-2 conv instead of the pool), then a linear head. ReLU and max-pool commute, so
the ReLU runs on the pooled map: the same function on a quarter of the elements (5-11% faster per
inner step here). Two details matter:

- BatchNorm always normalises with the statistics of the current batch (no running averages), as
  in MAML and Reptile; evaluation is then transductive or not depending on what shares a batch.
- The convolutions have no bias: BatchNorm removes it, so its true gradient is zero, and Adam would
  turn the round-off in that zero into full-size steps.

The trunk (everything but the head) is the embedding that the matching-network defense reuses.
Parameters live in a plain ``dict[str, Tensor]`` so meta-learners can clone, average, stack (for
``torch.func.vmap``) and serialise them without touching a module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Params = dict[str, Tensor]
BLOCKS = 4
BN_EPS = 1e-3  # TensorFlow's default, as in supervised-reptile


@dataclass(frozen=True)
class Conv4:
    in_channels: int
    image_size: int
    ways: int
    filters: int = 64
    downsample: Literal["maxpool", "stride"] = "maxpool"

    @property
    def feature_dim(self) -> int:
        size = self.image_size
        for _ in range(BLOCKS):
            size = (size + 1) // 2 if self.downsample == "stride" else size // 2
        return self.filters * size * size

    def init(self, gen: torch.Generator) -> Params:
        """Glorot-uniform weights (TensorFlow's default, used by the reference code), BN at identity."""
        params: Params = {}
        cin = self.in_channels
        for i in range(BLOCKS):
            params[f"trunk.{i}.conv.weight"] = glorot((self.filters, cin, 3, 3), gen)
            params[f"trunk.{i}.bn.weight"] = torch.ones(self.filters)
            params[f"trunk.{i}.bn.bias"] = torch.zeros(self.filters)
            cin = self.filters
        params.update(self.init_head(gen))
        return params

    def init_head(self, gen: torch.Generator) -> Params:
        return {"head.weight": glorot((self.ways, self.feature_dim), gen), "head.bias": torch.zeros(self.ways)}

    def trunk(self, params: Params, x: Tensor) -> Tensor:
        """Embeddings ``[N, feature_dim]`` of images ``[N, C, H, W]`` (run channels-last)."""
        stride = 2 if self.downsample == "stride" else 1
        x = channels_last(x)
        for i in range(BLOCKS):
            x = F.conv2d(x, params[f"trunk.{i}.conv.weight"], stride=stride, padding=1)
            x = F.batch_norm(
                x, None, None, params[f"trunk.{i}.bn.weight"], params[f"trunk.{i}.bn.bias"], training=True, eps=BN_EPS
            )
            if self.downsample == "maxpool":
                x = F.max_pool2d(x, 2)
            x = F.relu(x)
        return x.flatten(1)

    def head(self, params: Params, features: Tensor) -> Tensor:
        return F.linear(features, params["head.weight"], params["head.bias"])

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        """Logits ``[N, ways]``."""
        return self.head(params, self.trunk(params, x))


def channels_last(x: Tensor) -> Tensor:
    """Images ``[N, C, H, W]`` with NHWC strides, the layout oneDNN's CPU kernels and cuDNN's NHWC
    kernels run fastest on (a no-op for images that have it, as ``gather`` makes them).

    Why by hand for one channel: ``contiguous(memory_format=torch.channels_last)`` leaves a
    one-channel tensor's NCHW strides as they are (with C = 1 both layouts count as contiguous),
    and a convolution then writes NCHW maps, on which max-pool is about 15x slower (Omniglot's first
    block: 3.5 ms against 0.23 ms per 10 images, 1 thread). ``torch.cat`` of images makes such
    tensors. For C = 1 the NHWC strides describe the same memory, so this is a view.
    """
    if x.shape[1] != 1:
        return x.contiguous(memory_format=torch.channels_last)
    x = x.contiguous()
    return x.as_strided(x.shape, (x.shape[2] * x.shape[3], 1, x.shape[3], 1))


def glorot(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Glorot (Xavier) uniform initialisation with an explicit generator."""
    receptive = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return torch.empty(shape).uniform_(-limit, limit, generator=gen)


def trunk_params(params: Params) -> Params:
    return {k: v for k, v in params.items() if k.startswith("trunk.")}
