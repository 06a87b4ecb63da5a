"""Reading run folders into rows: which runs form a group (same config but the seed), where a
metric line sits (its position), and which lines make the table.

- A **group** is the runs whose resolved configs differ only in ``seed`` (and keys that do not
  change results: threads, data root, description); groups are labelled by the keys that vary.
- A line's **position** is its values of ``POSITION`` keys (case, user, threat, round, step, defense,
  shots, ...): lines of different seeds at one position are averaged.
- The **table** holds, for each curve (position without its axis), the ``final`` lines if it has
  any, else its last point; lines without an axis (one row per defense, say) are all rows.
- A **metric** is a number field named ``*accuracy``, ``*_lift``, ``*_auc``, ``*_fpr``, ``*_weight`` or
  ``*_survived``. A comparison's row without an ``attack_val_lift`` gets one (``with_lifts``).
"""

from __future__ import annotations

import json
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmeta.config import ConfigError, validate
from fedmeta.reports.stats import Interval, interval
from fedmeta.runs import FREE_KEYS, RunDir, flat_keys, in_use, matches
from fedmeta.storage import atomic_write

POSITION = ("learner", "case", "user", "stage", "threat", "users", "target", "nonmember", "attack", "score", "iterations",
            "ways", "k", "defense", "scale", "shots", "round", "step", "final")
AXES = ("round", "step")
METRIC_SUFFIXES = ("accuracy", "_lift", "_auc", "_fpr", "_weight", "_survived")
POINTS = ("accuracy", "_lift")
"""Metrics shown in percent (points, for a ``_lift``: a difference of two accuracies)."""
IGNORED = ("seed", "description", "data.root", "runtime.", "eval.workers", "federation.reply_timeout", "robust.learners")
"""Config keys that do not change results, so do not make two runs different settings (``runtime.``
covers threads and device; ``eval.workers`` only where evaluation episodes run; ``robust.learners``
which learners' lines a run has, not their numbers: a learner scores the same alone or beside
others, so runs that trained different learners of one seed pair up as one setting)."""

Position = tuple[tuple[str, Any], ...]


class ReportError(RuntimeError):
    """The folders given to ``fedmeta report`` hold nothing it can read."""


@dataclass
class Run:
    path: Path
    experiment: str
    seed: int
    setting: dict[str, Any]
    records: list[dict[str, Any]]
    episodes: int | None = None  # evaluation episodes per point, for lines that do not say (``eval_episodes``)
    dataset: str | None = None


@dataclass
class Cell:
    """One metric at one position of one group: its value and episode count per seed."""

    values: dict[int, float] = field(default_factory=dict)
    episodes: set[int] = field(default_factory=set)
    cap: dict[int, float] = field(default_factory=dict)
    """Per seed, the largest value a ``CAPPED`` count could take (empty for other metrics)."""
    within: dict[int, float] = field(default_factory=dict)
    """Per seed, the half-width of the run's own 95% interval over its episodes (``<metric>_ci95``
    in its line), where it logs one: the only interval a single seed has."""

    def interval(self) -> Interval:
        """The mean over seeds and its 95% t-interval (values in seed order)."""
        return interval([self.values[s] for s in sorted(self.values)])


CAPPED = {"rounds_survived": "rounds_followed"}
"""A count and the metric of its line that caps it. At the cap it means "at least" (the backdoor
was still present after the last round followed), so a mean and t-interval over seeds would
understate it and pretend a symmetric spread: reports show each seed's value, "≥" at the cap."""


def capped_text(metric: str, cell: Cell, sep: str = ", ") -> str | None:
    """Seed by seed, the values of a ``CAPPED`` count, "≥" at the cap (``None`` for other metrics)."""
    if metric not in CAPPED:
        return None
    return sep.join(f"≥ {v:g}" if v and cell.cap.get(s) == v else f"{v:g}" for s, v in sorted(cell.values.items()))


def find_runs(folders: list[Path]) -> tuple[list[Run], list[Path]]:
    """The finished runs under ``folders`` (a run folder, or a folder of them such as a sweep),
    and the unfinished ones left out."""
    runs, unfinished = [], []
    for folder in folders:
        if not folder.is_dir():
            raise ReportError(f"{folder} is not a folder")
        candidates = [folder] if (folder / "config.toml").is_file() else sorted(
            p for p in folder.iterdir() if (p / "config.toml").is_file())
        if not candidates:
            raise ReportError(f"{folder} holds no run folder (no config.toml in it or its subfolders)")
        for path in candidates:
            if (path / "summary.json").is_file():
                runs.append(load(path))
            else:
                unfinished.append(path)
    if not runs:
        raise ReportError("no finished run in " + ", ".join(map(str, folders)))
    return runs, unfinished


