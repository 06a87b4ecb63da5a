"""Fault injection: a run killed by SIGKILL, two runs on one folder or one cache entry, corrupt
files, impossible configs, unusable folders, diverging training. Each must end in an exact resume,
a clear refusal or a rebuild: never a wrong number or a lost metric line."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedmeta.attacks.strategies import AttackerContext
from fedmeta.cli import app
from fedmeta.config import load_config, preset_names
from fedmeta.data.files import cache_dir
from fedmeta.experiments import run
from fedmeta.federation import journal
from fedmeta.federation.client import MetaClient
from fedmeta.federation.journal import Journal, Progress
from fedmeta.federation.updates import ClientUpdate
from fedmeta.meta.adam import AdamState
from fedmeta.meta.learner import Reptile
from fedmeta.runs import RunDir, RunError
from fedmeta.runtime import Diverged
from fedmeta.storage import CorruptFile, cached, read_arrays, read_tensors, write_arrays, write_tensors

FEDERATED = [
    "model.filters=8", "meta.shots=2", "meta.inner_steps=2", "meta.meta_batch=2", "federation.episodes=40",
    "federation.rounds=3", "pretrain.rounds=3", "pretrain.episodes=40", "attacks.boosted.episodes=40",
    "attacks.boosted.inner_epochs=1", "eval.episodes=3", "eval.steps=2", "runtime.threads=1",
]
"""A backdoor run of a few seconds: pre-training, the attack round and three benign rounds."""

CENTRAL = [
    "model.filters=8", "meta.iterations=6", "meta.meta_batch=2", "meta.inner_steps=2", "meta.shots=2",
    "eval.every=2", "eval.episodes_during=3", "eval.episodes=4", "eval.steps=3", "runtime.threads=1",
]


def _cache_with_data(path: Path) -> Path:
    """A fresh cache folder that shares only the decoded Omniglot (so pre-training and the attack
    round are computed, and killed, in it)."""
    path.mkdir(parents=True)
    for entry in cache_dir().glob("omniglot-*.safetensors"):
        (path / entry.name).symlink_to(entry)
    return path


def _command(out: Path) -> list[str]:
    sets = [arg for item in FEDERATED for arg in ("--set", item)]
    return [sys.executable, "-m", "fedmeta.cli", "run", "omniglot-exp1a-quick", "--out", str(out), *sets]


def _start(out: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen(_command(out), env=env, stdout=f, stderr=subprocess.STDOUT)


def _lines(folder: Path) -> int:
    path = folder / RunDir.METRICS
    return path.read_text().count("\n") if path.is_file() else 0


def _wait_until_locked(out: Path, pid: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    lock = out / RunDir.LOCK
    while not (lock.is_file() and f"pid {pid} " in lock.read_text()):
        assert time.monotonic() < deadline, "the run never locked its folder"
        time.sleep(0.05)


def test_sigkill_at_random_points_resumes_exactly_and_a_second_run_on_the_folder_is_refused(
        tmp_path, omniglot, monkeypatch):
    cache = _cache_with_data(tmp_path / "cache-killed")
    env = os.environ | {"FEDMETA_CACHE": str(cache)}
    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    milestones = [  # killed a random fraction of a second after each: in pre-training, around the attack round, later
        lambda: _lines(next(cache.glob("pretrain-*.partial"), cache)) >= 1, lambda: _lines(out) >= 1, lambda: _lines(out) >= 3]
    for attempt, reached in enumerate(milestones):
        process = _start(out, env, tmp_path / f"attempt-{attempt}.log")
        if attempt == 0:  # while it runs, another run on the same folder is refused at once, naming it
            _wait_until_locked(out, process.pid)
            second = _cli(out, FEDERATED, "omniglot-exp1a-quick")
            assert second.exit_code == 2 and f"is in use by pid {process.pid} " in second.output, second.output
        while process.poll() is None and not reached():
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)  # a real kill: no handler, no cleanup
            kills += 1
        process.wait()
    assert kills >= 2
    assert _start(out, env, tmp_path / "last.log").wait() == 0, (tmp_path / "last.log").read_text()[-2000:]

    monkeypatch.setenv("FEDMETA_CACHE", str(_cache_with_data(tmp_path / "cache-reference")))
    cfg = load_config("omniglot-exp1a-quick", FEDERATED)
    run(cfg, RunDir.open(tmp_path / "reference", cfg))
    assert (out / RunDir.METRICS).read_bytes() == (tmp_path / "reference" / RunDir.METRICS).read_bytes()
    ours, reference = (load_file(str(p / "weights-case-a.safetensors")) for p in (out, tmp_path / "reference"))
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def _build_slowly(path: Path, counter: Path) -> None:
    def build() -> np.ndarray:
        time.sleep(1.0)
        with counter.open("a") as f:
            f.write("built\n")
        write_arrays(path, {"array": np.arange(5)})
        return np.arange(5)

    value = cached(path, "test entry", lambda p: read_arrays(p)["array"], build)
    assert (value == np.arange(5)).all()


def test_two_processes_that_need_one_cache_entry_build_it_once(tmp_path):
    context = multiprocessing.get_context("fork")
    path, counter = tmp_path / "entry.safetensors", tmp_path / "builds"
    workers = [context.Process(target=_build_slowly, args=(path, counter)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert counter.read_text() == "built\n"


def test_corrupt_or_truncated_entries_are_detected_and_caches_rebuilt(tmp_path):
    path = tmp_path / "entry.safetensors"
    write_tensors(path, {"w": torch.arange(10.0)}, {"log": [1, 2]})
    tensors, meta = read_tensors(path)
    assert meta == {"log": [1, 2]} and torch.equal(tensors["w"], torch.arange(10.0))
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[-3] ^= 0xFF  # one bit of one weight
    edited = good.replace(b"[1, 2]", b"[7, 2]")  # the progress a checkpoint records, same length
    assert edited != good
    for damaged, reason in ((bytes(flipped), "content sha256"), (good[:-7], "unreadable .* file sha256 [0-9a-f]{64}"),
                            (edited, "metadata sha256")):
        path.write_bytes(damaged)
        with pytest.raises(CorruptFile, match=reason):
            read_tensors(path)
    builds = []

    def build() -> dict:
        builds.append(1)
        write_tensors(path, {"w": torch.arange(10.0)})
        return read_tensors(path)[0]

    assert torch.equal(cached(path, "entry", lambda p: read_tensors(p)[0], build)["w"], torch.arange(10.0))
    assert builds == [1] and read_tensors(path)[0]["w"].sum() == 45  # rebuilt, intact


def test_a_corrupt_checkpoint_is_named_and_never_resumed_from(tmp_path, omniglot, killed_at_checkpoint):
    cfg = load_config("omniglot-pretrain-quick", CENTRAL)
    with killed_at_checkpoint(2):
        run(cfg, RunDir.open(tmp_path / "run", cfg))
    checkpoint = tmp_path / "run" / RunDir.CHECKPOINT
    data = bytearray(checkpoint.read_bytes())
    data[-1] ^= 0xFF
    checkpoint.write_bytes(data)
    result = _cli(tmp_path / "run", CENTRAL)
    assert result.exit_code == 2 and f"corrupt checkpoint {checkpoint}" in result.output
    assert "Traceback" not in result.output


def _cli(out: Path, overrides: list[str], preset: str = "omniglot-pretrain-quick"):
    return CliRunner().invoke(app, ["run", preset, "--out", str(out), *[a for o in overrides for a in ("--set", o)]])


@pytest.mark.parametrize(("override", "message"), [
    ("meta.inner_lr=inf", "meta.inner_lr: Input should be a finite number"),
    ("meta.inner_lr=1e38", "meta.inner_lr: Input should be less than or equal to 10"),
    ("meta.iterations=1e12", "meta.iterations: 1e+12 is beyond any sensible setting"),
    ("eval.ways=2000", "eval.ways: 2000 ways exceed the 423 meta-test classes"),
    ("eval.shots=[5, 25]", "eval.shots + eval.queries: 25 + 1 examples per class in a meta-test episode; its classes have 20"),
    ("meta.ways=5000", "meta.ways: 5000 ways exceed the 4800 meta-training classes"),
    ("model.filters=100000", "model.filters: one step needs at least"),
])
def test_inf_absurd_and_impossible_configs_are_refused_before_any_work(tmp_path, override, message):
    result = _cli(tmp_path / "run", [override])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_impossible_backdoor_layouts_are_refused_with_the_key_and_the_limit(tmp_path):
    for override, message in [("federation.holdout=16", "eval.shots: 5 shots per class in a main-task"),
                              ("attack.backdoor_classes=500", "can reserve 423"),
                              ("attack.attacker_examples=15", "attack.validation_examples: attack.attacker_examples = 15")]:
        result = _cli(tmp_path / "run", [override], "omniglot-exp1a-quick")
        assert result.exit_code == 2 and message in result.output, result.output


def test_every_preset_passes_the_size_checks():
    from fedmeta.sweeps import plan

    for name in preset_names():
        plan(name, [], [], None)  # every cell of a sweep preset


def test_unusable_out_folders_and_caches_are_one_line_errors(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = _cli(foreign, CENTRAL)
    assert result.exit_code == 2 and "holds files fedmeta did not write (notes.txt)" in result.output
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    photos = tmp_path / "photos"  # names a run writes, but no run of fedmeta's: not its to replace or delete
    photos.mkdir()
    for name in ("figure.png", "weights.safetensors", ".draft.tmp"):
        (photos / name).write_text("mine")
    result = _cli(photos, CENTRAL)
    assert result.exit_code == 2 and "holds files fedmeta did not write (.draft.tmp, figure.png" in result.output
    assert sorted(p.name for p in photos.iterdir()) == [".draft.tmp", "figure.png", "weights.safetensors"]
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in _cli(tmp_path / "file", CENTRAL).output
    read_only = _read_only_folder(tmp_path)
    result = _cli(read_only / "run", CENTRAL)
    assert result.exit_code == 2 and str(read_only / "run") in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    monkeypatch.setenv("FEDMETA_CACHE", str(read_only / "cache"))
    result = _cli(tmp_path / "run-no-cache", CENTRAL)
    assert result.exit_code == 2 and f"cannot use the cache folder {read_only / 'cache'}" in result.output
    assert "Traceback" not in result.output


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write (root ignores permission bits: then a read-only sysfs path)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        folder = Path("/sys/fedmeta-read-only")
    return folder


def test_resume_with_changed_evaluation_settings_and_refusal_of_changed_training(tmp_path, omniglot,
                                                                                killed_at_checkpoint):
    cfg = load_config("omniglot-pretrain-quick", CENTRAL)
    with killed_at_checkpoint(2):
        run(cfg, RunDir.open(tmp_path / "run", cfg))
    with pytest.raises(RunError, match=r"different config \(meta.inner_lr differ\)"):
        RunDir.open(tmp_path / "run", load_config("omniglot-pretrain-quick", [*CENTRAL, "meta.inner_lr=0.01"]))
    changed = load_config("omniglot-pretrain-quick", [*CENTRAL, "eval.episodes=6", "runtime.threads=2"])
    folder = RunDir.open(tmp_path / "run", changed)
    run(changed, folder)
    assert (folder.path / RunDir.RESUMES).read_text().count("eval.episodes") == 1
    assert load_config(str(folder.path / RunDir.CONFIG)).eval.episodes == 6


def test_diverging_centralised_training_stops_with_the_iteration(tmp_path, omniglot, monkeypatch):
    original, calls = Reptile.train_step, {"n": 0}

    def step(self, *args):
        params, state, loss = original(self, *args)
        calls["n"] += 1
        return params, state, loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(Reptile, "train_step", step)
    cfg = load_config("omniglot-pretrain-quick", CENTRAL)
    folder = RunDir.open(tmp_path / "run", cfg)
    with pytest.raises(Diverged, match="loss is not finite at iteration 5"):
        run(cfg, folder)
    assert [r["step"] for r in folder.records()] == [2, 4]  # nothing evaluated or checkpointed after it
    assert read_tensors(folder.path / RunDir.CHECKPOINT)[1]["state"]["step"] == 4


def _nan_updates(monkeypatch, users: set[int] | None) -> None:
    """Clients of ``users`` (None: all) send NaN updates, as a diverged local training would."""
    original = MetaClient.update

    def update(self, params, settings):
        good = original(self, params, settings)
        if users is not None and self.user not in users:
            return good
        return ClientUpdate(good.user, {k: v * float("nan") for k, v in good.delta.items()}, good.examples, good.metrics)

    monkeypatch.setattr(MetaClient, "update", update)


def test_rejected_updates_are_counted_per_phase_and_an_all_empty_federation_fails(tmp_path, omniglot, monkeypatch):
    monkeypatch.setenv("FEDMETA_CACHE", str(_cache_with_data(tmp_path / "cache")))
    tiny = [*FEDERATED[:-1], "federation.episodes=4", "pretrain.episodes=4", "attacks.boosted.episodes=4"]
    _nan_updates(monkeypatch, {2})
    cfg = load_config("omniglot-exp1a-quick", tiny)
    summary = run(cfg, RunDir.open(tmp_path / "one", cfg))
    lines = RunDir(tmp_path / "one").records()
    for line in lines[1:]:
        assert line["rejected"] == ([2] if 2 in line["participants"] else [])
        assert sorted(line["aggregated"] + line["rejected"]) == line["participants"]
    fed = summary["federation"]
    assert summary["rejected"] == {p: fed[p]["rejected"] for p in ("pretrain/a", "main/a")} and fed["main/a"]["rejected"] > 0
    assert fed["pretrain/a"]["rounds"] == 3 and fed["main/a"]["rounds"] == 4

    _nan_updates(monkeypatch, None)
    cfg = load_config("omniglot-exp1a-quick", [*tiny, "seed=1"])
    with pytest.raises(RunError, match="no round of pretrain/a, main/a applied any update"):
        run(cfg, RunDir.open(tmp_path / "all", cfg))
    assert RunDir(tmp_path / "all").records()[-1]["aggregated"] == []


def test_a_corrupt_pretraining_checkpoint_in_the_cache_restarts_that_entry(tmp_path, omniglot, monkeypatch,
                                                                          killed_at_checkpoint):
    tiny = [*FEDERATED[:-1], "federation.episodes=4", "pretrain.episodes=4", "attacks.boosted.episodes=4",
            "federation.rounds=1"]
    cfg = load_config("omniglot-exp1a-quick", tiny)
    cache = _cache_with_data(tmp_path / "cache")
    monkeypatch.setenv("FEDMETA_CACHE", str(cache))
    with killed_at_checkpoint(2):  # in pre-training, after its first round's checkpoint
        run(cfg, RunDir.open(tmp_path / "run", cfg))
    checkpoint = next(cache.glob("pretrain-*.partial")) / RunDir.CHECKPOINT
    checkpoint.write_bytes(checkpoint.read_bytes()[:-5])  # truncated
    run(cfg, RunDir.open(tmp_path / "run", cfg))
    monkeypatch.setenv("FEDMETA_CACHE", str(_cache_with_data(tmp_path / "cache-reference")))
    run(cfg, RunDir.open(tmp_path / "reference", cfg))
    assert RunDir(tmp_path / "run").records() == RunDir(tmp_path / "reference").records()


def test_a_run_killed_inside_the_attackers_long_update_goes_on_from_its_last_save(tmp_path, omniglot, monkeypatch,
                                                                                   capsys):
    """The attack round keeps a journal while it trains: a run killed in the middle of the
    attacker's one update resumes it from the last save, not from its first step, and ends with the
    metrics and weights of a run never killed; the journal goes once the round is cached."""
    monkeypatch.setattr(journal, "SAVE_EVERY", 0.0)  # a save after every outer step
    tiny = [*FEDERATED[:-1], "federation.episodes=4", "pretrain.episodes=4", "attacks.boosted.episodes=12",
            "federation.rounds=1"]  # the attacker (user 0): 12 episodes / meta-batch 2 = 6 outer steps
    cfg = load_config("omniglot-exp1a-quick", tiny)
    steps: list[int] = []  # one per outer step the attacker trains (its sampler is called once a step)
    poisoned, tick = AttackerContext.poisoned, Journal.tick
    monkeypatch.setattr(AttackerContext, "poisoned", lambda self, gen: steps.append(1) or poisoned(self, gen))

    def dying(self: Journal, progress: Progress, gen: torch.Generator) -> None:
        if self.path.name.endswith("-user-0.safetensors") and progress.step == 3:
            raise KeyboardInterrupt  # killed after its third step, before saving it: steps 1 and 2 are saved
        tick(self, progress, gen)

    cache = _cache_with_data(tmp_path / "cache")
    monkeypatch.setenv("FEDMETA_CACHE", str(cache))
    monkeypatch.setattr(Journal, "tick", dying)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, RunDir.open(tmp_path / "run", cfg))
    assert len(steps) == 3 and len(list(cache.glob("attack-*.partial/*-user-0.safetensors"))) == 1
    monkeypatch.setattr(Journal, "tick", tick)
    steps.clear()
    run(cfg, RunDir.open(tmp_path / "run", cfg))
    assert len(steps) == 4  # steps 3 to 6
    assert "resuming the update at step 2 of 6" in capsys.readouterr().out
    assert not list(cache.glob("*.partial"))

    monkeypatch.setenv("FEDMETA_CACHE", str(_cache_with_data(tmp_path / "cache-reference")))
    run(cfg, RunDir.open(tmp_path / "reference", cfg))
    assert RunDir(tmp_path / "run").records() == RunDir(tmp_path / "reference").records()
    ours, reference = (load_file(str(tmp_path / p / "weights-case-a.safetensors")) for p in ("run", "reference"))
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_a_damaged_or_foreign_journal_save_is_named_and_the_update_starts_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(journal, "SAVE_EVERY", 0.0)
    params = {"w": torch.arange(4.0)}
    saved = Journal.of(tmp_path, user=3, phase="main/benign-estimate-0", round_=1, steps=5)
    assert saved.path.parent == tmp_path and "/" not in saved.path.name
    gen = torch.Generator().manual_seed(0)
    saved.tick(Progress(2, params, AdamState.zeros(list(params.values())), torch.tensor(1.5)), gen)
    resumed = Journal(saved.path, 5).resume({"w": torch.zeros(4)}, torch.Generator())
    assert resumed.step == 2 and torch.equal(resumed.params["w"], params["w"]) and float(resumed.loss_sum) == 1.5
    assert Journal(saved.path, 6).resume(params, torch.Generator()) is None  # an update of another length
    saved.path.write_bytes(saved.path.read_bytes()[:-5])
    assert Journal(saved.path, 5).resume(params, torch.Generator()) is None
    out = capsys.readouterr().out
    assert "saved an update of 5 steps, not 6" in out and f"starting the update again: {saved.path}" in out
