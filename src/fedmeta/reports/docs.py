"""Tables in the docs, regenerated from kept results: ``fedmeta report --docs FILE...``.

A generated table sits under an HTML comment (Markdown does not show it) that holds the command
printing it, and ends at the next ``<!-- end -->``::

    <!-- fedmeta report --table results/omniglot-exp1a-quick --where round=0,1,11 --metrics attack_val_accuracy -->
    | setting | position | attack_val_accuracy | seeds | episodes |
    ...
    <!-- end -->

Run the command in the repository root (it prints the table); ``fedmeta report --docs FILE``
runs every such command in FILE again and replaces the tables under them, so no number in the
docs is typed by hand, and ``--check`` only says which tables differ (a test does this for every
file in ``docs/``).

Options of a table command:

- ``FOLDER...``: run and sweep folders (relative to the repository root);
- ``--experiment NAME``: one experiment of those folders (default: all);
- ``--metrics m1,m2``: the metric columns, in this order (default: every metric);
- ``--where key=v1,v2``: only lines whose ``key`` is one of the values (repeatable). On an axis
  (``round``, ``step``) it picks those points of the curves; otherwise rows are the report's
  table rows (each curve's final evaluation or last point);
- ``--paired``: the paired differences (each setting against the first, each defense against
  none) of the same lines, instead of the means; ``--baseline key=value,...`` names the setting
  every other one is paired with instead of the first (the one setting whose label has those
  values, e.g. the full defense of an ablation);
- ``--against key=value``: the paired differences of each selected line against the line of the
  same setting and seed at ``key = value`` (e.g. ``--against round=0``: what the attack round changed, seed by
  seed), instead of the means;
- ``--mean-over key``: lines that differ only in ``key`` are merged, each seed's value being its
  mean over them (e.g. ``--mean-over user``: the benign users of one run), before the interval
  over seeds: the users of one run share its attacked model, so they are not independent samples;
- ``--columns key``: one column per value of the position key (``--columns defense``: a threat
  matrix, one row per attack and metric), the cells as in the table of means, and two more naming
  where each row's mean is lowest and highest (of a matrix's defenses, the server rules: its best
  and worst rule against that attack by that metric; by the means, not a test).
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedmeta.reports.collect import (
    AXES,
    CAPPED,
    Cell,
    ReportError,
    Table,
    find_runs,
    labels,
    table_lines,
    tabulate,
    within,
)
from fedmeta.storage import atomic_write

MARKER = re.compile(r"^<!-- fedmeta report (?P<args>.+?) -->\n(?P<table>.*?)^<!-- end -->$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class TableQuery:
    """Which numbers of which folders make one table."""

    folders: list[Path]
    experiment: str | None = None
    metrics: list[str] | None = None
    where: dict[str, list[str]] = field(default_factory=dict)
    paired: bool = False
    against: tuple[str, str] | None = None
    mean_over: str | None = None
    baseline: dict[str, str] = field(default_factory=dict)
    columns: str | None = None

    @classmethod
    def parse(cls, args: list[str]) -> TableQuery:
        """The query of a table command's arguments (as written after ``fedmeta report``)."""
        parser = _Parser(prog="fedmeta report", add_help=False)
        parser.add_argument("--table", action="store_true")  # the command as typed: it prints the table
        parser.add_argument("folders", nargs="+", type=Path)
        parser.add_argument("--experiment")
        parser.add_argument("--metrics", type=lambda s: s.split(","))
        parser.add_argument("--where", action="append", default=[])
        parser.add_argument("--paired", action="store_true")
        parser.add_argument("--against")
        parser.add_argument("--mean-over")
        parser.add_argument("--baseline")
        parser.add_argument("--columns")
        ns = parser.parse_args(args)
        return cls(ns.folders, ns.experiment, ns.metrics, where_filters(ns.where), ns.paired, against_of(ns.against),
                   ns.mean_over, baseline_of(ns.baseline), ns.columns)

    def within(self, root: Path) -> TableQuery:
        """The same query with its folders relative to ``root``."""
        return replace(self, folders=[root / f for f in self.folders])