KEPT = (RunDir.CONFIG, RunDir.METRICS, RunDir.SUMMARY, RunDir.RESUMES)
"""What ``keep`` copies of a run folder: everything a report reads, no weights or checkpoints."""
KEPT_SWEEP = ("sweep.json", "base.toml")


def keep(source: Path, dest: Path) -> list[Path]:
    """Copy the small files of the finished runs under ``source`` (a run or sweep folder) to
    ``dest``, in the same layout, for a ``results/`` folder kept in git; the files written.
    Only files of those names are written, so nothing else in ``dest`` is touched; a ``dest`` that
    holds anything must be an earlier keep of this run or sweep (the same config or base config:
    a sweep's cells kept as they finish), so that one keep never replaces another's files."""
    runs, _ = find_runs([source])
    _check_keep(source, dest)
    pairs = [(source / name, dest / name) for name in KEPT_SWEEP if (source / name).is_file()]
    for run in runs:
        where = dest / run.path.relative_to(source)
        pairs += [(run.path / name, where / name) for name in KEPT if (run.path / name).is_file()]
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dst, src.read_bytes())
    return [dst for _, dst in pairs]


def _check_keep(source: Path, dest: Path) -> None:
    name = "base.toml" if (source / "base.toml").is_file() else RunDir.CONFIG  # a sweep's, or a run's
    check_keep_target(dest, name, _meaning(source / name), str(source))


def check_keep_target(dest: Path, name: str, config: Any, source: str) -> None:
    """Refuse ``dest`` unless it is empty, new, or an earlier keep of ``source``, whose config file
    ``name`` (``base.toml`` for a sweep) means ``config`` (``config_meaning``). ``fedmeta sweep
    --keep`` asks before its first cell, so a wrong folder is named before hours of work."""
    if dest.exists() and not dest.is_dir():
        raise ReportError(f"{dest} is a file, not a folder")
    if not dest.is_dir() or not any(dest.iterdir()):
        return
    if not (dest / name).is_file() or _meaning(dest / name) != config:
        raise ReportError(f"{dest} holds files but not an earlier keep of {source} (its {name} differs or is "
                          "missing); keep into a new folder")


def config_meaning(text: str) -> dict[str, Any]:
    """What makes a run or sweep the same one when it is kept again: its config as this fedmeta
    reads it (``resolved``: defaults filled in, so keys a newer fedmeta added do not count), less
    the keys a resume may change (``FREE_KEYS``: threads, data root, ...) and the settings of
    strategies no attacker runs (``in_use``), as ``fedmeta run`` and ``fedmeta sweep`` tell a
    resume from another run. Raises ``ValueError`` on text that is not TOML."""
    return {k: v for k, v in flat_keys(in_use(resolved(tomllib.loads(text)))).items() if not matches(k, FREE_KEYS)}


def _meaning(path: Path) -> Any:
    """``config_meaning`` of a config file; a file that is not TOML (someone's notes) stands for
    its bytes; no file (a folder of runs has no config of its own), for ``None``."""
    if not path.is_file():
        return None
    try:
        return config_meaning(path.read_text())
    except (OSError, ValueError):  # ValueError: TOML and UTF-8 decoding
        return path.read_bytes()


def load(path: Path) -> Run:
    try:
        config = resolved(tomllib.loads((path / "config.toml").read_text()))
        records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError) as err:  # ValueError: TOML, JSON and UTF-8 decoding
        raise ReportError(f"{path}: cannot read this run ({err})") from None
    setting = {k: v for k, v in flat_keys(in_use(config)).items() if not matches(k, IGNORED)}
    return Run(path, config["experiment"], int(config.get("seed", 0)), setting, with_lifts(records),
               summary.get("eval_episodes"), config.get("data", {}).get("dataset"))


