"""Named random streams derived from one seed.

Every random choice in fedmeta draws from a ``torch.Generator`` obtained as
``stream(seed, "purpose", ...)``. Streams are independent of each other and of the order in which
they are created, so adding a new random choice somewhere never shifts the numbers of another, and
``--set seed=N`` changes all of them at once.
"""

from __future__ import annotations

import hashlib

import torch


def stream_seed(seed: int, *names: object) -> int:
    """A 63-bit integer seed for the stream named ``names`` under ``seed``."""
    text = "/".join([str(seed), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def stream(seed: int, *names: object) -> torch.Generator:
    """A fresh CPU generator for the stream named ``names`` under ``seed``."""
    return torch.Generator().manual_seed(stream_seed(seed, *names))
