"""Reports: mean and Student-t interval over seeds, paired differences, from crafted run folders."""

from __future__ import annotations

import csv
import json
import math

import pytest

from fedmeta.reports import ReportError, write_report
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


def test_nothing_to_report_is_refused(tmp_path):
    with pytest.raises(ReportError, match="holds no run folder"):
        write_report([tmp_path], tmp_path / "report")
