"""Registries: where every pluggable part of fedmeta is found by name.

Aggregation rules, attack strategies, local defenses, meta-learners, datasets and trigger patterns
each live in one ``Registry``. A config names them (``federation.rule = "median"``); validation,
cache keys, the Flower mapping and ``fedmeta presets`` read the registry, so adding a part is one
file that calls ``REGISTRY.register`` (see the README's developer guide). A registry's built-in
parts register themselves when their module is imported; ``Registry`` imports those modules on
first use, so this module depends on nothing and sits below every layer.

A rule may also be named as a variant, ``base:label`` (``freqfed:layers``): the registered rule
``base`` with the settings of its own table (``[rules."freqfed:layers"]``), so that one comparison
holds two settings of one rule as two rows.

Your own parts: put them in a module or a ``.py`` file and name it in the config's ``plugins``
list; fedmeta imports it before validating the config, in every process that runs the experiment
(Flower nodes included).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """A name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered part: ``factory`` builds it; ``options`` (a pydantic model) types its settings."""

    name: str
    factory: T
    options: type | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def doc(self) -> str:
        """The first paragraph of the factory's docstring, on one line."""
        text = (getattr(self.factory, "__doc__", None) or "").strip()
        return " ".join(text.split("\n\n")[0].split())


VARIANT = ":"
"""Separates a registered name from a variant's label (``freqfed:layers``), where a registry takes variants."""


class Registry(Generic[T]):
    """Named parts of one kind (``kind``, as the config key that names them, e.g. "federation.rule").
    With ``variants``, ``base:label`` names the part ``base`` (its settings are the caller's)."""

    def __init__(self, kind: str, key: str, builtins: Iterable[str] = (), variants: bool = False) -> None:
        self.kind, self.key, self.variants = kind, key, variants
        self._builtins = tuple(builtins)
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False

    def register(self, name: str, *, options: type | None = None, **info: Any) -> Callable[[T], T]:
        """Decorator: ``@RULES.register("median")`` over the factory. ``info`` holds extra facts
        a caller reads (e.g. ``flower=...`` for rules Flower implements)."""

        if self.variants and VARIANT in name:
            raise ValueError(f"{self.kind} '{name}': '{VARIANT}' is kept for variants (NAME{VARIANT}LABEL)")

        def add(factory: T) -> T:
            if name in self._entries and self._entries[name].factory is not factory:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = Entry(name, factory, options, info)
            return factory

        return add

    def get(self, name: str) -> Entry[T]:
        self._load()
        base = self.base(name)
        if base not in self._entries:
            raise RegistryError(f"{self.key}: {self.unknown(name)}")
        return self._entries[base]

    def unknown(self, name: str) -> str:
        """Why ``name`` is refused: what is registered (and, where variants are taken, their form)."""
        variants = f" (or a variant of one, 'NAME{VARIANT}LABEL')" if self.variants else ""
        return f"unknown {self.kind} '{name}'; registered: {', '.join(self.names())}{variants}"

    def base(self, name: str) -> str:
        """The registered name that ``name`` is a variant of (``name`` itself if it is none)."""
        head, sep, label = name.partition(VARIANT)
        return head if self.variants and sep and label else name

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and self.base(name) in self._entries

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._builtins:
                importlib.import_module(module)


def load_plugins(plugins: Iterable[str]) -> None:
    """Import each plugin: a module name (``my_pkg.rules``) or the path of a ``.py`` file."""
    for plugin in plugins:
        if plugin.endswith(".py"):
            path = Path(plugin).expanduser().resolve()
            name = f"fedmeta_plugin_{path.stem}_{abs(hash(str(path))):x}"
            if name in sys.modules:
                continue
            if not path.is_file():
                raise RegistryError(f"plugins: no such file {path}")
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(plugin)
            except ImportError as err:
                raise RegistryError(f"plugins: cannot import '{plugin}' ({err})") from None


RULES: Registry = Registry("aggregation rule", "federation.rule", [f"fedmeta.federation.{m}" for m in (
    "aggregation", "foolsgold", "flame", "fltrust", "bulyan", "centered_clipping", "dnc", "rlr", "freqfed")],
    variants=True)
ATTACKS: Registry = Registry("attack strategy", "attack.attackers.strategy", [f"fedmeta.attacks.{m}" for m in (
    "strategies", "replacement", "projected", "neurotoxin", "dba", "alie")])
LOCAL_DEFENSES: Registry = Registry("local defense", "local_defenses", ["fedmeta.experiments.local_defenses",
                                                                         "fedmeta.experiments.fine_pruning"])
LEARNERS: Registry = Registry("meta-learner", "meta.algorithm", ["fedmeta.meta.learner", "fedmeta.defenses.robust_maml"])
DATASETS: Registry = Registry("dataset", "data.dataset", ["fedmeta.data.datasets"])
TRIGGERS: Registry = Registry("trigger pattern", "attack.trigger.pattern", ["fedmeta.data.triggers"])

ALL = {"rules": RULES, "attacks": ATTACKS, "local defenses": LOCAL_DEFENSES, "meta-learners": LEARNERS,
       "datasets": DATASETS, "triggers": TRIGGERS}
