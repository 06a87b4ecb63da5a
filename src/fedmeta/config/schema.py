"""One config model per experiment family, told apart by ``experiment``.

Each family has exactly the sections it reads, so a key that an experiment would ignore is
refused (``--set robust.epsilon=4`` on a backdoor preset names the key and the allowed ones),
and the resolved ``config.toml`` holds nothing that does not matter. Where families share a
section but not all of its keys, a family refuses a value other than the default for a key it
does not read (``_unread``: ``federation.dirichlet_alpha`` in robustness-federated, ...).

Still accepted, though not read everywhere: ``federation.rounds`` and ``federation.eval_every`` in
Experiments 2 and 3 and the defense comparison (presets inherit them from Experiment 1's, and
cached clean scores are keyed by the whole config, so refusing them would split the threat
matrix's cache), and a ``[rules.<name>]`` table of a rule the run does not use (presets list every
rule's settings once; a comparison picks its rules from them).

| family | experiments | sections beyond data, model, meta, eval, runtime |
| --- | --- | --- |
| centralised | pretrain | - |
| backdoor | backdoor-rounds, backdoor-finetune, defense-finetune, defense-comparison, backdoor-core | federation, rules, pretrain, attack, attacks (+ finetune, defense, compare) |
| robustness | robustness | robust |
| robustness, federated | robustness-federated | federation, rules, robust |
| privacy | membership | mia |
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

import tomli_w
from pydantic import Field, field_validator, model_validator

from fedmeta.config.sections import (
    AttackConfig,
    CompareConfig,
    DataConfig,
    DefenseConfig,
    EvalConfig,
    FederationConfig,
    FinetuneConfig,
    MetaConfig,
    MiaConfig,
    ModelConfig,
    PretrainConfig,
    RobustConfig,
    RuntimeConfig,
    Section,
    options_of,
    validate_options,
)
from fedmeta.registry import ATTACKS, LOCAL_DEFENSES, RULES


class Base(Section):
    experiment: str
    description: str = ""
    seed: int = 0
    plugins: list[str] = []
    """Modules or ``.py`` files imported before the config is read: your own registered parts."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    meta: MetaConfig = MetaConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    federated: ClassVar[bool] = False
    """Whether clients train through a federation (and so may run on another engine)."""
    reserves_classes: ClassVar[bool] = False
    """Whether the experiment reserves backdoor classes (and so reads ``data.reserved_classes``)."""

    @model_validator(mode="after")
    def _reserved_classes(self) -> Base:
        if not self.reserves_classes:
            _unread(self, {"data.reserved_classes": "it reserves no backdoor classes"})
        return self

    @model_validator(mode="after")
    def _runtime(self) -> Base:
        if self.runtime.batched and self.meta.adam_carry != "parallel":
            raise ValueError(
                "runtime.batched = true needs meta.adam_carry = 'parallel' (episodes that run at once "
                "cannot pass Adam moments to each other)"
            )
        if self.runtime.batched and self.meta.algorithm != "reptile":
            raise ValueError("runtime.batched applies to meta.algorithm = 'reptile' only")
        return self

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))


def _unread(cfg: Base, keys: dict[str, str]) -> None:
    """Refuse a value other than the default for each dotted key of ``keys`` (key -> why the
    experiment does not read it): sections are shared between families, their keys not always."""
    for key, why in keys.items():
        section, name = key.split(".")
        part = getattr(cfg, section)
        default = type(part).model_fields[name].get_default(call_default_factory=True)
        if getattr(part, name) != default:
            raise ValueError(f"{key} = {getattr(part, name)!r}: experiment '{cfg.experiment}' does not read it "
                             f"({why}); leave it at {default!r}")


def _one_shot_count(cfg: Base) -> None:
    if len(cfg.eval.shots) > 1:
        raise ValueError(f"eval.shots = {cfg.eval.shots}: experiment '{cfg.experiment}' evaluates one shot count; "
                         "run one config per count (fedmeta sweep --grid 'eval.shots=[5],[1]')")


