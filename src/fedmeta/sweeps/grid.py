"""A sweep's cells: the base config, the grid of ``key=value`` overrides and the seeds.

A grid value is written exactly like a ``--set`` value (TOML value syntax) and the values of one
key are separated by commas outside brackets, braces and quotes: ``meta.inner_lr=0.001,0.01``,
``eval.shots=[5],[1]``, ``attack.cases=["a"],["b","c"]``. Each cell is the base config with one
value per key and one seed (``seed = base seed + i`` for ``i < seeds``), and is validated by
``load_config`` like a ``fedmeta run --set`` before any cell starts, so a typo or a wrong type
fails in a second instead of after an hour of other cells.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import tomli_w

from fedmeta.config import Config, ConfigError, load_config
from fedmeta.config.loader import read_toml

SWEEP_KEYS = ("grid", "seeds")
"""What a ``[sweep]`` table of a TOML config may hold (``grid`` maps keys to lists of values)."""


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: its folder name and the overrides that make it from the base."""

    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """The validated base config and the cells of a sweep."""

    base: Config
    grid: dict[str, list[str]]
    seeds: int
    cells: list[Cell]


def split_values(text: str) -> list[str]:
    """``v1,v2,...`` split at commas outside brackets, braces and quotes (a TOML array stays whole)."""
    values, depth, quote_char, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote_char:
            quote_char = "" if char == quote_char else quote_char
        elif char in "\"'":
            quote_char = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``--grid key=v1,v2`` options as ``{key: [v1, v2]}`` (value texts, parsed later like ``--set``)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid takes key=v1,v2,..., got '{item}'")
        if key == "seed":
            raise ConfigError("--grid seed: use --seeds N (seeds base seed, base seed + 1, ...)")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice")
        grid[key] = split_values(values)
        if "" in grid[key]:
            raise ConfigError(f"--grid {key}: an empty value in '{values}'")
    return grid


def read_source(source: str) -> tuple[str, dict[str, Any]]:
    """The config source (a preset or TOML file) without its ``[sweep]`` table (a temporary TOML
    file if it had one), and that table (``{}`` if it has none). A ``[sweep]`` table belongs to the
    file that holds it: one in a preset it ``extends`` is not inherited."""
    try:
        raw = read_toml(source)
    except ConfigError:
        return source, {}  # load_config reports it with its usual message
    table = raw.pop("sweep", None)
    if table is None:
        return source, {}
    unknown = sorted(set(table) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"[sweep] {', '.join(unknown)}: unknown key; allowed here: {', '.join(SWEEP_KEYS)}")
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(tomli_w.dumps(raw))
    return f.name, table


def table_grid(table: dict[str, Any]) -> dict[str, list[str]]:
    """A ``[sweep.grid]`` table (``"meta.inner_lr" = [0.001, 0.01]``) as value texts."""
    grid = table.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError("[sweep] grid: a table of key = [value, ...] (each a non-empty list)")
    return {key: [_toml_value(v) for v in values] for key, values in grid.items()}


def _toml_value(value: Any) -> str:
    """``value`` as one inline TOML value (the ``--set`` syntax): tables as ``{k = v}``, since
    ``tomli_w`` writes a list of tables as ``[[...]]`` sections."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def _toml_key(key: str) -> str:
    return tomli_w.dumps({key: 0}).rpartition("=")[0].strip()


def plan(source: str, overrides: list[str], grid_items: list[str], seeds: int | None) -> Plan:
    """The base config and every cell of ``grid x seeds``, each validated (``ConfigError`` names
    the grid key and value a cell cannot have)."""
    path, table = read_source(source)
    try:
        grid = table_grid(table) | parse_grid(grid_items)
        seeds = seeds if seeds is not None else int(table.get("seeds", 1))
        if seeds < 1:
            raise ConfigError(f"--seeds takes a count >= 1, got {seeds}")
        base = load_config(path, overrides)
        for key, values in grid.items():
            for value in values:
                _check(path, [*overrides, f"{key}={value}"], f"--grid {key}={value}")
        cells = [_cell(base, combo, seed) for combo in _combos(grid) for seed in range(base.seed, base.seed + seeds)]
        for cell in cells:
            _check(path, [*overrides, *cell.overrides], f"cell {cell.name}")
    finally:
        if path != source:
            Path(path).unlink(missing_ok=True)
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ConfigError("two grid values give the same cell name: " + ", ".join(sorted({n for n in names if names.count(n) > 1})))
    return Plan(base, grid, seeds, cells)


def _check(path: str, overrides: list[str], what: str) -> None:
    try:
        load_config(path, overrides)
    except ConfigError as err:
        raise ConfigError(f"{what}: {err}") from None


def _combos(grid: dict[str, list[str]]) -> list[list[tuple[str, str]]]:
    return [list(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


NAME_BYTES = 255
"""The longest file name most file systems take; a longer cell name keeps its first part and a digest."""


def _cell(base: Config, combo: list[tuple[str, str]], seed: int) -> Cell:
    settings = [(key, value) for key, value in combo] + [("seed", str(seed))]
    # a key's variant label may hold a path separator ('rules.clip:a/b.norm'): one folder, not two
    name = "__".join(f"{quote(key, safe=_KEY_SAFE)}={_slug(value)}" for key, value in settings)
    if len(name) > NAME_BYTES:  # ASCII after quoting; the digest keeps long names distinct
        name = f"{name[: NAME_BYTES - 18]}~{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return Cell(name, tuple(f"{key}={value}" for key, value in settings))


_KEY_SAFE = "".join(chr(c) for c in range(33, 127) if chr(c) not in '/\\%"')
"""What a key keeps unquoted in a cell name: printable ASCII but path separators, % and quotes."""


def _slug(value: str) -> str:
    """A value as a folder-name part: compact, with identifier-like strings unquoted and tables
    written ``{key=value,...}`` (``[{user=0,strategy=alie}]``, not ``[{%22user%22:0,...}]``),
    percent-encoded outside a safe set that holds no character Windows forbids in a name; other
    strings keep their quotes, so distinct values still give distinct names."""
    parsed = tomllib.loads(f"v = {value}")["v"] if _is_toml(value) else value
    text = parsed if isinstance(parsed, str) else _compact(parsed)
    return quote(text, safe="[]{}=,.-_+@")


_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_WORDS = ("true", "false", "null", "Infinity", "NaN")  # what JSON writes for non-strings


def _compact(value: Any) -> str:
    """Compact JSON with ``=`` between a table's keys and values, and strings that cannot be read
    as another value (numbers, true, false, null, or a quoted string) written bare."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{_compact(str(k))}={_compact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_compact(v) for v in value) + "]"
    if isinstance(value, str) and _BARE.fullmatch(value) and value not in _WORDS:
        return value
    return json.dumps(value, separators=(",", ":"))


def _is_toml(value: str) -> bool:
    try:
        tomllib.loads(f"v = {value}")
    except tomllib.TOMLDecodeError:
        return False
    return True
