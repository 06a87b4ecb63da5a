"""Reports: mean and Student-t interval over seeds, paired differences, from crafted run folders."""

from __future__ import annotations

import csv
import json
import math
import tomllib
from pathlib import Path

import pytest
import tomli_w

from fedmeta.reports import ReportError, write_report
from fedmeta.reports.collect import keep
from fedmeta.reports.docs import TableQuery, refresh_files, table_text
from fedmeta.reports.stats import interval, paired, t_quantile

HALF = 4.302652729749456 * 0.1 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n) for 0.5, 0.6, 0.7 (s = 0.1)


def _run(folder, seed, lines, lr=0.001, experiment="defense-comparison"):
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(f'experiment = "{experiment}"\nseed = {seed}\n[meta]\ninner_lr = {lr}\n'
                                        "[runtime]\nthreads = 1\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "summary.json").write_text("{}\n")


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_t_quantiles_match_the_tables():
    for df, expected in [(1, 12.706205), (2, 4.302653), (4, 2.776445), (10, 2.228139), (30, 2.042272)]:
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)


def test_interval_and_paired_difference_by_hand():
    ci = interval([0.5, 0.6, 0.7])
    assert ci.mean == pytest.approx(0.6) and ci.half == pytest.approx(HALF) and HALF == pytest.approx(0.2484, abs=1e-4)
    diff = paired({0: 0.3, 1: 0.5, 2: 0.4, 3: 0.9}, {0: 0.5, 1: 0.6, 2: 0.7})  # seed 3 has no pair
    assert diff.n == 3 and diff.mean == pytest.approx(-0.2) and diff.half == pytest.approx(HALF)
    assert interval([0.4]).half is None


def test_report_of_crafted_runs(tmp_path):
    fedavg, krum = [0.5, 0.6, 0.7], [0.3, 0.5, 0.4]
    for seed in range(3):
        _run(tmp_path / "runs" / f"s{seed}", seed, [
            {"defense": "fedavg", "attack_train_accuracy": fedavg[seed], "episodes": 40, "seconds": 1.0 + seed},
            {"defense": "krum", "attack_train_accuracy": krum[seed], "episodes": 40, "rejected": seed},
        ])
    (tmp_path / "runs" / "unfinished").mkdir()
    (tmp_path / "runs" / "unfinished" / "config.toml").write_text('experiment = "defense-comparison"\n')
    written = write_report([tmp_path / "runs"], tmp_path / "report")
    assert {p.name for p in written} >= {"report.md", "table.csv", "paired.csv", "table-defense-comparison.png"}
    table = {r["defense"]: r for r in _rows(tmp_path / "report" / "table.csv")}
    assert float(table["fedavg"]["mean"]) == pytest.approx(0.6) and float(table["fedavg"]["ci95_half"]) == pytest.approx(HALF, abs=1e-5)
    assert table["fedavg"]["n"] == "3" and table["fedavg"]["episodes"] == "40" and table["fedavg"]["seeds"] == "0 1 2"
    (pair,) = _rows(tmp_path / "report" / "paired.csv")
    assert pair["comparison"].endswith("defense krum") and pair["baseline"] == "defense fedavg"
    assert float(pair["mean_difference"]) == pytest.approx(-0.2) and float(pair["ci95_half"]) == pytest.approx(HALF, abs=1e-5)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| all runs | defense fedavg | 60.00 ± 24.84 | 3 | 40 |" in markdown
    assert "Seeds: 0, 1, 2 (3)." in markdown and "unfinished" in markdown


def test_settings_are_grouped_and_paired_by_seed_with_bands(tmp_path):
    for lr, offset in ((0.001, 0.0), (0.01, 0.1)):
        for seed in range(2):
            lines = [{"step": s, "meta_test_accuracy": 0.2 + 0.1 * s + offset + 0.01 * seed, "episodes": 5}
                     for s in (1, 2, 3)]
            _run(tmp_path / f"lr{lr}-s{seed}", seed, lines, lr=lr, experiment="pretrain")
    folders = sorted(tmp_path.iterdir())
    write_report(folders, tmp_path / "report")
    rows = _rows(tmp_path / "report" / "table.csv")
    assert [(r["setting"], r["step"]) for r in rows] == [("meta.inner_lr=0.001", "3"), ("meta.inner_lr=0.01", "3")]
    (pair,) = _rows(tmp_path / "report" / "paired.csv")
    assert float(pair["mean_difference"]) == pytest.approx(0.1) and float(pair["sd"]) == pytest.approx(0.0, abs=1e-12)
    assert len(_rows(tmp_path / "report" / "curves.csv")) == 6
    assert (tmp_path / "report" / "curves-pretrain.png").is_file()


