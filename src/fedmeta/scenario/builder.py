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

from dataclasses import dataclass
from functools import partial

import torch

from fedmeta import runtime
from fedmeta.attacks.strategies import AttackerContext, make_attacker
from fedmeta.config import Backdoor, Federated, MetaConfig
from fedmeta.data.datasets import load_meta_splits
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
from fedmeta.rng import stream
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
    """Who holds which data in ``cfg``'s federation (a node builds the same from the config)."""
    if isinstance(cfg, Backdoor):
        return build_scenario(cfg, phase.case)
    device = runtime.setup(cfg.runtime)
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
    given), run by ``engine``."""
    fed = cfg.federation
    name = rule or fed.rule
    schedule = build_schedule(cfg, phase, population)
    server = Server(build_clients(cfg, phase, population), schedule, make_rule(name, cfg.rule_options(name)),
                    min(fed.min_updates, schedule.per_round), fed.weighting)
    return engine.serve(server, cfg, phase, name)


def pretrain_meta(cfg: Backdoor) -> MetaConfig:
    """``meta`` with the pre-training overrides (``pretrain.inner_steps``, ``meta_lr``, ``meta_lr_final``)."""
    overrides = {k: v for k, v in cfg.pretrain.model_dump(include={"inner_steps", "meta_lr", "meta_lr_final"}).items()
                 if v is not None}
    return cfg.meta.model_copy(update=overrides)


def _backdoor_clients(cfg: Backdoor, phase: Phase, scenario: Scenario) -> dict[int, Client]:
    shape = scenario.images.shape[1:]
    pretraining = phase.name == "pretrain"
    learner = build_learner(cfg, shape, pretrain_meta(cfg) if pretraining else None)
    episodes = cfg.pretrain.episodes if pretraining else cfg.federation.episodes
    clients: dict[int, Client] = {u: benign_client(cfg, u, learner, scenario.users[u], episodes) for u in scenario.benign}
    if pretraining or not cfg.attack.enabled:
        return clients
    for attacker in cfg.attack.attackers:
        ctx = AttackerContext(
            attacker.user, scenario.users[attacker.user], scenario.images, scenario.target_rows, scenario.attack_rows,
            cfg.attack.backdoor_share, cfg.meta, cfg.seed, partial(build_learner, cfg, shape))
        clients[attacker.user] = make_attacker(attacker.strategy, ctx, cfg.attack_options(attacker.strategy))
    return clients


def _robust_clients(cfg: Federated, phase: Phase, population: Partition) -> dict[int, Client]:
    """Every user runs ``robust.client_learner`` but the first ``phase.plain``, which run plain MAML."""
    model = build_model(cfg.model, population.image_shape, cfg.meta.ways)
    robust = make_robust_learner(model, cfg.meta, cfg.robust, cfg.robust.client_learner)
    maml = make_robust_learner(model, cfg.meta, cfg.robust, "maml")
    return {user: benign_client(cfg, user, maml if user < phase.plain else robust, pool, cfg.federation.episodes)
            for user, pool in enumerate(population.users)}