def against_of(text: str | None) -> tuple[str, str] | None:
    """``"round=0"`` -> ``("round", "0")``."""
    if text is None:
        return None
    (key, values), = where_filters([text]).items()
    if len(values) != 1:
        raise ReportError(f"--against takes one key=value, got '{text}'")
    return key, values[0]


def baseline_of(text: str | None) -> dict[str, str]:
    """``"defense.mix=0.3,defense.gates=true"`` -> ``{"defense.mix": "0.3", "defense.gates": "true"}``."""
    if text is None:
        return {}
    pairs = [item.partition("=") for item in text.split(",")]
    if any(not key or not sep or not value for key, sep, value in pairs):
        raise ReportError(f"--baseline takes key=value,key=value,..., got '{text}'")
    return {key: value for key, _, value in pairs}


def _baseline_group(names: dict[str, dict], wanted: dict[str, str]) -> str | None:
    """The one setting whose label has the ``wanted`` values (as the label prints them)."""
    from fedmeta.reports import label_text

    if not wanted:
        return None
    found = [group for group, label in names.items()
             if all(key in label and label_text({key: label[key]}) == f"{key}={value}" for key, value in wanted.items())]
    if len(found) != 1:
        settings = "; ".join(label_text(label) for label in names.values())
        raise ReportError(f"--baseline {','.join(f'{k}={v}' for k, v in wanted.items())} matches {len(found)} "
                          f"settings, not one (the settings: {settings})")
    return found[0]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # a ReportError naming the problem, not a SystemExit
        raise ReportError(f"table command: {message}")


def where_filters(items: list[str]) -> dict[str, list[str]]:
    """``["round=0,1", "case=a"]`` -> ``{"round": ["0", "1"], "case": ["a"]}``."""
    out = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ReportError(f"--where takes key=v1,v2,..., got '{item}'")
        out[key] = values.split(",")
    return out


def table_text(query: TableQuery) -> str:
    """The Markdown table ``query`` asks for (what the table command prints), ending in a newline."""
    from fedmeta.reports import PAIRED_NOTE, comparisons_of, paired_markdown, pivot_markdown, table_markdown

    runs, _ = find_runs(query.folders)
    experiments = sorted({r.experiment for r in runs})
    experiment = query.experiment or (experiments[0] if len(experiments) == 1 else None)
    if experiment not in experiments:
        raise ReportError(f"--experiment: choose one of {', '.join(experiments)}")
    if query.baseline and not query.paired:
        raise ReportError("--baseline names the setting of --paired: give --paired too")
    if query.columns and (query.paired or query.against):
        raise ReportError("--columns turns the table of means: leave out --paired and --against")
    runs = [r for r in runs if r.experiment == experiment]
    on_axis = any(k in AXES for k in (*query.where, *(query.against or ())))
    every = tabulate(runs, (lambda records: records) if on_axis else table_lines)
    if query.mean_over:
        every = mean_over(every, query.mean_over)
    table = _select(every, query)
    if not table:
        raise ReportError(f"no line of {', '.join(map(str, query.folders))} matches {_describe(query)}")
    names = labels(runs)
    merged = (f" Each seed's value is its mean over `{query.mean_over}` (episodes: per {query.mean_over})."
              if query.mean_over else "")
    if query.against:
        pairs = _against(table, every, names, query.against)
        return "\n".join([AGAINST_NOTE + merged, "", *paired_markdown(pairs)]) + "\n"
    if query.paired:
        pairs = comparisons_of(table, names, _baseline_group(names, query.baseline))
        return "\n".join([PAIRED_NOTE + merged, "", *paired_markdown(pairs)]) + "\n"
    seeds = sorted({r.seed for r in runs})
    head = f"Seeds: {', '.join(map(str, seeds))} ({len(seeds)}); mean ± half-width of the 95% t-interval over seeds."
    capped = sorted({k[3] for k in table} & set(CAPPED))
    if capped:
        head += f" {', '.join(capped)}: each seed's value, \"≥\" where the backdoor outlived the rounds followed."
    body = pivot_markdown(table, names, experiment, query.columns) if query.columns else table_markdown(
        table, names, experiment)
    return "\n".join([head + merged, "", *body]) + "\n"


AGAINST_NOTE = ("Paired differences, seed by seed, each line against the line of the same setting and seed named "
                "under `against` (95% t-interval over seeds); `*`: the interval excludes 0 (a t-interval over "
                "few seeds rests on normality, and nothing corrects for the table's other lines).")


