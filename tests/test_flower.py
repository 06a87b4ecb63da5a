"""The Flower engine: same experiment, same global model, same metrics as the in-process run."""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("flwr") is None:
    pytest.skip("the Flower tests need fedmeta[flower]", allow_module_level=True)

from fedmeta.config import load_config  # noqa: E402
from fedmeta.experiments import get  # noqa: E402
from fedmeta.federation import flower  # noqa: E402
from fedmeta.runs import RunDir  # noqa: E402

TINY = [
    "model.filters=8", "meta.shots=2", "meta.inner_steps=2", "meta.meta_batch=2", "federation.episodes=4",
    "federation.rounds=2", "pretrain.rounds=1", "pretrain.episodes=4", "attack.episodes=4", "attack.inner_epochs=1",
    "eval.episodes=3", "eval.steps=2", "runtime.threads=1",
]


def _recording(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Global weights at every checkpoint (after round 0, 1, ...), in the process that runs the server."""
    seen: list[dict[str, torch.Tensor]] = []
    original = RunDir.save_checkpoint

    def save(self, tensors, state):
        seen.append({k: v.clone() for k, v in tensors.items()})
        original(self, tensors, state)

    monkeypatch.setattr(RunDir, "save_checkpoint", save)
    return seen


def test_flower_simulation_equals_in_process_run(tmp_path, omniglot, monkeypatch):
    cfg = load_config("omniglot-exp1a-quick", TINY)
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache-local"))
    seen = _recording(monkeypatch)
    folder = RunDir.open(tmp_path / "local", cfg)
    folder.finish(get(cfg.experiment)(cfg, folder))

    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache-flower"))  # pre-training runs on Flower too
    local = list(seen)
    seen.clear()
    summary = flower.simulate(cfg, tmp_path / "flower", actors=2)
    remote = list(seen)

    assert len(remote) == len(local) == 1 + cfg.federation.rounds + 1  # round 0, the attack round, benign rounds
    for ours, theirs in zip(local, remote, strict=True):
        for name in ours:
            torch.testing.assert_close(theirs[name], ours[name], rtol=1e-5, atol=1e-6)
    records = RunDir(tmp_path / "flower").records()
    expected = folder.records()
    assert [sorted(r) for r in records] == [sorted(r) for r in expected]  # the same metric names
    assert [r["participants"] for r in records[1:]] == [r["participants"] for r in expected[1:]]
    assert 0 in records[1]["participants"]  # the attacker, in round 1
    for ours, theirs in zip(expected, records, strict=True):
        for name in ("meta_test_accuracy", "attack_train_accuracy", "attack_val_accuracy"):
            assert theirs[name] == pytest.approx(ours[name], abs=1e-6)
    assert summary["experiment"] == "backdoor-rounds"
