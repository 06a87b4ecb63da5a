"""Experiments 1 and 2 of "Backdoor Attacks on Federated Meta-Learning" (Sec. 3).

Both start, for each case (a, b, c), from the cached benign pre-training; round 0 is the
pre-trained model, and the attacker is selected in ``attack.rounds`` (round 1).

- ``backdoor-rounds`` (Experiment 1): federated rounds go on after the attack (benign users only
  after round 1); every round is evaluated.
- ``backdoor-finetune`` (Experiment 2): right after the attack round, each benign user fine-tunes
  the global model for ``finetune.steps`` steps on episodes of its own classes (always with the
  target class; with a backdoor class in case c), and the four accuracies are followed along.

Metrics (fractions in [0, 1], each with a ``_ci95`` half-width over episodes):
``meta_test_accuracy`` on episodes of unseen classes; ``main_task_accuracy`` on the queries of
episodes of meta-training classes that always include the target; ``attack_train_accuracy`` and
``attack_val_accuracy``: the share of keyed backdoor images (the attacker's own, and held-out
ones) classified as the target. ``round`` r means after r rounds past pre-training (the paper
plots it as round r + 1: its "Round 2" is our round 1, right after the attack).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from fedmeta import runtime
from fedmeta.config import Config
from fedmeta.data.episodes import Episodes, gather, sample_episodes
from fedmeta.experiments.backdoor_scenario import EvalPool, Scenario, build_scenario
from fedmeta.experiments.common import accuracy_fields, build_learner, format_duration, format_record
from fedmeta.experiments.federated import attack_round_updates, main_server, pretrained
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.server import RoundReport, Server
from fedmeta.meta.evaluation import Accuracy, Classifier, EpisodeScore, classifier, evaluate_curve, query_accuracy
from fedmeta.meta.learner import MetaLearner
from fedmeta.models.conv4 import Params
from fedmeta.rng import stream
from fedmeta.runs import RunDir

METRICS = ["meta_test_accuracy", "main_task_accuracy", "attack_train_accuracy", "attack_val_accuracy"]


@dataclass(frozen=True)
class Case:
    name: str
    scenario: Scenario
    learner: MetaLearner
    pretrained: Params
    pretrain_log: list[dict]


def prepare(cfg: Config, case: str, device: torch.device) -> Case:
    scenario = build_scenario(cfg, case)
    learner = build_learner(cfg, scenario.images.shape[1:])
    init = {k: v.to(device) for k, v in learner.model.init(stream(cfg.seed, "init")).items()}
    params, log = pretrained(cfg, scenario, case, init)
    return Case(case, scenario, learner, params, log)


def play_round(cfg: Config, server: Server, case: str, params: Params, r: int) -> tuple[Params, RoundReport]:
    """One main-phase round; an attack round's client updates come from the cache when they can
    (not under secure aggregation, where the server never holds them one by one)."""
    settings = RoundSettings(r, "main")
    if cfg.attack.enabled and r in cfg.attack.rounds and not cfg.federation.secure_aggregation:
        return server.aggregate(params, attack_round_updates(cfg, server, case, params, settings), settings)
    return server.round(params, settings)


def backdoor_episodes(cfg: Config, ev: EvalPool, count: int, gen: torch.Generator) -> Episodes:
    """Evaluation episodes that always include the target (and, in case c, one backdoor class)."""
    e = cfg.eval
    return sample_episodes(ev.pool, count, e.ways, e.shots[0], e.queries, gen, include=always_included(ev, count, gen), split=ev.split)


def always_included(ev: EvalPool, count: int, gen: torch.Generator) -> Tensor:
    """The target in every episode; in case c also one of the backdoor classes, drawn per episode."""
    include = torch.tensor([ev.target])
    if len(ev.backdoors):
        pick = ev.backdoors[torch.randint(len(ev.backdoors), (count,), generator=gen)]
        include = torch.stack([torch.full((count,), ev.target), pick], dim=1)
    return include


def backdoor_score(case: Case, ev: EvalPool, episodes: Episodes, classify: Classifier) -> EpisodeScore:
    """Main-task accuracy on the episode's queries; attack accuracies on the keyed images."""
    images = case.scenario.images
    keyed = {"attack_train_accuracy": gather(images, case.scenario.attack_rows),
             "attack_val_accuracy": gather(images, case.scenario.validation_rows)}
    labels = episodes.query_labels().to(images.device)
    target_way = (episodes.classes == ev.target).int().argmax(dim=1)

    def score(weights: Params, support: Tensor, i: int) -> dict[str, Tensor]:
        queries = gather(images, episodes.query[i])
        out = {"main_task_accuracy": (classify(weights, support, queries) == labels).float().mean()}
        for name, x in keyed.items():
            out[name] = (classify(weights, support, x) == target_way[i]).float().mean()
        return out

    return score