def test_a_fine_tuning_curve_draws_the_unadapted_step_0_apart_under_a_title(tmp_path, monkeypatch):
    """Exp 2's step 0 is the head before any adaptation: a marker with its interval, and the line
    starts at the first fine-tuned point; the title names the experiment, dataset and seeds."""
    import fedmeta.reports.figures as figures

    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, out, title=None: drawn.setdefault(out.name, (fig, title)) and out)
    for seed in range(2):
        _run(tmp_path / f"seed={seed}", seed, [{"case": "a", "user": 1, "step": t, "episodes": 20,
                                                "attack_val_accuracy": 0.2 + 0.5 * (t > 0) + 0.01 * seed}
                                               for t in (0, 100, 500)], experiment="backdoor-finetune")
    write_report(sorted(tmp_path.glob("seed=*")), tmp_path / "report")
    fig, title = drawn["curves-backdoor-finetune.png"]
    ax = fig.axes[0]
    (line,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("all runs")]
    assert list(line.get_xdata()) == [100, 500]
    assert [float(x) for ln in ax.get_lines() for x in ln.get_xdata() if x == 0]  # step 0: a marker of its own
    assert title == "Experiment 2: fine-tuning at each benign user after the attack, Omniglot (seeds 0, 1)"
    assert "fine-tuning step (step 0: before any)" == ax.get_xlabel()


def test_a_single_seeds_curve_has_its_episodes_band_and_says_so(tmp_path, monkeypatch):
    """One seed has no interval over seeds; its band is the run's own 95% interval over its
    episodes (``<metric>_ci95``), the legend says which."""
    import fedmeta.reports.figures as figures

    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, out, title=None: drawn.setdefault(out.name, (fig, title)) and out)
    _run(tmp_path / "seed=0", 0, [{"case": "a", "round": r, "episodes": 40, "attack_val_accuracy": v,
                                   "attack_val_accuracy_ci95": h}
                                  for r, v, h in ((0, 0.2, 0.05), (1, 0.9, 0.02), (5, 0.8, 0.07))],
         experiment="backdoor-rounds")
    write_report([tmp_path / "seed=0"], tmp_path / "report")
    ax = drawn["curves-backdoor-rounds.png"][0].axes[0]
    (line,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("all runs")]
    assert line.get_label() == "all runs (1 seed, band over its episodes)"
    (band,) = ax.collections
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    assert (low, high) == (pytest.approx(0.15), pytest.approx(0.92))


def test_nothing_to_report_is_refused(tmp_path):
    with pytest.raises(ReportError, match="holds no run folder"):
        write_report([tmp_path], tmp_path / "report")


def _exp1a_like(root):
    """Three seeds of a run with rounds 0-2 in case a: attack-val 0.1 + 0.3 * round + 0.01 * seed."""
    for seed in range(3):
        _run(root / "sweep" / f"seed={seed}", seed, [
            {"case": "a", "round": r, "attack_val_accuracy": 0.1 + 0.3 * r + 0.01 * seed, "meta_test_accuracy": 0.9,
             "episodes": 40} for r in range(3)], experiment="backdoor-rounds")
        (root / "sweep" / f"seed={seed}" / "weights.safetensors").write_bytes(b"not kept")


def test_docs_tables_are_regenerated_from_their_commands(tmp_path):
    _exp1a_like(tmp_path)
    doc = tmp_path / "doc.md"
    command = "<!-- fedmeta report --table sweep --where round=0,2 --metrics attack_val_accuracy -->"
    doc.write_text(f"# Title\n\ntext\n\n{command}\n| stale | table |\n<!-- end -->\n\nmore text\n")
    assert refresh_files([doc], tmp_path, check=True) == {doc: True} and "stale" in doc.read_text()
    assert refresh_files([doc], tmp_path) == {doc: True}
    text = doc.read_text()
    assert text.startswith("# Title\n\ntext\n\n" + command + "\nSeeds: 0, 1, 2 (3);") and text.endswith("<!-- end -->\n\nmore text\n")
    assert "Every row: case a." in text  # what all rows share is said once, above the table
    assert "| all runs | round 0 | 11.00 ± 2.48 | 3 | 40 |" in text  # 0.10, 0.11, 0.12: s = 0.01
    assert "| all runs | round 2 | 71.00 ± 2.48 | 3 | 40 |" in text and "round 1" not in text
    assert "meta_test" not in text
    assert refresh_files([doc], tmp_path, check=True) == {doc: False}  # byte for byte: nothing left to change


