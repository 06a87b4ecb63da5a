"""Shared fixtures: real data from the data root, small models that train in seconds."""

from __future__ import annotations

import contextlib

import pytest
import torch

from fedmeta.data.files import DataError, default_root
from fedmeta.data.omniglot import Omniglot, load_omniglot
from fedmeta.config import MetaConfig
from fedmeta.meta.learner import Maml
from fedmeta.models.conv4 import Conv4
from fedmeta.runs import RunDir


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


@pytest.fixture
def killed_at_checkpoint(monkeypatch):
    """``with killed_at_checkpoint(n): run()``: the run dies at its n-th checkpoint, before writing
    it, as a killed process would (the block expects that); checkpoints work again after it."""

    @contextlib.contextmanager
    def kill(n: int):
        original, calls = RunDir.save_checkpoint, {"n": 0}

        def dying(self, tensors, state):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            original(self, tensors, state)

        monkeypatch.setattr(RunDir, "save_checkpoint", dying)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(RunDir, "save_checkpoint", original)

    return kill


def brief_fomaml(omniglot: Omniglot, iterations: int, gen: torch.Generator):
    """First-order MAML (Conv4-16, 5-way 1-shot) trained ``iterations`` steps on 600 Omniglot
    characters: (learner, params, the 423 unseen characters as a pool)."""
    train = omniglot.pool(torch.arange(0, 600), rotations=True)
    test = omniglot.pool(torch.arange(1200, 1623), rotations=False)
    model = Conv4(1, 28, 5, filters=16)
    cfg = MetaConfig(algorithm="fomaml", shots=1, queries=5, inner_steps=1, inner_lr=0.4, meta_lr=3e-3, meta_batch=8)
    learner = Maml(model, cfg)
    params = model.init(gen)
    state = learner.init_state(params)
    for it in range(iterations):
        params, state, _ = learner.train_step(params, state, learner.sample(train, gen), train.images, gen, it / iterations)
    return learner, params, test
