"""``fedmeta report DIR...``: tables and figures over seeds from run and sweep folders.

Writes to the report folder:

- ``report.md``: per experiment, one row per setting and position, each metric as
  ``mean ± half-width`` of its 95% t-interval over seeds, with the number of seeds and the
  evaluation episodes per seed; then the paired comparisons (``stats``);
- ``table.csv``, ``curves.csv``, ``paired.csv``: the same numbers, one metric per row;
- ``curves-<experiment>.png``: each curve's mean over seeds with a shaded 95% band;
  ``table-<experiment>.png``: the table's means with their intervals as error bars;
  ``heatmap-<experiment>.png`` where lines have a ``defense``: the threat matrix, attacks down,
  defenses across; ``tradeoff-<experiment>.png`` where they also have a noise ``scale``
  (membership inference): each attack's AUC and TPR at 1% FPR against meta-test accuracy, a
  curve per defense.

Paired comparisons: every setting against the first one (the grid's first values) at the same
position and seed, and within a setting every ``defense`` row against the undefended one
(``none``, else ``fedavg``): the same seed means the same attacked model and evaluation episodes.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedmeta.reports.collect import (
    CAPPED,
    POINTS,
    ReportError,
    Run,
    Table,
    capped_text,
    curve_lines,
    find_runs,
    group_of,
    labels,
    table_lines,
    tabulate,
    within,
)
from fedmeta.reports.stats import CONFIDENCE, Interval, paired

__all__ = ["ReportError", "default_out", "write_report"]

BASELINE_DEFENSES = ("none", "fedavg")


def default_out(folders: list[Path]) -> Path:
    """``SWEEP/report`` for a single sweep folder, else ``./report``."""
    if len(folders) == 1 and (folders[0] / "sweep.json").is_file():
        return folders[0] / "report"
    return Path("report")


REPORT_MARK = ".fedmeta-report"
"""The file that marks a folder as a fedmeta report's, whose files the next report there replaces."""


def _claim(out: Path) -> None:
    """Make ``out`` a report folder: a new or empty one, or one a fedmeta report marked (``--out``
    must not overwrite a folder of someone's own report.md or table.csv)."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and REPORT_MARK not in entries:
        raise ReportError(f"--out {out} holds files a fedmeta report did not write ({', '.join(entries[:5])}"
                          f"{', ...' if len(entries) > 5 else ''}); choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_MARK).write_text("Written by `fedmeta report`: the next report here replaces its files.\n")


def write_report(folders: list[Path], out: Path, where: dict[str, list[str]] | None = None) -> list[Path]:
    """Write the report of the runs under ``folders`` to ``out``; the files written. With
    ``where`` (key -> values, as ``--where``), only the lines whose position has each key at one
    of its values: a figure of the few scores or cases a page discusses."""
    runs, unfinished = find_runs(folders)
    if where:
        runs = [replace(r, records=[rec for rec in r.records if within(rec, where)]) for r in runs]
        if not any(r.records for r in runs):
            raise ReportError("no line matches --where " + " ".join(k + "=" + ",".join(v) for k, v in where.items()))
    names = labels(runs)
    table, curves = tabulate(runs, table_lines), tabulate(runs, curve_lines)
    comparisons = comparisons_of(table, names)
    _claim(out)
    written = [_markdown(out / "report.md", runs, unfinished, table, comparisons, names),
               _csv(out / "table.csv", table, names), _csv(out / "curves.csv", curves, names),
               _paired_csv(out / "paired.csv", comparisons)]
    from fedmeta.plots import experiment_title
    from fedmeta.reports.figures import curve_figure, heatmap_figure, table_figure, tradeoff_figure

    datasets = {group_of(r): r.dataset for r in runs}
    for experiment in sorted({r.experiment for r in runs}):
        of = [r for r in runs if r.experiment == experiment]
        title = experiment_title(experiment, [r.dataset for r in of], [r.seed for r in of])
        written += [p for p in (curve_figure(curves, names, experiment, out / f"curves-{experiment}.png", title),
                                table_figure(table, names, experiment, out / f"table-{experiment}.png", title),
                                heatmap_figure(table, names, experiment, out / f"heatmap-{experiment}.png", title),
                                tradeoff_figure(table, datasets, experiment, out / f"tradeoff-{experiment}.png",
                                                title)) if p]
    return written


# --- numbers ------------------------------------------------------------------------------------


def label_text(label: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in label.items()) or "all runs"


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def short_label(label: dict[str, Any]) -> str:
    """``label_text`` with a list of attackers written as its strategies (``attackers boosted ×2,
    round 1``): the row names of a threat matrix, where the full list would fill the page."""
    def text(key: str, value: Any) -> str:
        if key == "attack.attackers" and isinstance(value, list) and all(isinstance(a, dict) for a in value):
            strategies = "+".join(dict.fromkeys(str(a.get("strategy", "boosted")) for a in value))
            rounds = sorted({r for a in value for r in a.get("rounds", [])})
            return f"attackers {strategies} ×{len(value)}, round{'s' * (len(rounds) > 1)} {','.join(map(str, rounds))}"
        return f"{key}={_value(value)}"

    return ", ".join(text(k, v) for k, v in label.items()) or "all runs"


def position_text(position: tuple) -> str:
    return ", ".join(f"{k} {v}" for k, v in position if k != "final") + (" (final)" if dict(position).get("final") else "")


def group_order(names: dict[str, dict[str, Any]]) -> list[str]:
    """Groups in the order of their labels' values (numbers by value)."""
    def key(group: str) -> tuple:
        return tuple((0, v, "") if isinstance(v, int | float) and not isinstance(v, bool) else (1, 0, _value(v))
                     for v in names[group].values())
    return sorted(names, key=key)


