"""Expensive shared work, cached by content under ``$FEDMETA_CACHE``.

Pre-training (benign users only, ``pretrain.rounds`` rounds) is the slow, shared first half of
every backdoor experiment, so its result is cached under a key made of everything that determines
it (data, model, learner, federation and its rule's settings, which classes benign users hold,
seed) and reused by every run, preset and case that agrees on those. It runs in the run loop
(``runs.Session``) with its own folder in the cache, checkpointing each round (with the rule's
state), so a killed run resumes it too.

The client updates of an attack round (the attackers' long local training dominates it) are
cached the same way, before aggregation (while they train, each client saves its progress in
``attack-KEY.partial/``, so a killed run resumes even the attacker's one long update mid-way:
``fedmeta.federation.journal``): Experiments 1-3 and the defense comparison, which all
start from the same attack, share them, whatever rule each then applies. Round 1's benign users
train once for every attack on the same pre-training: an attack round takes their updates from the
same round without attackers and the other way round (``shared_benign``). Only updates computed in
this process are cached; a remote engine's clients compute theirs where they run.

Entries carry a content hash (``fedmeta.storage``): a corrupt one is rebuilt. Runs that share
the cache build an entry once; the others wait for it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from fedmeta.attacks.strategies import rule_seen
from fedmeta.config import Backdoor, FederationConfig
from fedmeta.data.files import cache_dir
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.engine import Engine
from fedmeta.federation.server import Server
from fedmeta.federation.updates import ClientUpdate
from fedmeta.meta.evaluation import Accuracy, t95
from fedmeta.models.conv4 import Params
from fedmeta.registry import ATTACKS, RULES
from fedmeta.runs import RunDir, RunError, Session
from fedmeta.scenario.builder import Phase, Population, build_server
from fedmeta.storage import cached, intact, read_tensors, write_tensors

VERSION = 3


def pretrained(cfg: Backdoor, population: Population, case: str, init: Params, engine: Engine) -> tuple[Params, list[dict]]:
    """The benign pre-trained global model (cached) and its per-round log.

    While it trains, the entry is a run folder of its own (``pretrain-KEY.partial/``: the run
    loop's checkpoints and one line per round), so a killed run resumes it exactly; when done, it
    becomes one tensor file and the folder goes. Runs sharing the cache train it once."""
    final = cache_dir() / f"pretrain-{pretrain_key(cfg, case)}.safetensors"
    device = next(iter(init.values())).device

    def read(path: Path) -> tuple[Params, list[dict]]:
        tensors, meta = read_tensors(path, device)
        tqdm.write(f"pre-training: reusing {path}")
        return {k: tensors[f"params.{k}"] for k in init}, meta["log"]

    return cached(final, f"pre-training cache {final.name}", read,
                  lambda: _pretrain(cfg, population, case, init, engine, final))


def _pretrain(cfg: Backdoor, population: Population, case: str, init: Params, engine: Engine,
              final: Path) -> tuple[Params, list[dict]]:
    folder = RunDir(final.with_name(final.name.removesuffix(".safetensors") + ".partial"))
    folder.path.mkdir(parents=True, exist_ok=True)
    try:
        session = Session(folder, [])
    except RunError as err:  # a corrupt checkpoint of a cache entry: start the entry again
        tqdm.write(f"pre-training: starting again ({err})")
        shutil.rmtree(folder.path)
        folder.path.mkdir()
        session = Session(folder, [])
    server = build_server(cfg, Phase("pretrain", case), population, engine)
    params, start = init, 0
    if (resumed := session.resumed()) is not None:
        params, start = server.restore(resumed.tensors, init), resumed.step
    rounds = cfg.pretrain.rounds
    for r in session.steps(start, rounds, desc=f"pre-training ({case})", unit="round"):
        params, report = server.round(params, RoundSettings(r, "pretrain", (r / rounds, (r + 1) / rounds)))
        loss = round(sum(report.losses.values()) / max(len(report.losses), 1), 4)
        session.log({"round": r + 1, "loss": loss, **report.fields(), "seconds": round(session.elapsed, 1)}, quiet=True)
        session.checkpoint(server.snapshot(params), step=r + 1)
    log = folder.records()
    write_tensors(final, server.snapshot(params), {"log": log})
    shutil.rmtree(folder.path)
    return params, log


def pretrain_key(cfg: Backdoor, case: str) -> str:
    """A digest of everything that determines benign pre-training (not the attack's own knobs;
    not the settings of rules other than the one in use, nor secure aggregation where it does not
    change what FedAvg computes: it does when ``min_updates < per_round``, since it applies every
    update)."""
    att = cfg.attack.model_dump(include={"backdoor_classes", "attacker_examples", "validation_examples", "benign_examples"})
    fed = cfg.federation
    parts = {
        "seed": cfg.seed, "data": cfg.data.model_dump(exclude={"root", *_new_data_keys(cfg)}), "model": _model_key(cfg),
        "meta": cfg.meta.model_dump(), "pretrain": cfg.pretrain.model_dump(),
        "federation": _federation(fed, {"rounds", "episodes", "eval_every", "secure_aggregation", "reply_timeout"}),
        "rule": _rule_key(cfg, fed.rule), "attackers": sorted(cfg.attack.users), "attack": att,
        "benign_holds_backdoor_classes": case != "a", "version": VERSION,
    }
    if fed.secure_aggregation and fed.min_updates < fed.per_round:  # only then another model; older keys hold
        parts["secure_aggregation"] = True
    if fed.dirichlet_alpha is not None and cfg.eval.ways > cfg.meta.ways:  # then it sizes the users' shares
        parts["eval_ways"] = cfg.eval.ways  # (scenario.backdoor._owners); older keys hold
    return _digest(parts)


def _model_key(cfg: Backdoor) -> dict:
    """Conv4's fields only, for Conv4: options of other architectures do not split its cache."""
    model = cfg.model
    return model.model_dump(exclude={"architecture", "hidden"}) if model.architecture == "conv4" else model.model_dump()


def attack_round_updates(cfg: Backdoor, server: Server, case: str, params: Params, settings: RoundSettings,
                         engine: Engine, pretraining: Backdoor | None = None) -> list[ClientUpdate]:
    """``server.updates`` for an attack round, cached under ``attack_round_key``. With the attack
    disabled it is the same round without attackers (a defense's clean cost), which every attack
    strategy's cell of a threat matrix then shares. ``pretraining``: the config whose pre-training
    made ``params``, when ``cfg`` names another rule (a comparison row's; default ``cfg``).
    Benign users that the round's twin (the attack switched off, or on) already trained are read
    from its entry, not trained again (``shared_benign``)."""
    if not engine.local:
        return server.updates(params, settings)
    path = cache_dir() / f"attack-{attack_round_key(cfg, case, settings, pretraining)}.safetensors"
    kind = "attack" if cfg.attack.enabled else "clean"

    def read(path: Path) -> list[ClientUpdate]:
        updates = read_updates(path, params)
        tqdm.write(f"{kind} round {settings.round}: reusing the client updates in {path}")
        return updates

    def build() -> list[ClientUpdate]:
        users = server.schedule.participants(settings.round, settings.phase)
        known = {u: v for u, v in shared_benign(cfg, case, settings, params, pretraining).items() if u in users}
        if known:
            tqdm.write(f"{kind} round {settings.round}: reusing users {sorted(known)}'s updates from the same round "
                       f"{'without' if cfg.attack.enabled else 'with'} the attackers")
        journal = path.with_name(path.name.removesuffix(".safetensors") + ".partial")  # kept while it trains
        updates = server.updates(params, replace(settings, journal=journal), known=known)
        write_tensors(path, {f"{u.user}/{k}": v for u in updates for k, v in u.delta.items()},
                      {"updates": [{"user": u.user, "examples": u.examples, "metrics": u.metrics} for u in updates]})
        shutil.rmtree(journal, ignore_errors=True)
        return updates

    return cached(path, f"{kind}-round cache {path.name}", read, build)


def read_updates(path: Path, like: Params) -> list[ClientUpdate]:
    """The client updates of an ``attack_round_updates`` entry, on ``like``'s device."""
    tensors, meta = read_tensors(path, next(iter(like.values())).device)
    return [ClientUpdate(h["user"], {k: tensors[f"{h['user']}/{k}"] for k in like}, h["examples"], h["metrics"])
            for h in meta["updates"]]


def shared_benign(cfg: Backdoor, case: str, settings: RoundSettings, params: Params,
                  pretraining: Backdoor | None = None) -> dict[int, ClientUpdate]:
    """The benign users' updates that round 1's twin, the same round with the attack switched off
    (or on), holds in the cache, by user; empty in later rounds or when it is not cached.

    Round 1 starts from the pre-trained model whether or not anyone attacks, and a benign user's
    update depends only on that model, the user's data and its random stream, so it is the same
    update in both rounds (bit for bit in process: the threat matrix's cached rounds agree; under
    ``--engine batched`` up to its vmap round-off, the batches then being smaller). Sharing it spares
    a threat matrix's cells, and an adaptive attacker's rules, training every benign user of round
    1 again. Later rounds start from a model the attack changed."""
    if settings.round != 1:
        return {}
    twin = cfg.model_copy(update={"attack": cfg.attack.model_copy(update={"enabled": not cfg.attack.enabled})})
    path = cache_dir() / f"attack-{attack_round_key(twin, case, settings, pretraining)}.safetensors"
    malicious = set(cfg.attack.users)
    return {u.user: u for u in intact(path, lambda p: read_updates(p, params)) or [] if u.user not in malicious}


def attack_round_key(cfg: Backdoor, case: str, settings: RoundSettings, pretraining: Backdoor | None = None) -> str:
    """A digest of everything that determines a round's client updates.

    Its input is the pre-trained model of ``pretraining`` (default ``cfg``): a comparison row that
    attacks another rule from the same pre-trained model must not key it by the row's rule, whose
    options would otherwise give every row its own entry and retrain the same attack.

    In round 1 the key holds of the aggregation rule only what the attackers see of it
    (``rule_seen``: nothing for a strategy that ignores it), since its input, the pre-trained
    model, does not depend on the rule of the main rounds; later rounds' inputs do, so there it is
    the whole rule. Settings of strategies no attacker runs stay out of the key; with the attack
    disabled, so do the attack's own settings (the malicious users sit out, which users they are
    is in the pre-training key)."""
    fed, attack = cfg.federation, cfg.attack
    first = settings.round == 1
    if first:
        rule = rule_seen(attack.attackers, fed.rule, cfg.rule_options(fed.rule)) if attack.enabled else None
    else:
        rule = _rule_key(cfg, fed.rule)
    own = {"attack": {"enabled": False}, "attacks": {}}
    if attack.enabled:
        default_way = {"target_way": True} if attack.target_way == "random" else {}  # older keys hold
        own = {"attack": attack.model_dump(exclude={"cases": True, "case_c_backdoor_ways": True, **default_way,
                                                    **_new_trigger_keys(cfg)}),
               "attacks": {a.strategy: _strategy_key(cfg, a.strategy) for a in attack.attackers}}
    parts = {"pretrain": pretrain_key(pretraining or cfg, case), **own, "meta": cfg.meta.model_dump(),
             "federation": _federation(fed, {"rounds", "eval_every", "reply_timeout",
                                             *({"rule", "secure_aggregation"} if first else ())}),
             "rule": rule, "round": settings.round, "version": VERSION}
    return _digest(parts)


def _strategy_key(cfg: Backdoor, strategy: str) -> dict:
    """A strategy's settings and, once its algorithm changed (``revision`` in its registration,
    e.g. ``replacement``'s per-step projection), the revision, so that a cached round of the
    earlier code is not read as this one's; revision 1 stays out (older keys hold)."""
    return {**cfg.attack_options(strategy), **_revision(ATTACKS.get(strategy).info)}


def _rule_key(cfg: Backdoor, rule: str) -> dict:
    """A rule's settings and its revision, as ``_strategy_key`` (e.g. ``foolsgold``'s step, no
    longer renormalised)."""
    return {**cfg.rule_options(rule), **_revision(RULES.get(rule).info)}


def _revision(info: dict) -> dict:
    revision = info.get("revision", 1)
    return {"revision": revision} if revision > 1 else {}


def without_attack(cfg: Backdoor) -> Backdoor:
    """``cfg`` with the attack disabled: the same federation, its malicious users sitting out."""
    return cfg.model_copy(update={"attack": cfg.attack.model_copy(update={"enabled": False})})


def clean_accuracy(cfg: Backdoor, case: str, rule: str, evaluate: Callable[[], Accuracy]) -> Accuracy:
    """``evaluate()``, the meta-test accuracy of the attack's rounds without attackers aggregated by
    ``rule`` (a server rule's clean cost), cached: it depends on neither the attack's strategy (only
    on how many rounds it spans) nor the table's other rows, so the cells of a threat matrix, one
    per attack strategy, evaluate it once."""
    path = cache_dir() / f"clean-{_digest(_clean_parts(cfg, case, rule))}.safetensors"
    return _accuracies(path, "clean-accuracy", lambda: {"accuracy": evaluate()})["accuracy"]


def clean_local_scores(cfg: Backdoor, case: str, rule: str, evaluate: Callable[[], dict[str, Accuracy]],
                       local: tuple[str, bool]) -> dict[str, Accuracy]:
    """``evaluate()``, every metric of a local defense run on the attack's rounds without attackers,
    aggregated by ``rule``: its clean cost, and the backdoor accuracy the defense itself gives a model nobody
    attacked (its row's reference, which the pre-trained model is not: fine-tuning moves
    attack-val too). ``local``: (local defense, secure aggregation). Cached like ``clean_accuracy``;
    the defense's settings may sit anywhere in the config, so the whole config but the attack's own
    settings is in the key."""
    path = cache_dir() / f"clean-local-{clean_local_key(cfg, case, rule, local)}.safetensors"
    return _accuracies(path, "clean-local", evaluate)


def clean_local_key(cfg: Backdoor, case: str, rule: str, local: tuple[str, bool]) -> str:
    """``clean_local_scores``' key: the clean round's, and the whole config but the attack's own
    settings and keys at the defaults they had before they existed (older entries hold)."""
    own = {"attack": {"attackers": True, "enabled": True, "target_way": True, **_new_trigger_keys(cfg)},
           "attacks": True, "compare": True, "runtime": True,
           "description": True, "finetune": {"clean_twin"}}  # clean_twin: Experiments 2 and 3 only
    if cfg.defense.always_target:
        own["defense"] = {"always_target"}
    if unset := _new_data_keys(cfg):
        own["data"] = unset
    return _digest({**_clean_parts(cfg, case, rule), "local": [*local, cfg.model_dump(mode="json", exclude=own)]})


def _clean_parts(cfg: Backdoor, case: str, rule: str) -> dict:
    """What a clean round's scores depend on: the round without attackers, the rule and the
    evaluation; with attack rounds after the first, how many rounds the clean model plays too."""
    rounds = {"rounds": cfg.attack.last_round} if cfg.attack.last_round > 1 else {}  # keys of one round unchanged
    return {**rounds, "round": attack_round_key(without_attack(cfg), case, RoundSettings(1, "main")), "rule": rule,
            "case": case,
            "case_c_backdoor_ways": cfg.attack.case_c_backdoor_ways,  # the scenario's evaluation episodes
            "options": _rule_key(cfg, rule), "eval": cfg.eval.model_dump(exclude={"workers"}),
            "federation": _federation(cfg.federation, {"rounds", "eval_every", "reply_timeout", "rule",
                                                       "secure_aggregation"}), "version": VERSION}


def before_attack(cfg: Backdoor, case: str, evaluate: Callable[[], dict[str, Accuracy]]) -> dict[str, Accuracy]:
    """``evaluate()``, every metric of the pre-trained model (the level a defense that removes the
    backdoor brings it back to), cached: the cells of a threat matrix share it."""
    trigger = cfg.attack.trigger  # it stamps the keyed images; in the key when not the default, so older keys hold
    parts = {"pretrain": pretrain_key(cfg, case), "case": case, "case_c_backdoor_ways": cfg.attack.case_c_backdoor_ways,
             "eval": cfg.eval.model_dump(exclude={"workers"}), "version": VERSION,
             **({"trigger": trigger.model_dump(exclude=set(_new_trigger_keys(cfg).get("trigger", {})))}
                if trigger != type(trigger)() else {})}
    return _accuracies(cache_dir() / f"before-{_digest(parts)}.safetensors", "before-attack", evaluate)


def _new_trigger_keys(cfg: Backdoor) -> dict[str, dict[str, bool]]:
    """The ``attack`` settings left out of keys at their defaults, so that entries from before
    they existed hold: ``trigger.gap`` and ``trigger.seed`` (``{"trigger": {"gap": True}}``, ...)."""
    trigger, fields = cfg.attack.trigger, type(cfg.attack.trigger).model_fields
    unset = {name: True for name in ("gap", "seed") if getattr(trigger, name) == fields[name].default}
    return {"trigger": unset} if unset else {}


def _new_data_keys(cfg: Backdoor) -> set[str]:
    """The ``data`` settings left out of keys at their defaults, so that entries from before they
    existed hold: ``reserved_classes`` (empty: drawn per seed)."""
    return set() if cfg.data.reserved_classes else {"reserved_classes"}


def _accuracies(path: Path, what: str, evaluate: Callable[[], dict[str, Accuracy]]) -> dict[str, Accuracy]:
    """``evaluate()``, named accuracies, cached at ``path`` as one ``[mean, stderr, episodes, 0]``
    tensor each. Entries written before intervals used Student's t are ``[mean, ci95, episodes]``
    with ``ci95 = 1.96 stderr``; read back exactly, as today's ``Accuracy``, so their keys hold."""
    def accuracy(values: list[float]) -> Accuracy:
        mean, spread, episodes, *rest = values
        stderr = spread if rest else spread / 1.96
        return Accuracy(mean, t95(int(episodes)) * stderr, int(episodes))

    def read(path: Path) -> dict[str, Accuracy]:
        return {name: accuracy(v.tolist()) for name, v in read_tensors(path)[0].items()}

    def build() -> dict[str, Accuracy]:
        found = evaluate()
        write_tensors(path, {name: torch.tensor([a.mean, a.stderr, a.episodes, 0], dtype=torch.float64)
                             for name, a in found.items()})
        return found

    return cached(path, f"{what} cache {path.name}", read, build)


def _federation(fed: FederationConfig, exclude: set[str]) -> dict:
    """``federation`` in a key, less ``exclude``; ``dirichlet_alpha`` only when set, so entries
    made before the key existed (the uniform split) keep their keys."""
    return fed.model_dump(exclude=exclude | ({"dirichlet_alpha"} if fed.dirichlet_alpha is None else set()))


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