def test_paired_differences_against_a_position(tmp_path):
    _exp1a_like(tmp_path)
    text = table_text(TableQuery.parse(["sweep", "--where", "round=2", "--against", "round=0"]).within(tmp_path))
    # attack-val rises by exactly 0.6 in every seed (sd 0): 60.00 ± 0.00, the interval excludes 0; meta-test by 0
    assert "| all runs | round 0 | case a, round 2 | attack_val_accuracy | 60.00 ± 0.00 * | 3 |" in text
    assert "| all runs | round 0 | case a, round 2 | meta_test_accuracy | 0.00 ± 0.00 | 3 |" in text


def test_mean_over_users_merges_them_within_each_seed(tmp_path):
    # attack-val = 0.5 - 0.4 [step 500] + 0.1 (user - 2) + 0.01 seed: the users' mean per seed is
    # 0.50, 0.51, 0.52 at step 0 (s = 0.01), and every seed loses exactly 0.4 by step 500
    for seed in range(3):
        _run(tmp_path / "sweep" / f"seed={seed}", seed, [
            {"case": "a", "user": u, "step": t, "attack_val_accuracy": 0.5 - 0.4 * (t == 500) + 0.1 * (u - 2) + 0.01 * seed,
             "episodes": 20} for u in (1, 2, 3) for t in (0, 500)], experiment="defense-finetune")
    query = ["sweep", "--where", "step=0,500", "--mean-over", "user"]
    text = table_text(TableQuery.parse(query).within(tmp_path))
    assert "Each seed's value is its mean over `user`" in text and "user 1" not in text
    assert "| all runs | step 0 | 51.00 ± 2.48 | 3 | 20 |" in text and "| all runs | step 500 | 11.00 ± 2.48 | 3 | 20 |" in text
    text = table_text(TableQuery.parse([*query[:3], "--where", "step=500", "--against", "step=0", *query[3:]]).within(tmp_path))
    assert "| all runs | step 0 | case a, step 500 | attack_val_accuracy | -40.00 ± 0.00 * | 3 |" in text
    with pytest.raises(ReportError, match="--mean-over shots: no two lines differ only in 'shots'"):
        table_text(TableQuery.parse(["sweep", "--mean-over", "shots"]).within(tmp_path))


def test_a_lift_is_read_and_shown_in_points(tmp_path):
    """``attack_val_lift`` (attack-val minus the clean twin's) is a metric, in points like an accuracy."""
    for seed, lift in enumerate((0.1, 0.2, 0.3)):
        _run(tmp_path / "sweep" / f"seed={seed}", seed, [{"case": "a", "user": 1, "step": 500, "attack_val_lift": lift,
                                                          "episodes": 20}], experiment="defense-finetune")
    text = table_text(TableQuery.parse(["sweep", "--metrics", "attack_val_lift"]).within(tmp_path))
    assert f"| all runs | case a, user 1, step 500 | 20.00 ± {100 * HALF:.2f} | 3 | 20 |" in text



def test_each_comparison_row_gets_its_lift_over_its_own_reference_seed_by_seed(tmp_path):
    """A server rule's lift is its attack-val minus the run's ``before the attack`` row's; a local
    defense's, minus its own clean reference (the same defense on the round nobody attacked). Here
    every row is 0.1, 0.2, 0.3 above its reference over the seeds: 20 ± HALF points each. A local
    row without a reference (an older version) gets none; a logged lift is kept."""
    for seed, value in enumerate((0.15, 0.25, 0.35)):
        _run(tmp_path / "sweep" / f"seed={seed}", seed, [
            {"defense": "fedavg", "attack_val_accuracy": value + 0.05, "episodes": 40},
            {"defense": "local finetune (FedAvg)", "attack_val_accuracy": value, "clean_attack_val_accuracy": 0.05,
             "episodes": 40},
            {"defense": "local fine-pruning (FedAvg)", "attack_val_accuracy": value, "episodes": 40},
            {"defense": "local matching (FedAvg)", "attack_val_accuracy": value, "clean_attack_val_accuracy": 0.05,
             "attack_val_lift": 0.5, "episodes": 40},
            {"defense": "before the attack", "attack_val_accuracy": 0.1, "episodes": 40}])
    text = table_text(TableQuery.parse(["sweep", "--metrics", "attack_val_lift"]).within(tmp_path))
    for row in ("fedavg", "local finetune (FedAvg)"):
        assert f"| all runs | defense {row} | 20.00 ± {100 * HALF:.2f} | 3 | 40 |" in text
    assert "| all runs | defense local matching (FedAvg) | 50.00 ± 0.00 | 3 | 40 |" in text
    assert "fine-pruning" not in text and "defense before the attack" not in text
    matrix = table_text(TableQuery.parse(["sweep", "--columns", "defense", "--metrics", "attack_val_lift"]
                                         ).within(tmp_path))
    # lifts rank the local rows with the server rules
    assert matrix.rstrip().endswith(
        "| 3 | fedavg (SA), local finetune (FedAvg) (SA) (20.00) | local matching (FedAvg) (SA) (50.00) |")