def comparisons_of(table: Table, names: dict[str, dict[str, Any]], baseline: str | None = None) -> list[dict[str, Any]]:
    """Paired differences: each setting against the first (or the group ``baseline``), each
    defense against none (see module)."""
    rows = []
    base_group = baseline or group_order(names)[0]
    for (experiment, group, position, metric), cell in table.items():
        if metric in CAPPED:  # a difference of counts cut off at a cap has no t-interval to speak of
            continue
        if group != base_group and (base := table.get((experiment, base_group, position, metric))):
            rows.append(_pair(experiment, label_text(names[group]), label_text(names[base_group]), position, metric,
                              cell.values, base.values))
        defense = dict(position).get("defense")
        baseline = next((d for d in BASELINE_DEFENSES if any(
            dict(k[2]).get("defense") == d for k in table if k[0] == experiment)), None)
        if defense is not None and baseline is not None and defense != baseline:
            at = tuple((k, baseline if k == "defense" else v) for k, v in position)
            if base := table.get((experiment, group, at, metric)):
                rows.append(_pair(experiment, f"{label_text(names[group])}: defense {defense}",
                                  f"defense {baseline}", position, metric, cell.values, base.values))
    return [r for r in rows if r["interval"] is not None and r["interval"].n >= 2]


def _pair(experiment: str, what: str, baseline: str, position: tuple, metric: str,
          values: dict[int, float], base: dict[int, float]) -> dict[str, Any]:
    return {"experiment": experiment, "comparison": what, "baseline": baseline, "position": position,
            "metric": metric, "interval": paired(values, base)}


# --- Markdown -----------------------------------------------------------------------------------


def _number(metric: str, value: float) -> str:
    if metric.endswith(POINTS):
        return f"{100 * value:.2f}"
    return f"{value:.1f}" if metric.endswith("_survived") else f"{value:.3f}"


def _cell_text(metric: str, ci: Interval) -> str:
    half = "n/a" if ci.half is None else _number(metric, ci.half)
    return f"{_number(metric, ci.mean)} ± {half}"


def _markdown(path: Path, runs: list[Run], unfinished: list[Path], table: Table, comparisons: list[dict[str, Any]],
              names: dict[str, dict[str, Any]]) -> Path:
    lines = ["# Report", "",
             (f"Mean over seeds ± half-width of the {100 * CONFIDENCE:.0f}% Student-t interval "
             "(t(0.975, n-1) · s/√n, n = seeds); accuracies in %, other metrics as fractions. `episodes`: "
             "evaluation episodes per seed behind each value. One row per setting and position."), ""]
    if unfinished:
        lines += [f"Left out (unfinished): {', '.join(str(p) for p in unfinished)}", ""]
    for experiment in sorted({r.experiment for r in runs}):
        seeds = sorted({r.seed for r in runs if r.experiment == experiment})
        lines += [f"## {experiment}", "", f"Seeds: {', '.join(map(str, seeds))} ({len(seeds)}).", ""]
        lines += table_markdown(table, names, experiment)
        pairs = [c for c in comparisons if c["experiment"] == experiment]
        if pairs:
            lines += ["", PAIRED_NOTE, "", *paired_markdown(pairs)]
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


