"""One builder: from a config to the population, the clients and the server of a federation.

Every experiment that federates (the backdoor experiments, the defense comparison, federated
R-MAML) gets its server here, and so does every Flower node, which rebuilds its own user's client
from the config and the ``Phase`` sent along with the weights. A run may hold several federations
(pre-training and the main phase; one per case; one per number of plain-MAML clients); ``Phase``
names one of them, and everything random in it comes from streams of the run seed.

- The *population* is who holds which data: ``scenario.backdoor.Scenario`` (the paper's split,
  reserved classes, malicious users) or ``Partition`` (meta-training classes split among users).
- The *clients*: benign users run the configured meta-learner on their own classes; malicious
  users run their registered attack strategy (``attack.attackers``).
- The *server*: the seeded schedule (malicious users only in their own rounds), the registered
  rule with its settings, M_min and the weighting, handed to the engine that runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial, reduce

import torch

from fedmeta import runtime
from fedmeta.attacks.strategies import AttackerContext, make_attacker
from fedmeta.config import Backdoor, ConfigError, Federated, MetaConfig
from fedmeta.data.datasets import load_meta_splits
from fedmeta.data.episodes import sample_classes, sample_examples
from fedmeta.data.pool import ClassPool
from fedmeta.data.splits import partition
from fedmeta.defenses.robust_maml import make_robust_learner
from fedmeta.federation.aggregation import make_rule
from fedmeta.federation.client import MetaClient
from fedmeta.federation.engine import IN_PROCESS, Engine
from fedmeta.federation.schedule import Schedule
from fedmeta.federation.server import Client, Server
from fedmeta.meta.learner import MetaLearner, build_learner
from fedmeta.models.build import build_model
from fedmeta.registry import RULES
from fedmeta.rng import stream, stream_seed
from fedmeta.scenario.backdoor import Scenario, build_scenario


@dataclass(frozen=True)
class Phase:
    """Names one federation of a run; JSON-able, so it travels to remote nodes with the config."""

    name: str = "main"  # "pretrain" or "main": also names the random streams of its rounds
    case: str = "a"  # backdoor case
    plain: int = 0  # federated R-MAML: users 0 .. plain - 1 train plain MAML

    def fields(self) -> dict[str, str | int]:
        return {"phase": self.name, "case": self.case, "plain": self.plain}


@dataclass(frozen=True)
class Partition:
    """Meta-training classes split among users (federated R-MAML), and the meta-test classes."""

    users: list[ClassPool]
    test: ClassPool

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.test.image_shape


Population = Scenario | Partition


def build_population(cfg: Federated, phase: Phase) -> Population:
    """Who holds which data in ``cfg``'s federation (a node builds the same from the config), on
    the run's device (a Flower node or a pool worker builds it here, not in the experiment)."""
    device = runtime.setup(cfg.runtime)
    if isinstance(cfg, Backdoor):
        return build_scenario(cfg, phase.case).to(device)
    splits = load_meta_splits(cfg.data, cfg.seed)
    train = splits.train.to(device)
    owners = partition(torch.arange(train.num_classes), cfg.federation.users, stream(cfg.seed, "users"))
    return Partition([train.classes(c) for c in owners], splits.test.to(device))