def _against(table: Table, every: Table, names: dict, against: tuple[str, str]) -> list[dict]:
    """Each cell of ``table`` minus the cell of ``every`` at the same position but ``key = value``."""
    from fedmeta.reports import label_text
    from fedmeta.reports.stats import paired

    key, value = against
    rows = []
    for (experiment, group, position, metric), cell in table.items():
        where = dict(position)
        if key not in where or str(where[key]) == value:
            continue
        base = next((c for (e, g, p, m), c in every.items() if (e, g, m) == (experiment, group, metric)
                     and dict(p).keys() == where.keys() and str(dict(p)[key]) == value
                     and all(dict(p)[k] == v for k, v in where.items() if k != key)), None)
        if base is not None:
            rows.append({"experiment": experiment, "comparison": label_text(names[group]), "baseline": f"{key} {value}",
                         "position": position, "metric": metric, "interval": paired(cell.values, base.values)})
    if not rows:
        raise ReportError(f"--against {key}={value}: no line at {key} = {value} to compare with")
    return rows


def mean_over(table: Table, key: str) -> Table:
    """``table`` with the cells that differ only in ``key`` of their position merged into one,
    whose value for each seed is the mean over them (see ``--mean-over``)."""
    merged: dict[tuple, list[Cell]] = defaultdict(list)
    for (experiment, group, position, metric), cell in table.items():
        merged[(experiment, group, tuple(pair for pair in position if pair[0] != key), metric)].append(cell)
    if len(merged) == len(table):
        raise ReportError(f"--mean-over {key}: no two lines differ only in '{key}'")
    out: Table = {}
    for where, cells in merged.items():
        seeds = set(cells[0].values)
        if any(set(c.values) != seeds for c in cells):
            raise ReportError(f"--mean-over {key}: the seeds differ between the lines merged at {dict(where[2])}")
        out[where] = Cell(_seed_means([c.values for c in cells]), set().union(*(c.episodes for c in cells)),
                          _seed_means([c.cap for c in cells]))  # a seed's mean is at its cap only if every line's is
    return out


def _seed_means(parts: list[dict[int, float]]) -> dict[int, float]:
    """Seed by seed, the mean over ``parts`` (the seeds all of them have)."""
    return {s: sum(p[s] for p in parts) / len(parts) for s in sorted(parts[0]) if all(s in p for p in parts)}


def _select(table: Table, query: TableQuery) -> Table:
    """The cells of ``table`` at positions ``query.where`` allows, for its metrics (in its order)."""
    cells = {k: v for k, v in table.items()
             if within(dict(k[2]), query.where) and (query.metrics is None or k[3] in query.metrics)}
    order = query.metrics or []
    return dict(sorted(cells.items(), key=lambda item: order.index(item[0][3]))) if order else cells


def _describe(query: TableQuery) -> str:
    parts = [f"{k}={','.join(v)}" for k, v in query.where.items()]
    return " and ".join(parts + ([f"metrics {','.join(query.metrics)}"] if query.metrics else [])) or "the query"


def refresh(text: str, root: Path) -> tuple[str, int]:
    """``text`` with every generated table replaced by its command's output (folders under
    ``root``), and the number of tables."""
    def table(match: re.Match) -> str:
        query = TableQuery.parse(shlex.split(match["args"])).within(root)
        return f"<!-- fedmeta report {match['args']} -->\n{table_text(query)}<!-- end -->"

    return MARKER.subn(table, text)


def refresh_files(paths: list[Path], root: Path, check: bool = False) -> dict[Path, bool]:
    """Regenerate the tables of ``paths`` (with ``check``, write nothing): for each file with a
    generated table, whether its tables changed."""
    changed = {}
    for path in paths:
        text = path.read_text()
        new, count = refresh(text, root)
        if count:
            changed[path] = new != text
            if new != text and not check:
                mode = path.stat().st_mode
                atomic_write(path, new.encode())  # a kill mid-write must not leave half a document
                path.chmod(mode)  # (the temporary file it renames is private)
    if not changed:
        raise ReportError(f"no generated table (a line '<!-- fedmeta report ... -->') in {', '.join(map(str, paths))}")
    return changed
