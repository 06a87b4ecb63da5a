"""The pruning half of fine-pruning (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks", RAID 2018), as pure functions over a parameter dict.

A backdoor tends to live in neurons that clean inputs leave dormant: the trigger switches them
on. The defender runs clean inputs through the network, averages the activation of each channel of
the last convolutional layer (over images and positions), and prunes channels in increasing order
of that average (Sec. 4.2); then it fine-tunes on clean data (Sec. 4.3, ``experiments.fine_pruning``).
The paper prunes until clean validation accuracy has dropped by a set margin (4%); here the
fraction of channels pruned is the setting.

Pruning a channel zeroes its filter and its BatchNorm scale and shift (Conv4), so it outputs 0 on
every input. Its gradients are then exactly 0 as well (the ReLU's derivative at 0 is 0 in PyTorch,
and the head reads zeros from it), so Adam fine-tuning leaves it at 0: the channel is gone, as if
removed from the network.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor

from fedmeta.models.conv4 import Conv4, Params

_CONV = re.compile(r"trunk\.(\d+)\.conv\.weight")


def last_conv(params: Params) -> str:
    """The key prefix (``trunk.3.``) of the last convolutional block of ``params``."""
    blocks = [int(m.group(1)) for k in params if (m := _CONV.fullmatch(k))]
    if not blocks:
        raise ValueError("fine-pruning needs a convolutional trunk (model.architecture = 'conv4')")
    return f"trunk.{max(blocks)}."


def channel_activations(model: Conv4, params: Params, batches: Iterable[Tensor]) -> Tensor:
    """Mean activation of each channel of the last convolutional block (its output: after
    BatchNorm, ReLU and pooling) over ``batches`` of clean images ``[N, C, H, W]``; each batch runs
    as one (BatchNorm normalises with its statistics), and every batch counts the same."""
    channels = params[last_conv(params) + "conv.weight"].shape[0]
    with torch.no_grad():
        means = [model.trunk(params, x).view(len(x), channels, -1).mean(dim=(0, 2)) for x in batches]
    return torch.stack(means).mean(dim=0)


def dormant_channels(activations: Tensor, fraction: float) -> Tensor:
    """The ``floor(fraction * C)`` channels with the smallest mean activation (ties: the lower
    index first), sorted; the product is rounded to 6 decimals first, so 0.29 of 100 is 29."""
    count = int(round(fraction * len(activations), 6))
    return torch.argsort(activations, stable=True)[:count].sort().values


def prune(params: Params, channels: Tensor) -> Params:
    """A copy of ``params`` with ``channels`` of the last convolutional block zeroed (the filter,
    and BatchNorm's scale and shift: every tensor of the block indexed by output channel)."""
    prefix = last_conv(params)
    return {k: v.index_fill(0, channels.to(v.device), 0.0) if k.startswith(prefix) else v for k, v in params.items()}