PAIRED_NOTE = ("Paired differences (same seeds: same split, initial weights and evaluation episodes); "
               "`*`: the interval excludes 0 (a t-interval over few seeds "
               "rests on normality, and nothing corrects for the table's other lines).")


def paired_markdown(pairs: list[dict[str, Any]]) -> list[str]:
    """The rows of paired differences (see ``comparisons_of``) as a Markdown table."""
    lines = ["| comparison | against | position | metric | difference | pairs |", "|---|---|---|---|---|---|"]
    for c in pairs:
        ci = c["interval"]
        lines.append(f"| {c['comparison']} | {c['baseline']} | {position_text(c['position'])} | {c['metric']} | "
                     f"{_cell_text(c['metric'], ci)}{' *' if ci.excludes_zero else ''} | {ci.n} |")
    return lines


def table_markdown(table: Table, names: dict[str, dict[str, Any]], experiment: str) -> list[str]:
    """One row per setting and position of ``experiment``: each metric's mean ± t-interval over seeds
    (a ``CAPPED`` count: its value per seed).

    What every row's position shares is said once above the table, so the column shows what differs.
    The count column is evaluation episodes per seed, or trials for membership inference.
    """
    metrics = list(dict.fromkeys(k[3] for k in table if k[0] == experiment))
    rows: dict[tuple[str, tuple], dict[str, Any]] = {}
    for (exp, group, position, metric), cell in table.items():
        if exp == experiment:
            row = rows.setdefault((group, position), {"n": set(), "episodes": set()})
            row[metric] = capped_text(metric, cell) or _cell_text(
                metric, cell.interval())
            row["n"].add(len(cell.values))
            row["episodes"] |= cell.episodes
    positions = [position for _, position in rows]
    shared = tuple(pair for pair in positions[0] if all(pair in p for p in positions)) if len(rows) > 1 else ()
    head = ["setting", "position", *metrics, "seeds", "trials" if experiment == "membership" else "episodes"]
    out = ([f"Every row: {position_text(shared).strip()}.", ""] if shared else []) + [
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = group_order(names)
    for (group, position), row in sorted(rows.items(), key=lambda item: order.index(item[0][0])):
        numbers = [row.get(m, "") for m in metrics]
        own = tuple(pair for pair in position if pair not in shared)
        out.append("| " + " | ".join([label_text(names[group]), position_text(own), *numbers,
                                      _span(row["n"]), _span(row["episodes"])]) + " |")
    return out


def pivot_markdown(table: Table, names: dict[str, dict[str, Any]], experiment: str, column: str) -> list[str]:
    """``table_markdown`` turned so that each value of the position key ``column`` is a column:
    one row per setting, rest of the position and metric (``column = "defense"``: a threat matrix,
    attacks down, defenses across; "(SA)" marks a defense that runs under secure aggregation). One
    seed: means without an interval; a ``CAPPED`` count: its value per seed. ``seeds``: how many
    seeds the row's values rest on (a range where its cells differ: a sweep kept while it runs).
    The last two columns name where each row's mean is lowest and highest (``extremes``): against
    an attack, its best and worst server rule by that metric."""
    values: dict[Any, None] = {}
    rows: dict[tuple[str, tuple, str], dict[Any, str]] = {}
    means: dict[tuple[str, tuple, str], dict[Any, float]] = {}
    seeds: dict[tuple[str, tuple, str], set[int]] = {}
    for (exp, group, position, metric), cell in table.items():
        where = dict(position)
        if exp == experiment and column in where:
            values.setdefault(where[column])
            rest = tuple(pair for pair in position if pair[0] != column)
            ci = cell.interval()
            key = (group, rest, metric)
            rows.setdefault(key, {})[where[column]] = capped_text(metric, cell) or _pivot_cell(metric, ci)
            means.setdefault(key, {})[where[column]] = ci.mean
            seeds.setdefault(key, set()).add(len(cell.values))
    if not rows:
        raise ReportError(f"--columns {column}: no line of {experiment} has a '{column}'")
    with_position = any(rest for _, rest, _ in rows)
    head = ["setting", *(["position"] if with_position else []), "metric", *(_column(column, v) for v in values),
            "seeds", "lowest", "highest"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = group_order(names)
    for key, cells in sorted(rows.items(), key=lambda item: order.index(item[0][0])):
        group, rest, metric = key
        numbers = [cells.get(v, "") for v in values]
        out.append("| " + " | ".join([short_label(names[group]), *([position_text(rest)] if with_position else []),
                                      metric, *numbers, _count_text(seeds[key]),
                                      *extremes(column, metric, means[key])]) + " |")
    return out


def _count_text(counts: set[int]) -> str:
    """``3``, or ``1-3`` where the cells of a row rest on different numbers of seeds."""
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low}-{high}"


TIES_NAMED = 3
"""How many tied columns ``extremes`` names before it counts the rest."""


def extremes(column: str, metric: str, means: dict[Any, float]) -> tuple[str, str]:
    """The columns where ``means`` is lowest and where highest, with the value (ties as printed:
    the first ``TIES_NAMED`` named, the rest counted). Of a comparison's defenses, the server
    rules only: they are all read against the pre-trained model (its column), while a local
    defense's row is read against that defense on a model nobody attacked (its own
    ``clean_attack_val_accuracy``), so its raw number ranks with nothing else; a ``_lift`` is each
    row taken from its own reference, so it ranks every defense. A ``CAPPED`` count has none (its
    cells are per seed)."""
    from fedmeta.experiments.comparison import BEFORE, is_local

    lift = metric.endswith("_lift")
    ranked = {name: _number(metric, mean) for name, mean in means.items()
              if column != "defense" or (name != BEFORE and (lift or not is_local(name)))}
    if metric in CAPPED or len(ranked) < 2:
        return "", ""
    if len(set(ranked.values())) == 1:
        return (f"all {len(ranked)} ({next(iter(ranked.values()))})",) * 2

    def named(pick: Any) -> str:
        value = _number(metric, pick(means[name] for name in ranked))
        tied = [_column(column, name) for name, text in ranked.items() if text == value]
        more = f" and {len(tied) - TIES_NAMED} more" if len(tied) > TIES_NAMED else ""
        return ", ".join(tied[:TIES_NAMED]) + more + f" ({value})"

    return named(min), named(max)


def _column(key: str, value: Any) -> str:
    """A pivot column's name (a defense's marked as ``defense_text`` marks it)."""
    return defense_text(str(value)) if key == "defense" else str(value)


def defense_text(defense: str) -> str:
    """A defense's name, with "(SA)" where the server can run it under secure aggregation (unless
    the name already says so)."""
    from fedmeta.experiments.comparison import secure_aggregation_ok

    return defense + " (SA)" if secure_aggregation_ok(defense) and "secure aggregation" not in defense else defense


def _pivot_cell(metric: str, ci: Interval) -> str:
    return _number(metric, ci.mean) if ci.half is None else _cell_text(metric, ci)


def _span(values: set[int]) -> str:
    return "" if not values else str(min(values)) if len(values) == 1 else f"{min(values)}-{max(values)}"


# --- CSV ----------------------------------------------------------------------------------------


def _csv(path: Path, table: Table, names: dict[str, dict[str, Any]]) -> Path:
    keys = list(dict.fromkeys(k for _, _, position, _ in table for k, _ in position))
    head = ["experiment", "setting", *keys, "metric", "seeds", "n", "episodes", "mean", "sd", "ci95_half", "ci95_low",
            "ci95_high", "values"]
    order = group_order(names)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(head)
        for (experiment, group, position, metric), cell in sorted(
                table.items(), key=lambda item: (item[0][0], order.index(item[0][1]), json.dumps(item[0][2:]))):
            ci = cell.interval()
            numbers = _numbers(replace(ci, half=None) if metric in CAPPED else ci)  # capped: a lower bound, no interval
            where = dict(position)
            values = capped_text(metric, cell, " ") or " ".join(f"{cell.values[s]:.6g}" for s in sorted(cell.values))
            writer.writerow([experiment, label_text(names[group]), *(where.get(k, "") for k in keys), metric,
                             " ".join(map(str, sorted(cell.values))), ci.n, _span(cell.episodes), *numbers,
                             values.replace("≥ ", ">=")])
    return path


def _numbers(ci: Interval) -> list[str]:
    if ci.half is None:
        return [f"{ci.mean:.6g}", "", "", "", ""]
    return [f"{ci.mean:.6g}", f"{ci.sd:.6g}", f"{ci.half:.6g}", f"{ci.mean - ci.half:.6g}", f"{ci.mean + ci.half:.6g}"]


def _paired_csv(path: Path, comparisons: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["experiment", "comparison", "baseline", "position", "metric", "pairs", "mean_difference", "sd",
                         "ci95_half", "ci95_low", "ci95_high", "excludes_zero"])
        for c in comparisons:
            ci = c["interval"]
            writer.writerow([c["experiment"], c["comparison"], c["baseline"], position_text(c["position"]), c["metric"],
                             ci.n, *_numbers(ci), ci.excludes_zero])
    return path