def test_mean_over_keeps_a_capped_count_at_its_cap_only_where_every_line_is():
    from fedmeta.reports.collect import Cell, capped_text
    from fedmeta.reports.docs import mean_over

    table = {("e", "g", (("defense", d), ("user", u)), "rounds_survived"): Cell(values, {40}, {0: 5, 1: 5})
             for d, u, values in (("fedavg", 1, {0: 5, 1: 5}), ("fedavg", 2, {0: 5, 1: 3}))}
    (cell,) = mean_over(table, "user").values()
    assert capped_text("rounds_survived", cell) == "≥ 5, 4"


def test_runs_of_different_learners_of_one_seed_pair_up(tmp_path):
    """``robust.learners`` only says which learners a run trains (each scores the same alone), so
    runs of MAML and of ADML on the same seeds are one setting and pair seed by seed."""
    for learners, name, base in ((["maml"], "maml", 0.4), (["adml"], "adml", 0.7)):
        for seed in range(3):
            folder = tmp_path / name / f"seed={seed}"
            folder.mkdir(parents=True)
            (folder / "config.toml").write_text(f'experiment = "robustness"\nseed = {seed}\n[robust]\nlearners = {learners}\n')
            line = {"learner": name, "final": True, "robust_accuracy": base + 0.01 * seed, "episodes": 100}
            (folder / "metrics.jsonl").write_text(json.dumps(line) + "\n")
            (folder / "summary.json").write_text("{}\n")
    text = table_text(TableQuery.parse(["maml", "adml", "--against", "learner=maml"]).within(tmp_path))
    assert "| all runs | learner maml | learner adml (final) | robust_accuracy | 30.00 ± 0.00 * | 3 |" in text


def test_paired_against_a_named_baseline_setting(tmp_path):
    # three settings; the one named as baseline (inner_lr 0.01) is not the first in order
    for lr, acc in ((0.001, 0.5), (0.01, 0.6), (0.1, 0.9)):
        for seed in range(3):
            _run(tmp_path / f"lr{lr}" / f"seed={seed}", seed, [{"defense": "fedavg", "attack_val_accuracy": acc + 0.01 * seed}],
                 lr=lr)
    folders = ["lr0.001", "lr0.01", "lr0.1"]
    text = table_text(TableQuery.parse([*folders, "--paired", "--baseline", "meta.inner_lr=0.01"]).within(tmp_path))
    assert "| meta.inner_lr=0.001 | meta.inner_lr=0.01 | defense fedavg | attack_val_accuracy | -10.00 ± 0.00 * | 3 |" in text
    assert "| meta.inner_lr=0.1 | meta.inner_lr=0.01 | defense fedavg | attack_val_accuracy | 30.00 ± 0.00 * | 3 |" in text
    with pytest.raises(ReportError, match="give --paired too"):
        table_text(TableQuery.parse([*folders, "--baseline", "meta.inner_lr=0.01"]).within(tmp_path))
    with pytest.raises(ReportError, match="--baseline meta.inner_lr=0.5 matches 0 settings, not one"):
        table_text(TableQuery.parse([*folders, "--paired", "--baseline", "meta.inner_lr=0.5"]).within(tmp_path))


