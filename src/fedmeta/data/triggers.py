"""Backdoor keys: named visual patterns stamped onto uint8 images.

The paper does not give its key's exact pattern, so the common ones from the backdoor literature
are offered (registered in ``TRIGGERS``: a new pattern is a function of ``(rows, cols)`` that
returns the stamp's intensities, or of the image shape for a whole-image pattern), each with a
size, a place and an opacity:

- ``patch``: a solid square of full intensity (BadNets);
- ``checker``: a square checkerboard of full and zero intensity, visible on any background;
- ``line``: a thin line (``thickness`` pixels) of length ``size``;
- ``blend``: a seeded random pattern over the whole image, mixed in at ``opacity`` (Chen et al.,
  2017, "blended injection"); ``size`` and ``position`` do not apply;
- ``dba``: the distributed backdoor's global trigger (Xie et al., ICLR 2020; reference code
  ``AI-secure/DBA``, ``utils/cifar_params.yaml``: "gap 3 size 1*6", ``utils/mnist_params.yaml``:
  "gap 2 size 1*4"): four lines of ``size`` x ``thickness`` pixels, two side by side in each of
  two rows, ``gap`` pixels apart, so that ``Trigger.split(4)`` gives the reference's four separated
  local triggers (``split(2)``: its two rows of lines).

A trigger is a mask ``m`` in [0, 1] and a pattern ``p``; a keyed image is
``(1 - opacity * m) * x + opacity * m * p``, rounded back to uint8. ``Trigger.split`` cuts one
into disjoint local triggers (the distributed backdoor, DBA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fedmeta.registry import TRIGGERS

Position = Literal["bottom-right", "bottom-left", "top-right", "top-left", "center"]


@dataclass(frozen=True)
class Trigger:
    mask: Tensor  # float [H, W, 1] in [0, 1]
    pattern: Tensor  # float [H, W, C] in [0, 255]
    opacity: float

    def apply(self, images: Tensor) -> Tensor:
        """Keyed copies of uint8 images ``[..., H, W, C]``."""
        alpha = self.opacity * self.mask
        keyed = (1.0 - alpha) * images.float() + alpha * self.pattern
        return keyed.round_().clamp_(0, 255).to(torch.uint8)

    def split(self, parts: int) -> list[Trigger]:
        """The trigger cut into ``parts`` local triggers for DBA (Xie et al., ICLR 2020): its
        pixels in raster order, in ``parts`` contiguous runs of near-equal length (a square patch
        becomes stripes when ``parts`` divides its rows, else runs that straddle rows; a line
        segments; a whole-image blend bands), adjacent unless the trigger has gaps (``dba``: its
        lines). The parts' masks are disjoint and add up to the whole mask; each keeps the pattern
        and opacity."""
        where = self.mask.flatten().nonzero().flatten()
        if not 1 <= parts <= len(where):
            raise ValueError(f"cannot split a trigger of {len(where)} pixels into {parts} parts")
        pieces = []
        for run in where.tensor_split(parts):
            mask = torch.zeros_like(self.mask)
            mask.view(-1)[run] = self.mask.view(-1)[run]
            pieces.append(Trigger(mask, self.pattern, self.opacity))
        return pieces


Stamp = Callable[[int, int], Tensor]
"""``(rows, cols) -> [rows, cols]`` intensities in [0, 255] of a pattern stamped at a position."""


@TRIGGERS.register("patch")
def patch(rows: int, cols: int) -> Tensor:
    """A solid square of full intensity (BadNets)."""
    return torch.full((rows, cols), 255.0)


@TRIGGERS.register("checker")
def checker(rows: int, cols: int) -> Tensor:
    """A checkerboard of full and zero intensity, visible on any background."""
    return 255.0 * ((torch.arange(rows)[:, None] + torch.arange(cols)[None, :]) % 2 == 0).float()


@TRIGGERS.register("line", shape="line")
def line(rows: int, cols: int) -> Tensor:
    """A line of full intensity, ``thickness`` pixels wide and ``size`` long."""
    return torch.full((rows, cols), 255.0)


DBA_GAP = 3
"""Pixels between the ``dba`` trigger's lines, across and down, by default (the DBA reference's on CIFAR)."""


@TRIGGERS.register("dba", shape="dba")
def dba(rows: int, cols: int, gap: int = DBA_GAP) -> Tensor:
    """Four lines of full intensity in a ``rows`` x ``cols`` box, ``gap`` apart: its mask."""
    thickness, size = (rows - gap) // 2, (cols - gap) // 2
    stamp = torch.zeros(rows, cols)
    for top in (0, thickness + gap):
        for left in (0, size + gap):
            stamp[top : top + thickness, left : left + size] = 255.0
    return stamp


@TRIGGERS.register("blend", whole_image=True)
def blend(shape: tuple[int, int, int], gen: torch.Generator | None) -> Tensor:
    """A seeded random pattern over the whole image, mixed in at ``opacity`` (Chen et al., 2017)."""
    return torch.randint(0, 256, shape, generator=gen).float()


def make_trigger(
    pattern: str,
    image_shape: tuple[int, int, int],
    *,
    size: int = 4,
    position: Position = "bottom-right",
    opacity: float = 1.0,
    thickness: int = 1,
    gap: int = DBA_GAP,
    margin: int = 1,
    gen: torch.Generator | None = None,
) -> Trigger:
    """A trigger for images of shape (H, W, C); ``margin`` pixels from the border; ``gap``: dba's."""
    height, width, channels = image_shape
    entry = TRIGGERS.get(pattern)
    if entry.info.get("whole_image"):
        return Trigger(torch.ones(height, width, 1), entry.factory(image_shape, gen), opacity)
    shape = entry.info.get("shape")
    boxes = {"line": (thickness, size), "dba": (2 * thickness + gap, 2 * size + gap)}
    rows, cols = boxes.get(shape, (size, size))
    if max(rows, cols) + margin > min(height, width):
        raise ValueError(f"a {rows}x{cols}-pixel trigger does not fit a {height}x{width} image")
    top, left = _place(position, (height, width), (rows, cols), margin)
    stamp = entry.factory(rows, cols, gap) if shape == "dba" else entry.factory(rows, cols)
    mask = torch.zeros(height, width, 1)  # dba keys its lines only: the gaps between them keep the image
    mask[top : top + rows, left : left + cols] = (stamp > 0).float()[..., None] if shape == "dba" else 1.0
    full = torch.zeros(height, width, channels)
    full[top : top + rows, left : left + cols] = stamp[..., None]
    return Trigger(mask, full, opacity)


def _place(position: Position, image: tuple[int, int], box: tuple[int, int], margin: int) -> tuple[int, int]:
    (height, width), (rows, cols) = image, box
    if position == "center":
        return (height - rows) // 2, (width - cols) // 2
    top = margin if position.startswith("top") else height - rows - margin
    left = margin if position.endswith("left") else width - cols - margin
    return top, left
