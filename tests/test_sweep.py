"""Sweeps: one run folder per cell of grid x seeds, the same numbers wherever a cell runs, resume
after a kill, and bad input refused before any cell starts."""

from __future__ import annotations

import time

import pytest

from fedmeta.config import ConfigError
from fedmeta.reports import write_report
from fedmeta.runs import RunError
from fedmeta.sweeps import InProcess, LocalPool, RayCluster, plan, run_sweep, split_values
from fedmeta.sweeps.executors import connect
from fedmeta.sweeps.grid import _slug

TINY = [
    "model.filters=8", "meta.iterations=6", "meta.meta_batch=2", "meta.inner_steps=2", "meta.shots=2",
    "eval.every=2", "eval.episodes_during=3", "eval.episodes=4", "eval.steps=3", "eval.shots=[5, 1]",
    "runtime.threads=1",
]
GRID = ["meta.inner_lr=0.001,0.01"]
CELLS = ["meta.inner_lr=0.001__seed=0", "meta.inner_lr=0.001__seed=1",
         "meta.inner_lr=0.01__seed=0", "meta.inner_lr=0.01__seed=1"]


def _plan(grid=GRID, seeds=2, extra=()):
    return plan("omniglot-pretrain-quick", [*TINY, *extra], list(grid), seeds)


def _metrics(folder):
    return {name: (folder / name / "metrics.jsonl").read_bytes() for name in CELLS}


def test_same_metrics_in_process_with_workers_and_on_ray(tmp_path, omniglot):
    ray = pytest.importorskip("ray")
    sweep = _plan()
    assert [c.name for c in sweep.cells] == CELLS
    local = run_sweep(sweep, tmp_path / "local", InProcess())
    assert local.done == CELLS and not local.failed
    assert run_sweep(sweep, tmp_path / "pool", LocalPool(2)).done and _metrics(tmp_path / "pool") == _metrics(tmp_path / "local")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert not run_sweep(sweep, tmp_path / "ray", RayCluster(None)).failed
    finally:
        ray.shutdown()
    assert _metrics(tmp_path / "ray") == _metrics(tmp_path / "local")
    again = run_sweep(sweep, tmp_path / "local", InProcess())  # everything finished: nothing runs
    assert again.skipped == CELLS and not again.done


def test_killed_sweep_resumes_to_the_same_table(tmp_path, omniglot, killed_at_checkpoint):
    sweep = _plan(seeds=1)
    run_sweep(sweep, tmp_path / "ref", InProcess())
    told = []  # what ``finished`` heard: the cell that finished before the kill, not the one killed
    with killed_at_checkpoint(5):  # cell 1 finished (3 checkpoints), cell 2 killed at its 2nd
        run_sweep(sweep, tmp_path / "killed", InProcess(), finished=told.append)
    names = [c.name for c in sweep.cells]
    assert told == names[:1]
    assert (tmp_path / "killed" / names[0] / "summary.json").is_file()
    assert not (tmp_path / "killed" / names[1] / "summary.json").is_file()
    resumed = run_sweep(sweep, tmp_path / "killed", InProcess(), finished=told.append)
    assert resumed.skipped == names[:1] and resumed.done == names[1:] == told[1:]
    write_report([tmp_path / "ref"], tmp_path / "ref-report")
    write_report([tmp_path / "killed"], tmp_path / "killed-report")
    assert (tmp_path / "killed-report" / "table.csv").read_text() == (tmp_path / "ref-report" / "table.csv").read_text()
    assert (tmp_path / "killed-report" / "curves.csv").read_text() == (tmp_path / "ref-report" / "curves.csv").read_text()