def test_a_threat_matrix_has_a_column_per_defense_and_a_heatmap(tmp_path):
    # two settings (attacks) x three defenses; the local row runs under secure aggregation
    for lr, base in ((0.001, 0.5), (0.01, 0.8)):
        for seed in range(3):
            _run(tmp_path / f"lr{lr}" / f"seed={seed}", seed, [
                {"defense": d, "attack_val_accuracy": base - drop + 0.1 * (seed - 1), "meta_test_accuracy": 0.9,
                 "episodes": 40, **survived} for d, drop, survived in (
                    ("fedavg", 0.0, {"rounds_survived": (2, 3, 5)[seed], "rounds_followed": 5}),
                    ("krum", 0.3, {"rounds_survived": 0, "rounds_followed": 5}), ("local matching (FedAvg)", 0.4, {}))],
                 lr=lr)
    text = table_text(TableQuery.parse(["lr0.001", "lr0.01", "--columns", "defense", "--metrics",
                                        "attack_val_accuracy"]).within(tmp_path))
    assert "| setting | metric | fedavg (SA) | krum | local matching (FedAvg) (SA) | seeds | lowest | highest |" in text
    half = f"{100 * HALF:.2f}"
    # each row's best and worst server rule (the local row is read against its own clean reference)
    assert (f"| meta.inner_lr=0.001 | attack_val_accuracy | 50.00 ± {half} | 20.00 ± {half} | 10.00 ± {half} | 3 | "
            "krum (20.00) | fedavg (SA) (50.00) |") in text
    assert "| meta.inner_lr=0.01 | attack_val_accuracy | 80.00 ±" in text
    rounds = table_text(TableQuery.parse(["lr0.001", "--columns", "defense", "--metrics", "rounds_survived"]
                                         ).within(tmp_path))
    # survived 2, 3 and all 5 rounds followed under FedAvg over the seeds (so at least 5: no mean,
    # the seeds' values); a local defense has no count, so no column
    assert "| fedavg (SA) | krum | seeds | lowest | highest |\n|---|---|---|---|---|---|---|\n" in rounds
    assert "| all runs | rounds_survived | 2, 3, ≥ 5 | 0, 0, 0 | 3 |  |  |" in rounds  # no extremes of a capped count
    assert '"≥" where the backdoor outlived the rounds followed' in rounds
    listed = table_text(TableQuery.parse(["lr0.001", "--where", "defense=fedavg", "--metrics", "rounds_survived"]
                                         ).within(tmp_path))
    assert "| 2, 3, ≥ 5 | 3 | 40 |" in listed
    with pytest.raises(ReportError, match="--columns turns the table"):
        table_text(TableQuery.parse(["lr0.001", "--columns", "defense", "--paired"]).within(tmp_path))
    with pytest.raises(ReportError, match="no line of defense-comparison has a 'case'"):
        table_text(TableQuery.parse(["lr0.001", "--columns", "case"]).within(tmp_path))
    written = write_report([tmp_path / "lr0.001", tmp_path / "lr0.01"], tmp_path / "report")
    assert "heatmap-defense-comparison.png" in {p.name for p in written}
    # the CSV gives a capped count seed by seed, its mean (a lower bound) without an interval; no
    # paired difference of capped counts
    survived = [r for r in _rows(tmp_path / "report" / "table.csv") if r["metric"] == "rounds_survived"]
    fedavg = next(r for r in survived if r["defense"] == "fedavg" and r["setting"] == "meta.inner_lr=0.001")
    assert (fedavg["values"], fedavg["mean"], fedavg["ci95_half"]) == ("2 3 >=5", "3.33333", "")
    assert not [r for r in _rows(tmp_path / "report" / "paired.csv") if r["metric"] == "rounds_survived"]


def test_a_matrix_row_says_how_many_seeds_it_rests_on(tmp_path):
    """A sweep kept while it runs: the second attack has one seed so far, its row says so."""
    for lr, seeds in ((0.001, 3), (0.01, 1)):
        for seed in range(seeds):
            _run(tmp_path / "kept" / f"lr{lr}-seed={seed}", seed, [
                {"defense": d, "attack_val_accuracy": 0.5, "episodes": 40} for d in ("fedavg", "krum")], lr=lr)
    text = table_text(TableQuery.parse(["kept", "--columns", "defense", "--metrics", "attack_val_accuracy"]
                                       ).within(tmp_path))
    assert "| meta.inner_lr=0.001 | attack_val_accuracy | 50.00 ± 0.00 | 50.00 ± 0.00 | 3 |" in text
    assert "| meta.inner_lr=0.01 | attack_val_accuracy | 50.00 | 50.00 | 1 |" in text


def test_matrix_labels_and_secure_aggregation_marks():
    from fedmeta.experiments.comparison import secure_aggregation_ok
    from fedmeta.reports import short_label

    attackers = [{"user": 0, "rounds": [1], "strategy": "dba"}, {"user": 1, "rounds": [1], "strategy": "dba"}]
    assert short_label({"attack.attackers": attackers}) == "attackers dba ×2, round 1"
    assert short_label({"attack.attackers": [{"user": 0, "rounds": [1, 2], "strategy": "boosted"},
                                             {"user": 1, "rounds": [2], "strategy": "alie"}]}) == \
        "attackers boosted+alie ×2, rounds 1,2"
    defenses = ("fedavg", "krum", "flame", "local finetune (FedAvg)", "local matching, secure aggregation")
    assert [secure_aggregation_ok(d) for d in defenses] == [True, False, False, True, True]


