"""The README's first command: the paper's core in one run (``experiment = "backdoor-core"``)."""

from __future__ import annotations

from test_federation import FINETUNE, TINY, _run

METRICS = ("meta_test_accuracy", "main_task_accuracy", "attack_train_accuracy", "attack_val_accuracy")


def _scores(record):
    return {m: record[m] for m in METRICS}


def test_core_run_gives_the_numbers_of_experiments_1_2_and_3(tmp_path, omniglot):
    core = _run(tmp_path / "core", "omniglot-core-quick", ["finetune.users=1"])
    records = core.records()
    assert [r.get("round", r.get("defense")) for r in records] == [0, 1, 2, 3, "finetune", "matching"]
    exp1 = _run(tmp_path / "exp1", "omniglot-exp1a-quick").records()
    assert [_scores(r) for r in records[:4]] == [_scores(r) for r in exp1]
    for preset, row in (("omniglot-exp2-quick", records[4]), ("omniglot-exp3-quick", records[5])):
        other = _run(tmp_path / preset, preset, ["attack.cases=['a']", "finetune.users=1"]).records()
        assert _scores(row) == _scores(next(r for r in other if r["step"] == row["step"])), preset
    summary = core.path / "summary.json"
    assert summary.is_file()
    table = __import__("json").loads(summary.read_text())["table"].splitlines()
    assert [line.split("  ")[0] for line in table[2:]] == [
        "before the attack (round 0)", "right after the attack (round 1)", "after 2 benign rounds (round 3)",
        "fine-tuning alone (Exp 2), 4 steps", "matching network (Exp 3), 4 steps"]


def test_core_run_resumes_exactly(tmp_path, omniglot, killed_at_checkpoint):
    reference = _run(tmp_path / "ref", "omniglot-core-quick", ["finetune.users=1"]).records()
    for dies_at in (3, 5):  # in the benign rounds (the attacked model kept apart); between the local defenses
        with killed_at_checkpoint(dies_at):
            _run(tmp_path / f"killed-{dies_at}", "omniglot-core-quick", ["finetune.users=1"])
        assert _run(tmp_path / f"killed-{dies_at}", "omniglot-core-quick", ["finetune.users=1"]).records() == reference


def test_fedmeta_run_ends_with_the_table_and_draws_the_figure(tmp_path, omniglot):
    from typer.testing import CliRunner

    from fedmeta.cli import app

    sets = [f"--set={s}" for s in [*TINY, *FINETUNE, "finetune.users=1"]]
    result = CliRunner().invoke(app, ["run", "omniglot-core-quick", "--out", str(tmp_path / "run"), *sets])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("matching network (Exp 3), 4 steps")
    assert any(line.startswith("results in") and "figure.png" in line for line in lines)
    assert (tmp_path / "run" / "figure.png").stat().st_size > 10_000