@dataclass(frozen=True)
class EvalSets:
    """The episodes every curve point is scored on (the same ones at every point)."""

    test: Episodes  # meta-test: unseen classes
    tasks: Episodes  # always with the target (and, in case c, a backdoor class)


def eval_sets(cfg: Config, case: Case, ev: EvalPool, episodes: int) -> EvalSets:
    e = cfg.eval
    test = sample_episodes(case.scenario.test, episodes, e.ways, e.shots[0], e.queries, stream(cfg.seed, "eval-meta-test"))
    return EvalSets(test, backdoor_episodes(cfg, ev, episodes, stream(cfg.seed, "eval-backdoor")))


def curves(cfg: Config, case: Case, params: Params, ev: EvalPool, at: list[int], episodes: int,
           desc: str | None = None) -> dict[int, dict[str, Accuracy]]:
    """All four metrics after each number of fine-tuning steps in ``at`` (same episodes every call)."""
    e = cfg.eval
    lr = e.lr or cfg.meta.inner_lr
    learner, images = case.learner, case.scenario.images
    sets = eval_sets(cfg, case, ev, episodes)
    classify = classifier(learner.model, e.transductive)
    meta = evaluate_curve(learner, params, images, sets.test, at=at, batch=e.batch, lr=lr, gen=stream(cfg.seed, "eval-meta-test-ft"),
                          score=query_accuracy(learner, images, sets.test, e.transductive), desc=desc)
    main = evaluate_curve(learner, params, images, sets.tasks, at=at, batch=e.batch, lr=lr, gen=stream(cfg.seed, "eval-backdoor-ft"),
                          score=backdoor_score(case, ev, sets.tasks, classify), desc=desc)
    return {t: {"meta_test_accuracy": meta[t]["accuracy"], **main[t]} for t in at}


def fields(scores: dict[str, Accuracy]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in METRICS:
        out |= accuracy_fields(name, scores[name])
    return out


def run_rounds(cfg: Config, out: RunDir) -> dict[str, Any]:
    """Experiment 1: benign federated rounds after the one-shot attack."""
    device = runtime.setup(cfg.runtime)
    clock = time.perf_counter()
    tensors, done = _resume(out)
    last_round = max(cfg.attack.rounds) + cfg.federation.rounds
    seconds: dict[str, dict[int, float]] = {}  # per case and round played here, evaluation excluded
    for index, name in enumerate(cfg.attack.cases):
        if index < done.get("case", 0):
            continue
        case = prepare(cfg, name, device)
        evaluate = lambda p: fields(curves(cfg, case, p, case.scenario.everyone, [cfg.eval.steps], cfg.eval.episodes)[cfg.eval.steps])  # noqa: E731
        if index == done.get("case") and "round" in done:
            params, start = {k: tensors[k].to(device) for k in case.pretrained}, done["round"]
        else:
            params, start = case.pretrained, 0
            _log(out, {"case": name, "round": 0, **evaluate(params)}, clock)
            _checkpoint(out, params, {"case": index, "round": 0})
        server = main_server(cfg, case.scenario)
        for r in tqdm(range(start + 1, last_round + 1), initial=start, total=last_round, desc=f"case {name}", unit="round"):
            started = time.perf_counter()
            params, report = play_round(cfg, server, name, params, r)
            seconds.setdefault(name, {})[r] = round(time.perf_counter() - started, 2)
            info = {"participants": report.participants, "aggregated": report.aggregated, "rejected": report.rejected}
            _log(out, {"case": name, "round": r, **info, **evaluate(params)}, clock, f"round {seconds[name][r]:.1f} s")
            _checkpoint(out, params, {"case": index, "round": r})
        out.save_weights(params, f"weights-case-{name}.safetensors")
        done = {}
    return _summary(cfg, out, "round", clock) | {"round_seconds": seconds}


UserCurves = Callable[[Case, Params, int, list[int]], dict[int, dict[str, Accuracy]]]
"""(case, attacked global model, benign user, steps) -> the four metrics at each step."""


def run_finetune(cfg: Config, out: RunDir) -> dict[str, Any]:
    """Experiment 2: long benign fine-tuning at each benign user right after the attack."""
    ft_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"steps": cfg.finetune.steps})})

    def user_curves(case: Case, attacked: Params, user: int, at: list[int]) -> dict[int, dict[str, Accuracy]]:
        return curves(ft_cfg, case, attacked, case.scenario.evaluation[user], at, cfg.finetune.episodes,
                      desc=f"case {case.name}, user {user}")

    return run_per_user(cfg, out, user_curves)


