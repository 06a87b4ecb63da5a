"""Reading configs: presets, TOML files, ``extends``, ``--set`` overrides, and errors that name the key.

``fedmeta run CONFIG`` takes a preset name (a TOML file in ``fedmeta/experiments/presets``) or a
path to a TOML file, applies ``key=value`` overrides and validates the result against the
experiment's family (``schema``), then against its dataset's sizes and this machine's memory
(``limits``). Unknown keys and bad values are refused with the dotted key and what it accepts; keys that moved in a redesign are refused with their new name. A preset may start
from another with ``extends = "name"``; the resolved config is written to the run folder in full,
so a run can always be repeated from its folder.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from fedmeta.config.limits import problems
from fedmeta.config.schema import FAMILIES, Config
from fedmeta.config.sections import ConfigError
from fedmeta.registry import RegistryError, load_plugins

PRESETS = resources.files("fedmeta") / "experiments" / "presets"
_ADAPTER: TypeAdapter = TypeAdapter(Config)

MOVED = {
    ("attack", "attacker"): "attack.attackers = [{user = N}] (one entry per malicious user)",
    ("attack", "rounds"): "attack.attackers = [{user = 0, rounds = [...]}] (rounds per malicious user)",
    ("attack", "boost"): "attacks.boosted.boost",
    ("attack", "episodes"): "attacks.boosted.episodes",
    ("attack", "inner_epochs"): "attacks.boosted.inner_epochs",
    ("federation", "trim"): "rules.trimmed-mean.trim",
    ("federation", "byzantine"): "rules.krum.byzantine and rules.multi-krum.byzantine",
    ("federation", "krum_select"): "rules.multi-krum.select",
    ("mia", "aggregate"): "mia.users_per_round (the secure-aggregation server's M per point, with mia.threats = [..., \"secagg\"])",
    ("federation", "clip_norm"): "rules.clip.norm",
    ("federation", "clip_noise"): "rules.clip.noise",
    ("compare", "local_defense"): "compare.local_defenses = ['matching'] (or [] for none)",
}
"""Keys of earlier versions and where their meaning lives now."""


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in PRESETS.iterdir() if p.name.endswith(".toml"))


def preset_description(name: str) -> str:
    return str(_read(name, seen=()).get("description", ""))


def load_config(source: str, overrides: list[str] = ()) -> Config:
    """A preset name or TOML path, with ``key=value`` overrides, validated."""
    raw = _read(source, seen=())
    if "sweep" in raw:
        raise ConfigError(f"{source} is a sweep (it has a [sweep] table): run it with `fedmeta sweep {source} --out DIR`")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes key=value, got '{item}'")
        _assign(raw, key.strip().split("."), _parse_value(value.strip()))
    return validate(raw)


def validate(raw: dict[str, Any]) -> Config:
    """The typed config of ``raw`` (its plugins imported first, so their parts are known)."""
    moved = [f"  {a}.{b}: moved; use {new}" for (a, b), new in MOVED.items() if b in (raw.get(a) or {})]
    if moved:
        raise ConfigError("invalid config:\n" + "\n".join(moved))
    try:
        load_plugins(raw.get("plugins") or [])
    except RegistryError as err:
        raise ConfigError(f"invalid config:\n  {err}") from None
    if raw.get("experiment") not in FAMILIES:
        got = raw.get("experiment")
        raise ConfigError(f"invalid config:\n  experiment: one of {', '.join(FAMILIES)} (got {got!r})")
    try:
        cfg = _ADAPTER.validate_python(raw)
    except ValidationError as err:
        family = FAMILIES[raw["experiment"]]
        lines = [_explain(e, family, raw["experiment"]) for e in err.errors()]
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None
    if found := problems(cfg):
        raise ConfigError("impossible config:\n" + "\n".join(f"  {line}" for line in found))
    return cfg


def read_toml(source: str) -> dict[str, Any]:
    """The TOML table of a config file or preset, before ``extends`` is resolved."""
    path = Path(source)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read it as text ({err})") from None
    else:
        preset = PRESETS / f"{source}.toml"
        if not preset.is_file():
            raise ConfigError(f"unknown preset '{source}'; presets: {', '.join(preset_names())}")
        text = preset.read_text()
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from None


def _read(source: str, seen: tuple[str, ...]) -> dict[str, Any]:
    raw = read_toml(source)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if parent in seen:
        raise ConfigError(f"presets extend each other in a loop: {' -> '.join((*seen, parent))}")
    base = _read(parent, (*seen, source))
    base.pop("sweep", None)  # a sweep's grid belongs to its own file: extending it gives the base config
    return _merge(base, raw)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _assign(raw: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = raw.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: '{part}' is a value, not a section")
        raw = node
    raw[path[-1]] = value


def _parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``true``, ``[5, 1]``, ``"x"``, ``{user = 1}``), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _explain(error: dict[str, Any], family: type[BaseModel], tag: str) -> str:
    loc = tuple(error["loc"])
    if loc and loc[0] == tag:
        loc = loc[1:]  # the discriminated union puts the experiment's name first
    key = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"  {key}: unknown key; allowed here: {', '.join(_allowed_keys(family, loc[:-1]))}"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict | list) and error["type"] != "value_error" else ""
    return f"  {message}" if not loc else f"  {key}: {message}{shown}"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