def test_docs_table_commands_are_checked(tmp_path):
    _exp1a_like(tmp_path)
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- fedmeta report --table sweep --where round=7 -->\n<!-- end -->\n")
    with pytest.raises(ReportError, match="no line of .* matches round=7"):
        refresh_files([doc], tmp_path)
    doc.write_text("<!-- fedmeta report --table sweep --bogus -->\n<!-- end -->\n")
    with pytest.raises(ReportError, match="unrecognized arguments: --bogus"):
        refresh_files([doc], tmp_path)
    doc.write_text("no table here\n")
    with pytest.raises(ReportError, match="no generated table"):
        refresh_files([doc], tmp_path)


def test_keep_copies_what_a_report_reads_and_no_weights(tmp_path):
    _exp1a_like(tmp_path)
    (tmp_path / "sweep" / "sweep.json").write_text("{}\n")
    (tmp_path / "sweep" / "base.toml").write_text('experiment = "backdoor-rounds"\n')
    written = keep(tmp_path / "sweep", tmp_path / "results" / "exp")
    names = sorted(str(p.relative_to(tmp_path / "results" / "exp")) for p in written)
    assert names == ["base.toml", "seed=0/config.toml", "seed=0/metrics.jsonl", "seed=0/summary.json",
                     "seed=1/config.toml", "seed=1/metrics.jsonl", "seed=1/summary.json", "seed=2/config.toml",
                     "seed=2/metrics.jsonl", "seed=2/summary.json", "sweep.json"]
    assert keep(tmp_path / "sweep", tmp_path / "results" / "exp")  # an earlier keep of this sweep: refreshed
    assert keep(tmp_path / "sweep" / "seed=0", tmp_path / "results" / "one")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "base.toml").write_text("my notes")
    for source, dest in ((tmp_path / "sweep" / "seed=1", tmp_path / "results" / "one"), (tmp_path / "sweep", mine)):
        with pytest.raises(ReportError, match="holds files but not an earlier keep of"):
            keep(source, dest)  # another seed's run onto the first's; a sweep onto someone's folder
    assert (mine / "base.toml").read_text() == "my notes" and sorted(p.name for p in mine.iterdir()) == ["base.toml"]
    kept, fresh = tmp_path / "kept.md", "<!-- fedmeta report --table {} --where round=1 -->\n<!-- end -->\n"
    kept.write_text(fresh.format("results/exp"))
    (tmp_path / "orig.md").write_text(fresh.format("sweep"))
    refresh_files([kept, tmp_path / "orig.md"], tmp_path)
    assert kept.read_text().replace("results/exp", "sweep") == (tmp_path / "orig.md").read_text()


def test_keep_accepts_its_earlier_keep_after_fedmeta_added_a_key_at_its_default(tmp_path):
    """A sweep resumed by a newer fedmeta writes its base config anew, naming keys added since at
    their defaults; the folder kept before is still this sweep's, and keeping into it must work."""
    from fedmeta.config import load_config

    _exp1a_like(tmp_path)
    sweep, dest = tmp_path / "sweep", tmp_path / "results" / "exp"
    text = load_config("omniglot-exp1a-quick").to_toml()
    (sweep / "base.toml").write_text(text)
    keep(sweep, dest)
    full = tomllib.loads(text)
    older = {**full, "data": {k: v for k, v in full["data"].items() if k != "reserved_classes"}}
    (dest / "base.toml").write_text(tomli_w.dumps(older))  # as kept before the key existed
    assert keep(sweep, dest)
    (dest / "base.toml").write_text(tomli_w.dumps({**full, "runtime": {**full["runtime"], "threads": 7}}))
    assert keep(sweep, dest)  # resumed with other threads: the same sweep, as `fedmeta sweep` says
    other = {**full, "seed": 5}
    (dest / "base.toml").write_text(tomli_w.dumps(other))
    with pytest.raises(ReportError, match="holds files but not an earlier keep of"):
        keep(sweep, dest)