def run_per_user(cfg: Config, out: RunDir, user_curves: UserCurves) -> dict[str, Any]:
    """Right after the attack round(s), follow each benign user's curves (Experiments 2 and 3)."""
    device = runtime.setup(cfg.runtime)
    clock = time.perf_counter()
    tensors, done = _resume(out)
    ft = cfg.finetune
    at = list(range(0, ft.steps + 1, ft.every))
    for index, name in enumerate(cfg.attack.cases):
        if index < done.get("case", 0):
            continue
        case = prepare(cfg, name, device)
        if index == done.get("case"):
            attacked, users_done = {k: tensors[k].to(device) for k in case.pretrained}, done["users"]
        else:
            server = main_server(cfg, case.scenario)
            attacked = case.pretrained
            for r in range(1, max(cfg.attack.rounds) + 1):
                attacked, _ = play_round(cfg, server, name, attacked, r)
            users_done = 0
            _checkpoint(out, attacked, {"case": index, "users": 0})
        for k, user in enumerate(case.scenario.benign[: ft.users]):
            if k < users_done:
                continue
            points = user_curves(case, attacked, user, at)
            for t in at:
                _log(out, {"case": name, "user": user, "step": t, **fields(points[t])}, clock, quiet=t != at[-1])
            _checkpoint(out, attacked, {"case": index, "users": k + 1})
        done = {}
    return _summary(cfg, out, "step", clock)


def _resume(out: RunDir) -> tuple[dict[str, Tensor], dict[str, Any]]:
    resumed = out.resume()
    if resumed is None:
        return {}, {}
    tensors, state = resumed
    tqdm.write(f"resuming {out.path} at {state}")
    return tensors, state


def _checkpoint(out: RunDir, params: Params, state: dict[str, Any]) -> None:
    out.save_checkpoint(params, state)


def _log(out: RunDir, record: dict[str, Any], clock: float, note: str = "", quiet: bool = False) -> None:
    out.log(record)
    if not quiet:
        tqdm.write(" | ".join([format_record(record, METRICS), *([note] if note else []),
                               f"total {format_duration(time.perf_counter() - clock)}"]))


def _summary(cfg: Config, out: RunDir, axis: str, clock: float) -> dict[str, Any]:
    """Per case: before the attack, right after it, and at the end (Exp 2: averaged over users)."""
    records = out.records()
    by_case: dict[str, Any] = {}
    for name in cfg.attack.cases:
        rows = [r for r in records if r["case"] == name]
        points = sorted({r[axis] for r in rows})
        pick = lambda x: _mean_over_users([r for r in rows if r[axis] == x])  # noqa: E731
        if axis == "round":
            by_case[name] = {"before_attack": pick(0), "after_attack": pick(max(cfg.attack.rounds)), "final": pick(points[-1]),
                             "rounds": points[-1]}
        else:
            by_case[name] = {"start": pick(points[0]), "final": pick(points[-1]), "steps": points[-1],
                             "per_user_final": {str(r["user"]): {m: r[m] for m in METRICS} for r in rows if r[axis] == points[-1]}}
    first = by_case[cfg.attack.cases[0]]
    wall = time.perf_counter() - clock
    return {"experiment": cfg.experiment, "cases": cfg.attack.cases, **first["final"], "by_case": by_case,
            "eval_mode": cfg.eval.mode, "eval_episodes": cfg.eval.episodes if axis == "round" else cfg.finetune.episodes,
            "wall_time_s": round(wall, 1), "wall_time": format_duration(wall)}


def _mean_over_users(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {m: round(sum(r[m] for r in rows) / len(rows), 6) for m in METRICS}
