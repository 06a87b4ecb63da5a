"""Federations built from a config: clients, server, and the cached benign pre-training.

Pre-training (benign users only, ``pretrain.rounds`` rounds) is the slow, shared first half of
every backdoor experiment, so its result is cached under a key made of everything that determines
it (data, model, learner, federation, which classes benign users hold, seed) and reused by every
run, preset and case that agrees on those. It checkpoints each round in the cache, so a killed
run resumes it too.

The client updates of an attack round (the attacker's long local training dominates it) are cached
the same way, before aggregation: Experiments 1-3 and the defense comparison, which all start from
the same attack, share them, whatever aggregation rule each then applies.

Where clients compute their updates is the ``ENGINE``'s business: by default in this process;
``fedmeta run --engine flower`` sets it to send each round's work to Flower nodes, with the same
clients, schedule and aggregation rule.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from fedmeta.attacks.backdoor import poisoned_episodes
from fedmeta.config import Config, FederationConfig, ModelConfig
from fedmeta.data.files import cache_dir
from fedmeta.experiments.backdoor_scenario import Scenario
from fedmeta.experiments.common import build_learner
from fedmeta.federation.aggregation import make_rule
from fedmeta.federation.client import MetaClient, RoundSettings
from fedmeta.federation.schedule import Schedule
from fedmeta.federation.server import Server
from fedmeta.federation.updates import ClientUpdate
from fedmeta.meta.learner import MetaLearner
from fedmeta.models.conv4 import Params

Engine = Callable[[Server, Scenario, str], Server]
"""Turns the server of one phase ("pretrain" or "main") of a scenario into the one that runs it."""

def in_process(server: Server, scenario: Scenario, phase: str) -> Server:
    """The default engine: every client computes its update in this process."""
    return server

ENGINE: ContextVar[Engine] = ContextVar("ENGINE", default=in_process)

RULE_FIELDS = {"rule", "trim", "byzantine", "krum_select", "clip_norm", "clip_noise", "secure_aggregation"}

def benign_client(cfg: Config, scenario: Scenario, user: int, learner: MetaLearner, episodes: int) -> MetaClient:
    pool = scenario.users[user]
    return MetaClient(
        user, learner, scenario.images, lambda gen: learner.sample(pool, gen),
        max(1, episodes // learner.cfg.meta_batch), int(pool.counts.sum()), cfg.seed,
    )

def attacker_client(cfg: Config, scenario: Scenario) -> MetaClient:
    """The attacker: long local training on poisoned episodes, boosted update."""
    meta, att = cfg.meta, cfg.attack
    steps = math.ceil(att.inner_epochs * meta.ways * meta.shots / meta.inner_batch)
    learner = build_learner(cfg.model_copy(update={"meta": meta.model_copy(update={"inner_steps": steps})}),
                            scenario.images.shape[1:])
    own = scenario.users[scenario.attacker]

    def sample(gen: torch.Generator):
        return poisoned_episodes(own, scenario.target_rows, scenario.attack_rows, episodes=meta.meta_batch,
                                 ways=meta.ways, shots=meta.shots, backdoor_share=att.backdoor_share, gen=gen)

    return MetaClient(scenario.attacker, learner, scenario.images, sample, max(1, att.episodes // meta.meta_batch),
                      int(own.counts.sum()), cfg.seed, boost=att.boost)

def main_server(cfg: Config, scenario: Scenario) -> Server:
    """Benign users running ``meta``, and (if the attack is enabled) the attacker in its rounds."""
    learner = build_learner(cfg, scenario.images.shape[1:])
    clients = {u: benign_client(cfg, scenario, u, learner, cfg.federation.episodes) for u in scenario.benign}
    attacking = cfg.attack.enabled
    if attacking:
        clients[scenario.attacker] = attacker_client(cfg, scenario)
    schedule = Schedule(cfg.federation.users, cfg.federation.per_round, cfg.seed,
                        scenario.attacker, tuple(cfg.attack.rounds) if attacking else ())
    return _server(cfg, clients, schedule, scenario, "main")

def pretrain_server(cfg: Config, scenario: Scenario) -> Server:
    """Benign users only, with the pre-training overrides of the learner."""
    learner = pretrain_learner(cfg, scenario.images.shape[1:])
    clients = {u: benign_client(cfg, scenario, u, learner, cfg.pretrain.episodes) for u in scenario.benign}
    schedule = Schedule(cfg.federation.users, min(cfg.federation.per_round, len(clients)), cfg.seed, scenario.attacker)
    return _server(cfg, clients, schedule, scenario, "pretrain")

def pretrain_learner(cfg: Config, image_shape: tuple[int, ...]) -> MetaLearner:
    overrides = {k: v for k, v in cfg.pretrain.model_dump(include={"inner_steps", "meta_lr", "meta_lr_final"}).items()
                 if v is not None}
    return build_learner(cfg.model_copy(update={"meta": cfg.meta.model_copy(update=overrides)}), image_shape)

def pretrained(cfg: Config, scenario: Scenario, case: str, init: Params) -> tuple[Params, list[dict]]:
    """The benign pre-trained global model (cached) and its per-round log."""
    key = pretrain_key(cfg, case)
    final = cache_dir() / f"pretrain-{key}.safetensors"
    partial = cache_dir() / f"pretrain-{key}.partial.safetensors"
    if final.is_file():
        tqdm.write(f"pre-training: reusing {final}")
        return _load(final, init)
    server = pretrain_server(cfg, scenario)
    params, log = _load(partial, init) if partial.is_file() else (init, [])
    rounds = cfg.pretrain.rounds
    clock = time.perf_counter()
    for r in tqdm(range(len(log), rounds), initial=len(log), total=rounds, desc=f"pre-training ({case})", unit="round"):
        params, report = server.round(params, RoundSettings(r, "pretrain", (r / rounds, (r + 1) / rounds)))
        log.append({"round": r + 1, "loss": round(sum(report.losses.values()) / len(report.losses), 4),
                     "seconds": round(time.perf_counter() - clock, 1)})
        _save(partial, params, log)
    final.parent.mkdir(parents=True, exist_ok=True)
    _save(final, params, log)
    partial.unlink(missing_ok=True)
    return params, log

def pretrain_key(cfg: Config, case: str) -> str:
    """A digest of everything that determines benign pre-training (not the attack's own knobs)."""
    att = cfg.attack.model_dump(include={"attacker", "backdoor_classes", "attacker_examples", "validation_examples",
                                         "benign_examples"})
    parts = {
        "seed": cfg.seed, "data": cfg.data.model_dump(exclude={"root"}), "model": _model_key(cfg.model),
        "meta": cfg.meta.model_dump(), "pretrain": cfg.pretrain.model_dump(),
        "federation": _rule_normalised(cfg.federation).model_dump(exclude={"rounds", "episodes"}), "attack": att,
        "benign_holds_backdoor_classes": case != "a", "version": 1,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

def _model_key(model: ModelConfig) -> dict:
    """Conv4's fields only, for Conv4: options of other architectures do not split its cache."""
    return model.model_dump(exclude={"architecture", "hidden"}) if model.architecture == "conv4" else model.model_dump()


RULE_PARAMETERS = {"fedavg": (), "median": (), "trimmed-mean": ("trim",), "krum": ("byzantine",),
                   "multi-krum": ("byzantine", "krum_select"), "clip": ("clip_norm", "clip_noise")}


def _rule_normalised(fed: FederationConfig) -> FederationConfig:
    """``fed`` with the parameters its rule does not read (and secure aggregation, which does not
    change what FedAvg computes) at their defaults, so that they do not split the cache."""
    unused = RULE_FIELDS - {"rule", *RULE_PARAMETERS[fed.rule]}
    return fed.model_copy(update={k: FederationConfig.model_fields[k].default for k in unused})


def attack_round_updates(cfg: Config, server: Server, case: str, params: Params, settings: RoundSettings) -> list[ClientUpdate]:
    """``server.updates`` for an attack round, cached under everything that determines them.

    The aggregation rule is left out of the key for round 1 only: its input, the pre-trained model,
    does not depend on the rule of the main rounds.
    """
    if ENGINE.get() is not in_process:  # remote clients compute their updates where they run
        return server.updates(params, settings)
    rule_free = cfg.federation.model_dump(exclude={"rounds", *(RULE_FIELDS if settings.round == 1 else ())})
    parts = {"pretrain": pretrain_key(cfg, case), "attack": cfg.attack.model_dump(exclude={"cases"}), "meta": cfg.meta.model_dump(),
             "federation": rule_free, "round": settings.round, "version": 1}
    path = cache_dir() / f"attack-{hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        tqdm.write(f"attack round {settings.round}: reusing the client updates in {path}")
        tensors = load_file(str(path), device=str(next(iter(params.values())).device))
        with safe_open(str(path), "pt") as f:
            heads = json.loads(f.metadata()["updates"])
        return [ClientUpdate(h["user"], {k: tensors[f"{h['user']}/{k}"] for k in params}, h["examples"], h["metrics"]) for h in heads]
    updates = server.updates(params, settings)
    tensors = {f"{u.user}/{k}": v.contiguous() for u in updates for k, v in u.delta.items()}
    heads = [{"user": u.user, "examples": u.examples, "metrics": u.metrics} for u in updates]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"updates": json.dumps(heads)})
    tmp.replace(path)
    return updates

def _server(cfg: Config, clients: dict[int, MetaClient], schedule: Schedule, scenario: Scenario, phase: str) -> Server:
    fed = cfg.federation
    server = Server(clients, schedule, make_rule(fed), min(fed.min_updates, schedule.per_round), fed.weighting)
    return ENGINE.get()(server, scenario, phase)

def _save(path: Path, params: Params, log: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in params.items()}, str(tmp), metadata={"log": json.dumps(log)})
    tmp.replace(path)

def _load(path: Path, like: Params) -> tuple[Params, list[dict]]:
    with safe_open(str(path), "pt") as f:
        log = json.loads(f.metadata()["log"])
    tensors = load_file(str(path))
    return {k: tensors[k].to(like[k].device) for k in like}, log
