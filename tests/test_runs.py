"""Run folders: the files users rely on, and resume after a kill without losing or doubling a line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedmeta.config import load_config
from fedmeta.experiments import run
from fedmeta.runs import RunDir, RunError

TINY = [
    "model.filters=8", "meta.iterations=6", "meta.meta_batch=2", "meta.inner_steps=2", "meta.shots=2",
    "eval.every=2", "eval.episodes_during=3", "eval.episodes=4", "eval.steps=3", "eval.shots=[5, 1]",
]


def _run(path, overrides=()):
    cfg = load_config("omniglot-pretrain-quick", TINY + list(overrides))
    folder = RunDir.open(path, cfg)
    run(cfg, folder)
    return folder


def test_run_folder_has_config_metrics_summary_and_weights(tmp_path, omniglot):
    folder = _run(tmp_path / "a")
    names = {p.name for p in folder.path.iterdir()}
    assert {"config.toml", "metrics.jsonl", "summary.json", "weights.safetensors"} <= names
    assert "checkpoint.safetensors" not in names  # a finished run keeps only its results
    summary = json.loads((folder.path / "summary.json").read_text())
    assert 0.0 <= summary["meta_test_accuracy"] <= 1.0 and summary["eval_mode"] == "non-transductive"
    assert summary["machine"]["cpu"] and summary["machine"]["torch"] == torch.__version__  # where the numbers came from
    records = folder.records()
    assert [r["step"] for r in records if not r.get("final")] == [2, 4, 6]
    assert [r["shots"] for r in records if r.get("final")] == [5, 1]
    assert load_config(str(folder.path / "config.toml")) == load_config("omniglot-pretrain-quick", TINY)


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path, omniglot):
    a, b = _run(tmp_path / "a").records(), _run(tmp_path / "b").records()
    c = _run(tmp_path / "c", ["seed=1"]).records()
    assert a == b and a != c


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, omniglot, killed_at_checkpoint):
    reference = _run(tmp_path / "ref")
    with killed_at_checkpoint(2):  # killed after logging step 4, before its checkpoint
        _run(tmp_path / "killed")
    assert len(RunDir(tmp_path / "killed").records()) == 2  # line of step 4 written, checkpoint of step 2 kept
    resumed = _run(tmp_path / "killed")
    assert resumed.records() == reference.records()
    ours, ref = load_file(str(resumed.path / "weights.safetensors")), load_file(str(reference.path / "weights.safetensors"))
    assert all((ours[k] == ref[k]).all() for k in ref)


def test_finished_or_different_run_folder_is_refused(tmp_path, omniglot):
    _run(tmp_path / "a")
    with pytest.raises(RunError, match="finished run"):
        RunDir.open(tmp_path / "a", load_config("omniglot-pretrain-quick", TINY))
    cfg = load_config("omniglot-pretrain-quick", TINY)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.toml").write_text(load_config("omniglot-pretrain-quick", [*TINY, "seed=5"]).to_toml())
    with pytest.raises(RunError, match=r"different config \(seed differ\)"):
        RunDir.open(tmp_path / "b", cfg)


def test_metric_lines_are_strict_json_with_null_for_values_that_are_not_numbers(tmp_path):
    """Python writes NaN and Infinity as literals no JSON reader outside Python accepts."""
    folder = RunDir.open(tmp_path / "run", load_config("omniglot-pretrain-quick", TINY))
    folder.log({"round": 1, "loss": float("nan"), "losses": {"3": float("-inf"), "4": 0.5}, "acc": [float("inf"), 1]})
    folder.finish({"acc": float("nan")})

    def refuse(name):
        raise ValueError(name)

    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert line == {"round": 1, "loss": None, "losses": {"3": None, "4": 0.5}, "acc": [None, 1]}
    assert json.loads((tmp_path / "run" / "summary.json").read_text(), parse_constant=refuse) == {"acc": None}