def test_sweep_keep_copies_each_finished_cell_without_weights(tmp_path, omniglot):
    """``fedmeta sweep --keep DEST``: DEST holds what a report reads of every finished cell."""
    from typer.testing import CliRunner

    from fedmeta.cli import app

    args = ["sweep", "omniglot-pretrain-quick", "--out", str(tmp_path / "s"), "--keep", str(tmp_path / "kept")]
    result = CliRunner().invoke(app, [*args, *(a for o in TINY for a in ("--set", o))])
    assert result.exit_code == 0, result.output
    cell = tmp_path / "kept" / "seed=0"
    assert sorted(p.name for p in cell.iterdir()) == ["config.toml", "metrics.jsonl", "summary.json"]
    assert (cell / "metrics.jsonl").read_bytes() == (tmp_path / "s" / "seed=0" / "metrics.jsonl").read_bytes()
    assert (tmp_path / "kept" / "sweep.json").is_file()
    assert (tmp_path / "s" / "seed=0" / "weights.safetensors").is_file()  # the run has weights; the copy has none
    again = [*args[:-1], str(tmp_path / "again")]  # every cell finished before: copied once at the end
    assert CliRunner().invoke(app, [*again, *(a for o in TINY for a in ("--set", o))]).exit_code == 0
    assert (tmp_path / "again" / "seed=0" / "metrics.jsonl").read_bytes() == (cell / "metrics.jsonl").read_bytes()


