"""Shared fixtures: real data from the data root, small models that train in seconds."""

from __future__ import annotations

import pytest
import torch

from fedmeta.data.files import DataError, default_root
from fedmeta.data.omniglot import Omniglot, load_omniglot
from fedmeta.models.conv4 import Conv4


@pytest.fixture(scope="session")
def omniglot() -> Omniglot:
    try:
        return load_omniglot()
    except DataError as err:  # pragma: no cover - CI always has ../shared/data
        pytest.skip(f"Omniglot not available: {err}")


@pytest.fixture(scope="session")
def data_root():
    root = default_root()
    if root is None:  # pragma: no cover
        pytest.skip("no data root")
    return root


@pytest.fixture
def tiny() -> Conv4:
    """A Conv4 with 8 filters on 28x28 gray images: the real architecture at a fraction of the cost."""
    return Conv4(in_channels=1, image_size=28, ways=5, filters=8)