def test_every_docs_table_is_regenerated_from_results_byte_for_byte():
    """The tables in docs/ are what `fedmeta report --docs` prints from results/ (run in the repository root)."""
    root = Path(__file__).resolve().parents[1]
    docs = sorted((root / "docs").glob("*.md")) + [root / "README.md"]
    with_tables = [d for d in docs if "<!-- fedmeta report --table " in d.read_text()]
    assert with_tables, "no generated table in docs/"
    stale = [str(p.relative_to(root)) for p, differs in refresh_files(with_tables, root, check=True).items() if differs]
    assert not stale, f"run `fedmeta report --docs {' '.join(stale)}` in the repository root"


def test_membership_lines_are_told_apart_by_threat_and_attack_and_count_trials(tmp_path):
    """Membership inference writes one line per server, attack and score at one stage: each its own row."""
    for seed in range(2):
        _run(tmp_path / "mia" / f"seed={seed}", seed, [
            {"stage": "threat", "threat": threat, "users": users, "target": "support", "attack": attack,
             "score": score, "attack_auc": auc + 0.01 * seed, "trials": 24}
            for threat, users, auc in (("informed", 1, 0.9), ("secagg", 4, 0.5))
            for attack, score in (("inversion", "l0-cos"), ("threshold", "loss"))], experiment="membership")
    text = table_text(TableQuery.parse(["mia", "--where", "threat=secagg"]).within(tmp_path))
    assert "Every row: stage threat, threat secagg, users 4, target support." in text
    assert "| setting | position | attack_auc | seeds | trials |" in text
    assert "| all runs | attack inversion, score l0-cos | 0.505 ± 0.064 | 2 | 24 |" in text
    assert "| all runs | attack threshold, score loss | 0.505 ± 0.064 | 2 | 24 |" in text


def test_extremes_name_the_best_and_worst_server_rule_and_count_long_ties():
    from fedmeta.reports import extremes

    means = {"fedavg": 0.5, "krum": 0.1, "median": 0.1, "clip": 0.1, "dnc": 0.1,
             "local matching (FedAvg)": 0.0, "before the attack": 0.05}  # a reference and a local row: not ranked
    assert extremes("defense", "attack_val_accuracy", means) == ("krum, median, clip and 1 more (10.00)",
                                                                 "fedavg (SA) (50.00)")
    assert extremes("defense", "rounds_survived", means) == ("", "")  # a capped count: per seed, no ranking
    assert extremes("defense", "attack_val_accuracy", {"fedavg": 0.5, "before the attack": 0.1}) == ("", "")
    assert extremes("defense", "meta_test_accuracy", {"fedavg": 0.98, "krum": 0.98}) == ("all 2 (98.00)",) * 2


def test_a_table_figure_of_many_metrics_wraps_its_panels_into_rows(tmp_path):
    from PIL import Image

    metrics = [f"metric_{i}_accuracy" for i in range(8)]  # a comparison's eight: one row was 97 inches wide
    for seed in range(2):
        _run(tmp_path / "runs" / f"s{seed}", seed, [{"defense": f"rule{d}", **{m: 0.1 * d for m in metrics},
                                                     "episodes": 40} for d in range(9)])
    write_report([tmp_path / "runs"], tmp_path / "report")
    width, height = Image.open(tmp_path / "report" / "table-defense-comparison.png").size
    assert width < 4500 and height > 1000  # three panels of about 10 inches a row, three rows (at 120 dpi)


def test_a_membership_report_draws_each_defense_against_utility_across_folders(tmp_path, monkeypatch):
    """The privacy-utility figure joins an undefended run and one folder per noise scale into one
    curve per defense, in order of scale, each point the mean over seeds on both axes."""
    import fedmeta.reports.figures as figures

    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, out, title=None: drawn.setdefault(out.name, (fig, title)) and out)

    def line(defense, scale, accuracy, auc, seed):
        return {"stage": "threat" if defense == "none" else "defense", "threat": "realistic", "attack": "joint",
                "score": "joint-cal", "defense": defense, "scale": scale, "trials": 60,
                "meta_test_accuracy": accuracy + 0.01 * seed, "attack_auc": auc + 0.01 * seed,
                "tpr_at_1pct_fpr": auc / 10}

    folders = {"undefended": ("none", 0.0, 0.80, 0.75, 0.001), "ten": ("inner", 10.0, 0.70, 0.55, 0.002),
               "three": ("inner", 3.0, 0.78, 0.70, 0.003)}
    for name, (defense, scale, accuracy, auc, lr) in folders.items():
        for seed in range(3):
            _run(tmp_path / name / f"seed={seed}", seed, [line(defense, scale, accuracy, auc, seed)], lr=lr,
                 experiment="membership")
    write_report([tmp_path / name for name in folders], tmp_path / "report")
    fig, title = drawn["tradeoff-membership.png"]
    auc_panel = fig.axes[0]
    (curve,) = [ln for ln in auc_panel.get_lines() if ln.get_label() == "inner"]
    assert [round(x, 6) for x in curve.get_xdata()] == [81.0, 79.0, 71.0]  # none, then scales 3 and 10 (%)
    assert [round(y, 6) for y in curve.get_ydata()] == [0.76, 0.71, 0.56]
    assert "attack against utility per defense" in title and "score joint-cal" in title