def test_sweep_refuses_a_keep_folder_of_something_else_before_its_first_cell(tmp_path):
    """A ``--keep`` folder that holds another keep would fail the copy after the first cell's hours:
    named before any cell runs, and the sweep folder not even created."""
    from typer.testing import CliRunner

    from fedmeta.cli import app

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "base.toml").write_text('experiment = "pretrain"\nseed = 7\n')
    args = ["sweep", "omniglot-pretrain-quick", "--out", str(tmp_path / "s"), "--keep", str(kept)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "holds files but not an earlier keep of the sweep" in result.output
    assert not (tmp_path / "s").exists() and sorted(p.name for p in kept.iterdir()) == ["base.toml"]


def test_a_cell_that_wrote_its_summary_and_then_failed_is_kept(tmp_path, monkeypatch, omniglot):
    """A run that writes its summary and then exits with an error (a membership point not scored)
    holds numbers a report reads: ``--keep`` hears of it like a finished cell, and the sweep lists
    it as failed."""
    from fedmeta import experiments

    monkeypatch.setattr(experiments, "get", lambda name: lambda cfg, out, engine: {"not_scored": {"point": "why"}})
    told = []
    result = run_sweep(_plan(grid=(), seeds=1), tmp_path / "sweep", InProcess(), finished=told.append)
    (name,) = result.failed
    assert "1 point(s) not scored" in result.failed[name] and told == [name]


def test_a_failing_cell_is_reported_and_the_others_go_on(tmp_path, omniglot):
    sweep = _plan(seeds=1)
    blocked = tmp_path / "sweep" / sweep.cells[0].name
    blocked.mkdir(parents=True)
    (tmp_path / "sweep" / "base.toml").write_text(sweep.base.to_toml())
    (blocked / "notes.txt").write_text("not a run folder")  # RunDir refuses a folder with foreign files
    result = run_sweep(sweep, tmp_path / "sweep", InProcess())
    assert list(result.failed) == [sweep.cells[0].name] and "notes.txt" in result.failed[sweep.cells[0].name]
    assert result.done == [sweep.cells[1].name]


def test_grid_values_split_outside_brackets_and_quotes():
    assert split_values("0.001, 0.01") == ["0.001", "0.01"]
    assert split_values('[5, 1],[1]') == ["[5, 1]", "[1]"]
    assert split_values('"a,b",{x = 1, y = 2}') == ['"a,b"', "{x = 1, y = 2}"]
    names = [c.name for c in _plan(grid=["eval.shots=[5, 1],[1]"], seeds=1).cells]
    assert names == ["eval.shots=[5,1]__seed=0", "eval.shots=[1]__seed=0"]


@pytest.mark.parametrize(("grid", "named"), [
    (["meta.no_such_key=1,2"], "meta.no_such_key"),
    (["meta.inner_lr=0.1,fast"], "meta.inner_lr"),
    (["seed=1,2"], "--seeds"),
    (["meta.inner_lr"], "key=v1,v2"),
])
def test_bad_grid_is_refused_naming_the_key(grid, named):
    with pytest.raises(ConfigError, match=named):
        _plan(grid=grid)


def test_sweep_folder_of_another_base_config_is_refused(tmp_path, omniglot):
    run_sweep(_plan(grid=["meta.inner_lr=0.001"], seeds=1), tmp_path / "s", InProcess())
    with pytest.raises(RunError, match=r"different base config \(meta.iterations differ\)"):
        run_sweep(_plan(grid=["meta.inner_lr=0.001"], seeds=1, extra=["meta.iterations=4"]), tmp_path / "s", InProcess())
    threads = run_sweep(_plan(grid=["meta.inner_lr=0.001"], seeds=1, extra=["runtime.threads=2"]), tmp_path / "s",
                        InProcess())
    assert threads.skipped  # a changed thread count is the same sweep


def test_sweep_table_in_the_toml_file(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text('extends = "omniglot-pretrain-quick"\n[sweep]\nseeds = 2\n[sweep.grid]\n"meta.inner_lr" = [0.001, 0.01]\n')
    assert [c.name for c in plan(str(config), TINY, [], None).cells] == CELLS
    config.write_text('extends = "omniglot-pretrain-quick"\n[sweep]\nseed = 2\n')
    with pytest.raises(ConfigError, match=r"\[sweep\] seed: unknown key"):
        plan(str(config), TINY, [], None)


def test_sweep_presets_grid_over_tables_and_are_not_single_runs():
    """The threat-matrix preset grids over lists of attacker tables; `fedmeta run` sends it to `fedmeta sweep`."""
    from fedmeta.config import load_config

    cells = plan("omniglot-matrix-quick", [], [], None).cells
    assert len(cells) == 6 * 3
    strategies = [load_config("omniglot-fleet-quick", c.overrides[:1]).attack.attackers[1].strategy for c in cells[::3]]
    assert strategies == ["boosted", "replacement", "projected", "neurotoxin", "dba", "alie"]
    with pytest.raises(ConfigError, match=r"omniglot-matrix-quick is a sweep .*fedmeta sweep omniglot-matrix-quick"):
        load_config("omniglot-matrix-quick")


def test_the_quick_matrix_is_the_paper_matrix_at_the_quick_fleets_scale():
    from fedmeta.config import load_config
    from fedmeta.scenario.cache import pretrain_key

    quick, paper = plan("omniglot-matrix-quick", [], [], None), plan("omniglot-matrix-paper", [], [], None)
    assert [c.name for c in quick.cells] == [c.name for c in paper.cells]
    assert quick.base.compare.rules == paper.base.compare.rules and quick.base.rules == paper.base.rules
    assert (quick.base.compare.after_rounds, paper.base.compare.after_rounds) == (5, 50)
    fleet = load_config("omniglot-fleet-quick")  # its cached pre-training is the quick matrix's
    assert pretrain_key(quick.base, "a") == pretrain_key(fleet, "a")
    assert quick.base.attacks == fleet.attacks and quick.base.federation == fleet.federation


def test_unreachable_ray_address_fails_fast_naming_it():
    start = time.perf_counter()
    for start_ray in (RayCluster, connect):
        with pytest.raises(ConfigError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
            start_ray("127.0.0.1:1")
    assert time.perf_counter() - start < 10


def test_cell_names_are_readable_and_distinct():
    """Tables and identifier-like strings are written without quotes; a string that reads as
    another value keeps them, so ``["true"]`` and ``[true]`` still name different folders."""
    attackers = '[{user=0,rounds=[1],strategy="alie"}]'
    cells = plan("omniglot-exp1a-quick", [], [f"attack.attackers={attackers}"], 1).cells
    assert cells[0].name == "attack.attackers=[{user=0,rounds=[1],strategy=alie}]__seed=0"
    assert [_slug(v) for v in ('["true"]', "[true]", '["a"]', '["a b"]')] == ["[%22true%22]", "[true]", "[a]", "[%22a%20b%22]"]


def test_cell_names_are_one_folder_of_at_most_255_bytes():
    """A variant label with a slash stays inside the name; a grid of long values (eight attackers)
    keeps a readable start and a digest that tells cells apart."""
    from fedmeta.sweeps.grid import NAME_BYTES, _cell

    assert "/" not in _cell(None, [("rules.trimmed-mean:a/b.trim", "0.1")], 0).name
    attackers = ["[" + ",".join(f"{{user={u},rounds=[1],strategy='{s}'}}" for u in range(8)) + "]"
                 for s in ("boosted", "projected")]
    names = [_cell(None, [("attack.attackers", a)], 0).name for a in attackers]
    assert all(len(n.encode()) <= NAME_BYTES and n.startswith("attack.attackers=[{user=0,") for n in names)
    assert len(set(names)) == 2