def _with_defaults(raw: dict[str, Any], table: str, names: list[Any], registry: Any) -> dict[str, Any]:
    """``raw`` with an (empty, to be filled with defaults) entry in ``[table]`` for each registered
    name in use, so the resolved config shows every setting that matters."""
    entries = dict(raw.get(table) or {})
    for name in names:
        if isinstance(name, str) and name in registry:
            entries.setdefault(name, {})
    return {**raw, table: entries}


def _variants_given(names: list[Any], tables: dict[str, Any]) -> None:
    """Refuses a rule variant (``freqfed:layers``) in use without its own table: it would be its
    rule with the defaults, a second row of one rule under another name."""
    for name in names:
        if isinstance(name, str) and name in RULES and RULES.base(name) != name and name not in tables:
            raise ValueError(f"rule '{name}' is a variant of '{RULES.base(name)}': give its settings in "
                             f"[rules.\"{name}\"] (--set rules.{name}.KEY=VALUE)")


class Federated(Base):
    federation: FederationConfig = FederationConfig()
    rules: dict[str, dict[str, Any]] = {}
    """Settings of aggregation rules, by rule name (or a variant's, ``rule:label``: the rule with
    the settings of its own table, e.g. ``[rules."freqfed:layers"]``); the rules in use are filled in."""

    federated: ClassVar[bool] = True

    def used_rules(self) -> list[str]:
        return [self.federation.rule]

    @model_validator(mode="before")
    @classmethod
    def _fill_rules(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            names = [(raw.get("federation") or {}).get("rule", "fedavg")]
            if "compare" in cls.model_fields:
                names += (raw.get("compare") or {}).get("rules", CompareConfig().rules)
            _variants_given(names, raw.get("rules") or {})
            raw = _with_defaults(raw, "rules", names, RULES)
        return raw

    check_rules = field_validator("rules")(lambda v: validate_options(RULES, v))

    def rule_options(self, name: str) -> dict[str, Any]:
        """The settings of rule ``name`` (its defaults where the config gives none)."""
        return self.rules.get(name) or options_of(RULES, name, {})

    @model_validator(mode="after")
    def _federation(self) -> Federated:
        fed = self.federation
        if not fed.min_updates <= fed.per_round <= fed.users:
            raise ValueError("need federation.min_updates <= federation.per_round <= federation.users")
        if fed.secure_aggregation:
            for name in self.used_rules():
                if RULES.get(name).info.get("individual", True):
                    raise ValueError(
                        f"federation.rule = '{name}' needs every update on its own, which secure aggregation hides; "
                        "use federation.rule = 'fedavg' or federation.secure_aggregation = false")
            if fed.weighting != "equal":
                raise ValueError("secure aggregation averages with equal weights: set federation.weighting = 'equal'")
        return self


class Backdoor(Federated):
    """The paper's federation under a backdoor attack (Experiments 1-3 and the comparison)."""

    experiment: Literal["backdoor-rounds"]
    reserves_classes: ClassVar[bool] = True
    pretrain: PretrainConfig = PretrainConfig()
    attack: AttackConfig = AttackConfig()
    attacks: dict[str, dict[str, Any]] = {}
    """Settings of attack strategies, by strategy name; the strategies in use are filled in."""

    @model_validator(mode="before")
    @classmethod
    def _fill_attacks(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            attackers = (raw.get("attack") or {}).get("attackers") or [{}]
            names = [a.get("strategy", "boosted") if isinstance(a, dict) else None for a in attackers]
            raw = _with_defaults(raw, "attacks", names, ATTACKS)
        return raw

    check_attacks = field_validator("attacks")(lambda v: validate_options(ATTACKS, v))

    def attack_options(self, name: str) -> dict[str, Any]:
        return self.attacks.get(name) or options_of(ATTACKS, name, {})

    @model_validator(mode="after")
    def _attackers(self) -> Backdoor:
        fed, users = self.federation, self.attack.users
        if any(u >= fed.users for u in users):
            raise ValueError(f"attack.attackers: user ids must be below federation.users = {fed.users} (got {list(users)})")
        if len(users) >= fed.users:
            raise ValueError(f"attack.attackers: {len(users)} malicious users leave no benign one of "
                             f"federation.users = {fed.users}")
        if fed.per_round > fed.users - len(users):
            raise ValueError(f"federation.per_round = {fed.per_round} is more than the {fed.users - len(users)} benign "
                             "users a benign round can pick; add users or lower per_round")
        rounds: dict[int, int] = {}
        for a in self.attack.attackers:
            for r in a.rounds:
                rounds[r] = rounds.get(r, 0) + 1
        crowded = {r: n for r, n in rounds.items() if n > fed.per_round}
        if crowded:
            raise ValueError(f"attack.attackers: more attackers than federation.per_round = {fed.per_round} in rounds "
                             f"{sorted(crowded)}")
        for name in dict.fromkeys(a.strategy for a in self.attack.attackers):  # a strategy's own refusals
            info = ATTACKS.get(name).info
            if check := info.get("check"):  # (registered ``check=``)
                check(self.attack_options(name), fed.per_round if fed.secure_aggregation else fed.min_updates,
                      len(users))
            splitting = [a.user for a in self.attack.attackers if a.strategy == name]
            if info.get("split_trigger") and len(splitting) < 2:
                # one part of a trigger split in one is the whole trigger: a centralised attack, not DBA
                raise ValueError(f"attack.attackers: strategy '{name}' splits the trigger among the users that run "
                                 f"it and needs at least 2 (got user {splitting[0]} alone); for one attacker with "
                                 "the whole trigger use strategy 'boosted'")
        return self

    @model_validator(mode="after")
    def _refuse_unread(self) -> Backdoor:
        _unread(self, {
            "data.omniglot_split": "the backdoor experiments reserve their classes from the seeded 1200/423 split"})
        if self.meta.meta_lr_final is not None:
            raise ValueError("meta.meta_lr_final: the main-phase rounds have no schedule to anneal over (each round "
                             "would restart it); anneal the pre-training with pretrain.meta_lr_final")
        _one_shot_count(self)
        return self


def _one_case(cfg: Backdoor) -> None:
    if len(cfg.attack.cases) > 1:
        raise ValueError(f"attack.cases = {cfg.attack.cases}: experiment '{cfg.experiment}' runs one case; run one "
                         "config per case (fedmeta sweep --grid 'attack.cases=[\"a\"],[\"b\"],[\"c\"]')")


def _no_twin(cfg: DefenseFinetune, why: str) -> DefenseFinetune:
    """Refuse ``finetune.clean_twin`` where the experiment has no use for it (``why``)."""
    _one_case(cfg)
    _unread(cfg, {"finetune.clean_twin": why})
    return cfg


class BackdoorFinetune(Backdoor):
    experiment: Literal["backdoor-finetune"]
    finetune: FinetuneConfig = FinetuneConfig()


class DefenseFinetune(BackdoorFinetune):
    experiment: Literal["defense-finetune"]
    defense: DefenseConfig = DefenseConfig()


class BackdoorCore(DefenseFinetune):
    """Experiments 1-3 in one run: the README's first command (``experiments.core``)."""

    experiment: Literal["backdoor-core"]

    check_case = model_validator(mode="after")(
        lambda self: _no_twin(self, "the clean twin is followed in Experiments 2 and 3 run on their own"))


class DefenseComparison(DefenseFinetune):
    experiment: Literal["defense-comparison"]
    compare: CompareConfig = CompareConfig()
    local_defenses: dict[str, dict[str, Any]] = {}
    """Settings of local defenses, by name (``[local_defenses.fine-pruning]``); those in use are filled in."""

    @model_validator(mode="before")
    @classmethod
    def _fill_local_defenses(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            names = (raw.get("compare") or {}).get("local_defenses", CompareConfig().local_defenses)
            raw = _with_defaults(raw, "local_defenses", names, LOCAL_DEFENSES)
        return raw

    check_local_defenses = field_validator("local_defenses")(lambda v: validate_options(LOCAL_DEFENSES, v))

    def local_defense_options(self, name: str) -> dict[str, Any]:
        return self.local_defenses.get(name) or options_of(LOCAL_DEFENSES, name, {})

    def used_rules(self) -> list[str]:
        return [self.federation.rule, *self.compare.rules]

    @model_validator(mode="after")
    def _secure_rows(self) -> DefenseComparison:
        fed = self.federation
        if fed.secure_aggregation:
            raise ValueError("defense-comparison runs its local-defense rows under secure aggregation itself; "
                             "leave federation.secure_aggregation = false")
        if self.compare.secure_rows and self.compare.local_defenses and (
                fed.min_updates < fed.per_round or fed.weighting != "equal"):
            raise ValueError("compare.secure_rows: a secure-aggregation row averages every update of the round with "
                             "equal weights, FedAvg's row the first federation.min_updates, weighted by "
                             "federation.weighting; they are the same model only with min_updates = per_round and "
                             "weighting = 'equal' (or set compare.secure_rows = false)")
        return self

    check_case = model_validator(mode="after")(lambda self: _no_twin(
        self, "each local-defense row is read against the same defense on the round without attackers, "
              "its clean-local scores"))


class Pretrain(Base):
    experiment: Literal["pretrain"]


class Robustness(Base):
    experiment: Literal["robustness"]
    robust: RobustConfig = RobustConfig()

    @model_validator(mode="after")
    def _maml(self) -> Robustness:
        return _maml_variants(self)


class RobustnessFederated(Federated):
    experiment: Literal["robustness-federated"]
    robust: RobustConfig = RobustConfig()

    @model_validator(mode="after")
    def _clients(self) -> RobustnessFederated:
        _maml_variants(self)
        _unread(self, {"federation.dirichlet_alpha": "its users' classes are dealt out uniformly",
                       "federation.holdout": "its episodes come from each user's classes, nothing held out",
                       "robust.learners": "its clients run robust.client_learner, the first robust.maml_clients "
                                          "plain MAML"})
        if any(k > self.federation.users for k in self.robust.maml_clients):
            raise ValueError(f"robust.maml_clients: at most federation.users = {self.federation.users} clients")
        return self


def _maml_variants(cfg: Base) -> Base:
    if cfg.meta.algorithm == "reptile":
        raise ValueError(f"experiment '{cfg.experiment}' compares MAML variants: meta.algorithm must be 'maml' or 'fomaml'")
    if cfg.robust.contrastive_weight and cfg.model.architecture != "conv4":
        raise ValueError("robust.contrastive_weight: the contrastive task contrasts Conv4 trunk embeddings; "
                         f"model.architecture is '{cfg.model.architecture}'")
    return cfg


class Membership(Base):
    experiment: Literal["membership"]
    mia: MiaConfig = MiaConfig()

    @model_validator(mode="after")
    def _maml(self) -> Membership:
        if self.meta.algorithm == "reptile":
            raise ValueError("experiment 'membership' attacks MAML: meta.algorithm must be 'maml' or 'fomaml'")
        if self.eval.ways != self.meta.ways:
            raise ValueError(f"eval.ways = {self.eval.ways}: experiment 'membership' measures meta-test accuracy at "
                             f"each model's own ways (meta.ways = {self.meta.ways}, mia.ways); leave them equal")
        _one_shot_count(self)
        mia = self.mia
        if mia.sweep_iterations and not set(mia.sweep_threats) & set(mia.invert_threats):
            raise ValueError(f"mia.sweep_iterations = {mia.sweep_iterations}: no server of mia.sweep_threats "
                             f"{mia.sweep_threats} is in mia.invert_threats {mia.invert_threats}, so the sweeps invert "
                             "nothing; add one there or set mia.sweep_iterations = 0")
        return self


FAMILIES: dict[str, type[Base]] = {
    "pretrain": Pretrain, "backdoor-rounds": Backdoor, "backdoor-finetune": BackdoorFinetune,
    "defense-finetune": DefenseFinetune, "defense-comparison": DefenseComparison, "backdoor-core": BackdoorCore,
    "robustness": Robustness,
    "robustness-federated": RobustnessFederated, "membership": Membership,
}

Config = Annotated[
    Union[Pretrain, Backdoor, BackdoorFinetune, DefenseFinetune, DefenseComparison, BackdoorCore, Robustness,  # noqa: UP007
          RobustnessFederated, Membership],
    Field(discriminator="experiment"),
]
"""Any experiment's config (a type for annotations; ``validate`` builds one)."""