def test_where_keeps_only_the_lines_a_report_is_asked_for(tmp_path):
    for seed in range(2):
        _run(tmp_path / "runs" / f"s{seed}", seed, [{"defense": d, "attack_val_accuracy": 0.1 + seed / 100,
                                                     "episodes": 40} for d in ("fedavg", "krum", "median")])
    write_report([tmp_path / "runs"], tmp_path / "report", {"defense": ["fedavg", "krum"]})
    assert {row["defense"] for row in _rows(tmp_path / "report" / "table.csv")} == {"fedavg", "krum"}
    with pytest.raises(ReportError, match="no line matches --where defense=flame"):
        write_report([tmp_path / "runs"], tmp_path / "other", {"defense": ["flame"]})


def test_reading_a_results_folder_never_runs_the_plugins_its_config_names(tmp_path, monkeypatch):
    """A results folder is data: a config naming ``plugins`` (code) is reported as written, and
    ``fedmeta keep`` copies it, without importing them."""
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    for seed in range(2):
        _run(tmp_path / "runs" / f"s{seed}", seed, [{"defense": "fedavg", "attack_train_accuracy": 0.5}])
        config = tmp_path / "runs" / f"s{seed}" / "config.toml"
        config.write_text('plugins = ["evil.py"]\n' + config.read_text())
    write_report([tmp_path / "runs"], tmp_path / "report")
    keep(tmp_path / "runs", tmp_path / "kept")
    assert not marker.exists()


def test_report_and_plot_replace_only_what_fedmeta_wrote(tmp_path):
    """``--out`` onto someone's folder or image is refused and leaves it as it was; a folder or a
    figure fedmeta wrote is replaced by the next report or plot."""
    from fedmeta.plots import drawn_by_fedmeta, plot_runs

    for seed in range(2):
        _run(tmp_path / "runs" / f"s{seed}", seed, [{"defense": "fedavg", "attack_train_accuracy": 0.5 + seed / 10}])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("MY NOTES")
    with pytest.raises(ReportError, match="holds files a fedmeta report did not write \\(report.md\\)"):
        write_report([tmp_path / "runs"], mine)
    assert [p.name for p in mine.iterdir()] == ["report.md"] and (mine / "report.md").read_text() == "MY NOTES"
    write_report([tmp_path / "runs"], tmp_path / "report")
    assert write_report([tmp_path / "runs"], tmp_path / "report")  # its own folder: replaced
    run = tmp_path / "pretrain"
    _run(run, 0, [{"step": 10, "shots": 5, "ways": 5, "mode": "transductive", "meta_test_accuracy": 0.5,
                   "episodes": 10}], experiment="pretrain")
    thesis = tmp_path / "thesis.png"
    thesis.write_text("precious")
    for out, message in ((thesis, "exists and fedmeta did not draw it"), (tmp_path / "notes.md", "PNG figures"),
                         (mine, "give a name ending in .png")):
        with pytest.raises(ValueError, match=message):
            plot_runs([run], out)
    assert thesis.read_text() == "precious"
    figure = plot_runs([run], tmp_path / "figs" / "pretraining.png")
    assert drawn_by_fedmeta(figure) and plot_runs([run], figure) == figure
    assert not drawn_by_fedmeta(thesis) and plot_runs([run], run / "figure.png")  # a run's own figure


def test_an_unreadable_run_is_named_not_a_traceback(tmp_path):
    _run(tmp_path / "runs" / "s0", 0, [{"defense": "fedavg", "attack_train_accuracy": 0.5}])
    with (tmp_path / "runs" / "s0" / "metrics.jsonl").open("a") as f:
        f.write('{"defense": "krum", "attack_tr')  # cut short
    with pytest.raises(ReportError, match=r"runs/s0: cannot read this run \(Unterminated string"):
        write_report([tmp_path / "runs"], tmp_path / "report")