def resolved(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every default of this fedmeta filled in, so a run written before a key
    existed (with that key's default behaviour) groups with runs written after; as written if
    this fedmeta cannot validate it, or if it names plugins: validating imports them, and a
    results folder is data (one checked into git, or sent by a colleague) whose reading must
    never run its code."""
    if config.get("plugins"):
        return config
    try:
        return validate(config).model_dump(mode="json")
    except ConfigError:
        return config


def labels(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Each group's key (its setting as JSON) -> its label: the values of the keys that vary."""
    settings = {_key(r.setting): r.setting for r in runs}
    keys = sorted({k for s in settings.values() for k in s})
    varying = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings.values()}) > 1]
    # Keys every setting has tell settings apart more readably than the options of parts that only
    # some use (another attack's table, another rule's): use them alone when they suffice.
    shared = [k for k in varying if all(k in s for s in settings.values())]
    if len({json.dumps([s.get(k) for k in shared]) for s in settings.values()}) == len(settings):
        varying = shared
    return {key: {k: s.get(k) for k in varying} for key, s in settings.items()}


def _key(setting: dict[str, Any]) -> str:
    return json.dumps(setting, sort_keys=True)


def group_of(run: Run) -> str:
    return _key(run.setting)


def position(record: dict[str, Any]) -> Position:
    return tuple((k, record[k]) for k in POSITION if k in record)


def metrics(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items()
            if k.endswith(METRIC_SUFFIXES) and isinstance(v, float | int) and not isinstance(v, bool)}


def with_lifts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A defense comparison's rows, each with ``attack_val_lift``: its attack-val minus its
    reference's, on the same evaluation episodes and seed, so that the difference is paired. A
    server rule's reference is the run's ``before the attack`` row (the model a rule that removes
    the attack brings back); a local defense's, its own ``clean_attack_val_accuracy`` (that defense
    on the round nobody attacked: fine-tuning on a user's own classes moves attack-val by itself),
    as Experiments 2 and 3 log it with ``finetune.clean_twin``. A local row of an older version,
    without that reference, gets none; a logged lift is kept."""
    if not any("defense" in r and "attack_val_accuracy" in r for r in records):
        return records
    from fedmeta.experiments.comparison import BEFORE, is_local  # here: other results are read without torch

    before = next((r.get("attack_val_accuracy") for r in records if r.get("defense") == BEFORE), None)

    def reference(row: dict[str, Any]) -> float | None:
        if is_local(row["defense"]):
            return row.get("clean_attack_val_accuracy")
        return None if row["defense"] == BEFORE else before

    out = []
    for row in records:
        ref = reference(row) if "defense" in row and "attack_val_lift" not in row else None
        has = isinstance(row.get("attack_val_accuracy"), float | int) and isinstance(ref, float | int)
        out.append(row | {"attack_val_lift": round(row["attack_val_accuracy"] - ref, 6)} if has else row)
    return out


def within(fields: dict[str, Any], where: dict[str, list[str]]) -> bool:
    """Whether a line (or a position as a dict) has every key of ``where`` at one of its values
    (compared as text: ``--where round=1``)."""
    return all(k in fields and str(fields[k]) in values for k, values in where.items())


def series(pos: Position) -> Position:
    """A position without its axis and ``final`` flag: the curve it belongs to."""
    return tuple((k, v) for k, v in pos if k not in (*AXES, "final"))


def table_lines(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lines of one run that make table rows (see the module docstring)."""
    curves: dict[Position, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        curves[series(position(record))].append(record)
    out = []
    for lines in curves.values():
        finals = [r for r in lines if r.get("final")]
        axis = next((a for a in AXES if any(a in r for r in lines)), None)
        out += finals or ([max(lines, key=lambda r: r.get(axis, -1))] if axis else lines)
    return out


def curve_lines(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lines of one run that are points of a curve (an axis, not a final evaluation)."""
    return [r for r in records if any(a in r for a in AXES) and not r.get("final")]


Table = dict[tuple[str, str, Position, str], Cell]
"""(experiment, group, position, metric) -> values over seeds."""


def tabulate(runs: list[Run], pick) -> Table:
    """The cells of the lines ``pick(records)`` chooses, over every run."""
    table: Table = defaultdict(Cell)
    for run in runs:
        for record in pick(run.records):
            for name, value in metrics(record).items():
                cell = table[(run.experiment, group_of(run), position(record), name)]
                if run.seed in cell.values:
                    raise ReportError(f"two runs of one setting have seed {run.seed} (one is {run.path}); "
                                      "report them separately")
                cell.values[run.seed] = float(value)
                if name in CAPPED and CAPPED[name] in record:
                    cell.cap[run.seed] = float(record[CAPPED[name]])
                if isinstance(half := record.get(f"{name}_ci95"), (int, float)):
                    cell.within[run.seed] = float(half)
                if (episodes := record.get("episodes", record.get("trials", run.episodes))) is not None:
                    cell.episodes.add(int(episodes))
    return table