def benign_client(cfg: Federated, user: int, learner: MetaLearner, pool: ClassPool, episodes: int) -> MetaClient:
    """A benign user: ``episodes / meta_batch`` outer steps of ``learner`` on its own classes."""
    return MetaClient(user, learner, pool.images, partial(learner.sample, pool),
                      max(1, episodes // learner.cfg.meta_batch), int(pool.counts.sum()), cfg.seed)


def build_clients(cfg: Federated, phase: Phase, population: Population) -> dict[int, Client]:
    """Every client of the federation ``phase``, by user id."""
    if isinstance(population, Partition):
        return _robust_clients(cfg, phase, population)
    return _backdoor_clients(cfg, phase, population)


def build_schedule(cfg: Federated, phase: Phase, population: Population) -> Schedule:
    fed = cfg.federation
    if isinstance(population, Partition):
        return Schedule(fed.users, fed.per_round, cfg.seed)
    if phase.name == "pretrain":
        benign = len(population.benign)
        return Schedule(fed.users, min(fed.per_round, benign), cfg.seed, {u: () for u in population.attackers})
    rounds = {a.user: tuple(a.rounds) if cfg.attack.enabled else () for a in cfg.attack.attackers}
    return Schedule(fed.users, fed.per_round, cfg.seed, rounds)


def build_server(cfg: Federated, phase: Phase, population: Population, engine: Engine = IN_PROCESS,
                 rule: str | None = None) -> Server:
    """The server of the federation ``phase`` (with ``rule`` instead of ``federation.rule`` if
    given), run by ``engine``. A rule registered with ``reference=True`` (FLTrust) also gets the
    server's own client (``reference_client``), whose update it compares the users' with."""
    fed = cfg.federation
    name = rule or fed.rule
    schedule = build_schedule(cfg, phase, population)
    clients, options = build_clients(cfg, phase, population), cfg.rule_options(name)
    reference = reference_client(cfg, population, clients, name, options) if RULES.get(name).info.get("reference") else None
    server = Server(clients, schedule, make_rule(name, options), min(fed.min_updates, schedule.per_round), fed.weighting,
                    reference, sums=fed.secure_aggregation)
    return engine.serve(server, cfg, phase, name)


def reference_client(cfg: Federated, population: Population, clients: dict[int, Client], rule: str,
                     options: dict) -> MetaClient:
    """The server's own client for rule ``rule`` (FLTrust's root update, Cao et al. 2021): a benign
    client of this federation (same learner, same outer steps per round) trained on the server's
    clean root set.

    The root set is ``options["root_classes"]`` classes x ``options["root_examples"]`` examples,
    drawn once per run (stream "reference/root") from the benign users' meta-training classes and
    the examples they train on (never held-out evaluation examples, never the reserved backdoor or
    target classes): the server is assumed to have collected a small clean sample of the task
    distribution, as FLTrust's server does. The client trains with its own seed (stream
    "reference"), so it draws nothing from any user's stream. On Flower it runs in the ServerApp's
    process, which builds the same population. A root set that cannot hold one outer step's
    episodes is refused before the first round, naming the key.
    """
    benign = population.benign[0] if isinstance(population, Scenario) else len(population.users) - 1
    template = clients[benign]
    pool = _root_candidates(population)
    k, m = options["root_classes"], options["root_examples"]
    if k > pool.num_classes:
        raise ConfigError(f"rules.{rule}.root_classes: {k} exceeds the {pool.num_classes} meta-training classes "
                          "of the benign users")
    if m > int(pool.counts.min()):
        raise ConfigError(f"rules.{rule}.root_examples: {m} exceeds the {int(pool.counts.min())} training examples "
                          "a benign class has")
    gen = stream(cfg.seed, "reference", "root")
    classes = sample_classes(pool.num_classes, 1, k, gen)[0]
    root = ClassPool(pool.images, sample_examples(pool, classes, m, gen), torch.full((k,), m),
                     tuple(pool.names[c] for c in classes.tolist()))
    try:
        template.learner.sample(root, stream(cfg.seed, "reference", "check"))
    except ValueError as err:
        raise ConfigError(f"rules.{rule}: a root set of {k} classes x {m} examples cannot hold the episodes of one "
                          f"outer step (meta.ways, meta.shots, meta.queries): {err}") from None
    return replace(template, user=-1, images=root.images, sample=partial(template.learner.sample, root),
                   examples=k * m, seed=stream_seed(cfg.seed, "reference"))


def _root_candidates(population: Population) -> ClassPool:
    """The benign users' meta-training classes with the examples they train on."""
    if isinstance(population, Partition):
        return reduce(ClassPool.merge, population.users)
    everyone = population.everyone
    return everyone.pool.classes(torch.arange(everyone.target)).examples(torch.arange(int(everyone.split[0])))


def pretrain_meta(cfg: Backdoor) -> MetaConfig:
    """``meta`` with the pre-training overrides (``pretrain.inner_steps``, ``meta_lr``, ``meta_lr_final``)."""
    overrides = {k: v for k, v in cfg.pretrain.model_dump(include={"inner_steps", "meta_lr", "meta_lr_final"}).items()
                 if v is not None}
    return cfg.meta.model_copy(update=overrides)


def _backdoor_clients(cfg: Backdoor, phase: Phase, scenario: Scenario) -> dict[int, Client]:
    """Benign users' clients, and each malicious user's strategy. An attacker knows
    ``federation.rule`` (a rule passed to ``build_server`` instead is not what it adapts to) and
    holds honest clients on its own and its colluders' clean classes, for estimating benign updates."""
    shape = scenario.images.shape[1:]
    pretraining = phase.name == "pretrain"
    learner = build_learner(cfg, shape, pretrain_meta(cfg) if pretraining else None)
    episodes = cfg.pretrain.episodes if pretraining else cfg.federation.episodes
    clients: dict[int, Client] = {u: benign_client(cfg, u, learner, scenario.users[u], episodes) for u in scenario.benign}
    if pretraining or not cfg.attack.enabled:
        return clients
    fed = cfg.federation
    clean = {u: benign_client(cfg, u, learner, scenario.users[u], episodes) for u in scenario.attackers}
    for attacker in cfg.attack.attackers:
        u = attacker.user
        ctx = AttackerContext(
            u, scenario.users[u], scenario.images, scenario.target_rows, scenario.part_rows.get(u, scenario.attack_rows),
            cfg.attack.backdoor_share, cfg.meta, cfg.seed, partial(build_learner, cfg, shape),
            (clean[u], *(c for v, c in clean.items() if v != u)), fed.rule, cfg.rule_options(fed.rule),
            fed.per_round if fed.secure_aggregation else fed.min_updates, scenario.attackers,
            {a.user: tuple(a.rounds) for a in cfg.attack.attackers}, cfg.attack.target_way)
        clients[u] = make_attacker(attacker.strategy, ctx, cfg.attack_options(attacker.strategy))
    return clients


def _robust_clients(cfg: Federated, phase: Phase, population: Partition) -> dict[int, Client]:
    """Every user runs ``robust.client_learner`` but the first ``phase.plain``, which run plain MAML."""
    model = build_model(cfg.model, population.image_shape, cfg.meta.ways)
    robust = make_robust_learner(model, cfg.meta, cfg.robust, cfg.robust.client_learner)
    maml = make_robust_learner(model, cfg.meta, cfg.robust, "maml")
    return {user: benign_client(cfg, user, maml if user < phase.plain else robust, pool, cfg.federation.episodes)
            for user, pool in enumerate(population.users)}
