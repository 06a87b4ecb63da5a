"""Experiments 1-3 of "Backdoor Attacks on Federated Meta-Learning" (Sec. 3-4).

All start, for each case (a, b, c), from the cached benign pre-training; round 0 is the
pre-trained model, and each malicious user of ``attack.attackers`` is selected in its own rounds
(the paper: one attacker, in round 1). The federation comes from the builder
(``scenario.builder``), on the engine passed in.

- ``backdoor-rounds`` (Experiment 1): federated rounds go on after the last attack round (benign
  users only), evaluated every ``federation.eval_every`` rounds.
- ``backdoor-finetune`` (Experiment 2) and ``defense-finetune`` (Experiment 3): right after the
  attack, each benign user runs a local defense (``experiments.local_defenses``: fine-tuning for
  Experiment 2, the matching network for Experiment 3) for ``finetune.steps`` steps on episodes of
  its own classes (always with the target class; with a backdoor class in case c), and the four
  accuracies are followed along; with ``finetune.clean_twin``, also from the same round(s) without
  the attackers, on the same episodes.

Metrics (fractions in [0, 1], each with a ``_ci95`` half-width over episodes):
``meta_test_accuracy`` on episodes of unseen classes; ``main_task_accuracy`` on the queries of
episodes of meta-training classes that always include the target; ``attack_train_accuracy`` and
``attack_val_accuracy``: the share of keyed backdoor images (the attacker's own, and held-out
ones) classified as the target; with a clean twin, ``clean_meta_test_accuracy``, ``clean_attack_train_accuracy``,
``clean_attack_val_accuracy`` and ``attack_val_lift`` (attack-val minus the twin's, a difference of
fractions). ``round`` r means after r rounds past pre-training (the paper
plots it as round r + 1: its "Round 2" is our round 1, right after the attack).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedmeta import runtime
from fedmeta.config import Backdoor
from fedmeta.data.episodes import Episodes, gather, sample_episodes
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.engine import Engine
from fedmeta.federation.server import RoundReport, Server
from fedmeta.meta.evaluation import Accuracy, Classifier, EpisodeScore, classifier, evaluate_curve, query_accuracy
from fedmeta.meta.learner import MetaLearner, build_learner
from fedmeta.models.conv4 import Params
from fedmeta.registry import LOCAL_DEFENSES
from fedmeta.rng import stream
from fedmeta.runs import Resumed, RunDir, Session, accuracy_fields
from fedmeta.scenario.backdoor import EvalPool, Scenario, build_scenario
from fedmeta.scenario.builder import Phase, build_server
from fedmeta.scenario.cache import attack_round_updates, pretrained, without_attack

METRICS = ["meta_test_accuracy", "main_task_accuracy", "attack_train_accuracy", "attack_val_accuracy"]
TWIN_METRICS = ["clean_meta_test_accuracy", "clean_attack_train_accuracy", "clean_attack_val_accuracy",
                "attack_val_lift"]
TWIN_SHOWN = ["clean_attack_val_accuracy", "attack_val_lift"]  # in each log line beside METRICS


@dataclass(frozen=True)
class Case:
    name: str
    scenario: Scenario
    learner: MetaLearner
    pretrained: Params
    pretrain_log: list[dict]


def prepare(cfg: Backdoor, case: str, device: torch.device, engine: Engine, session: Session) -> Case:
    """The case's data layout and its (cached) benign pre-trained model (its rounds tallied in ``session``)."""
    scenario = build_scenario(cfg, case).to(device)
    learner = build_learner(cfg, scenario.images.shape[1:])
    init = {k: v.to(device) for k, v in learner.model.init(stream(cfg.seed, "init")).items()}
    params, log = pretrained(cfg, scenario, case, init, engine)
    session.count_log(f"pretrain/{case}", log)
    return Case(case, scenario, learner, params, log)


def main_server(cfg: Backdoor, case: Case, engine: Engine, rule: str | None = None) -> Server:
    return build_server(cfg, Phase("main", case.name), case.scenario, engine, rule)


def play_round(cfg: Backdoor, server: Server, case: str, params: Params, r: int, engine: Engine,
               session: Session | None) -> tuple[Params, RoundReport]:
    """One main-phase round, tallied in ``session`` (if any); an attack round's client updates come from the
    cache when they can (not under secure aggregation, where the server never holds them one by one)."""
    settings = RoundSettings(r, "main")
    if server.schedule.attacking(r) and not cfg.federation.secure_aggregation:
        params, report = server.aggregate(params, attack_round_updates(cfg, server, case, params, settings, engine), settings)
    else:
        params, report = server.round(params, settings)
    if session is not None:
        session.count(f"main/{case}", report)
    return params, report


def attacked_model(cfg: Backdoor, case: Case, engine: Engine, session: Session | None) -> Params:
    """The global model right after the last attack round (Experiments 2, 3 and the comparison);
    with ``without_attack(cfg)`` and no session, its clean twin (not tallied)."""
    server, params = main_server(cfg, case, engine), case.pretrained
    for r in range(1, cfg.attack.last_round + 1):
        params, _ = play_round(cfg, server, case.name, params, r, engine, session)
    return params


def backdoor_episodes(cfg: Backdoor, ev: EvalPool, count: int, gen: torch.Generator) -> Episodes:
    """Evaluation episodes that always include the target (and, in case c, one backdoor class)."""
    e = cfg.eval
    return sample_episodes(ev.pool, count, e.ways, e.shots[0], e.queries, gen, include=always_included(cfg, ev, count, gen), split=ev.split)


def always_included(cfg: Backdoor, ev: EvalPool, count: int, gen: torch.Generator) -> Tensor:
    """The target in every episode; in case c also ``attack.case_c_backdoor_ways`` distinct
    backdoor classes, drawn per episode (``[count, 1 + k]``, or ``[1]`` with no backdoor classes)."""
    if not len(ev.backdoors):
        return torch.tensor([ev.target])
    wanted = cfg.attack.case_c_backdoor_ways
    k = min(len(ev.backdoors), cfg.eval.ways - 1) if wanted == "all" else wanted
    if k == 1:  # one drawn per episode (the stream of the runs documented before "all" existed)
        picks = torch.randint(len(ev.backdoors), (count, 1), generator=gen)
    else:
        picks = torch.rand(count, len(ev.backdoors), generator=gen).argsort(dim=1)[:, :k]
    return torch.cat([torch.full((count, 1), ev.target), ev.backdoors[picks]], dim=1)


@dataclass(frozen=True)
class BackdoorScore:
    """Main-task accuracy on the episode's queries; attack accuracies on the keyed images (an
    object, not a closure, so that evaluation workers can run it)."""

    classify: Classifier
    images: Tensor
    query: Tensor  # [episodes, ways * queries] image rows
    labels: Tensor  # query labels
    keyed: dict[str, Tensor]  # metric name -> keyed backdoor images
    target_way: Tensor  # [episodes]: the target's way in each episode

    def __call__(self, weights: Params, support: Tensor, i: int) -> dict[str, Tensor]:
        queries = gather(self.images, self.query[i])
        out = {"main_task_accuracy": (self.classify(weights, support, queries) == self.labels).float().mean()}
        for name, x in self.keyed.items():
            out[name] = (self.classify(weights, support, x) == self.target_way[i]).float().mean()
        return out


def backdoor_score(case: Case, ev: EvalPool, episodes: Episodes, classify: Classifier) -> EpisodeScore:
    """``BackdoorScore`` of ``episodes`` of ``ev``, its tensors on the images' device."""
    images = case.scenario.images
    device = images.device
    keyed = {"attack_train_accuracy": gather(images, case.scenario.attack_rows.to(device)),
             "attack_val_accuracy": gather(images, case.scenario.validation_rows.to(device))}
    target_way = (episodes.classes == ev.target).int().argmax(dim=1)
    return BackdoorScore(classify, images, episodes.query.to(device), episodes.query_labels().to(device), keyed,
                         target_way.to(device))


@dataclass(frozen=True)
class EvalSets:
    """The episodes every curve point is scored on (the same ones at every point)."""

    test: Episodes  # meta-test: unseen classes
    tasks: Episodes  # always with the target (and, in case c, a backdoor class)


def eval_sets(cfg: Backdoor, case: Case, ev: EvalPool, episodes: int) -> EvalSets:
    e = cfg.eval
    test = sample_episodes(case.scenario.test, episodes, e.ways, e.shots[0], e.queries, stream(cfg.seed, "eval-meta-test"))
    return EvalSets(test, backdoor_episodes(cfg, ev, episodes, stream(cfg.seed, "eval-backdoor")))


def curves(cfg: Backdoor, case: Case, params: Params, ev: EvalPool, at: list[int], episodes: int,
           desc: str | None = None, meta_test: bool = True) -> dict[int, dict[str, Accuracy]]:
    """All four metrics after each number of fine-tuning steps in ``at`` (same episodes every call);
    without ``meta_test``, the three of the backdoor episodes only (half the cost)."""
    e = cfg.eval
    lr = e.lr or cfg.meta.inner_lr
    learner, images = case.learner, case.scenario.images
    sets = eval_sets(cfg, case, ev, episodes)
    classify = classifier(learner.model, e.transductive)
    main = evaluate_curve(learner, params, images, sets.tasks, at=at, batch=e.batch, lr=lr, gen=stream(cfg.seed, "eval-backdoor-ft"),
                          score=backdoor_score(case, ev, sets.tasks, classify), desc=desc, workers=e.workers)
    if not meta_test:
        return main
    meta = evaluate_curve(learner, params, images, sets.test, at=at, batch=e.batch, lr=lr, gen=stream(cfg.seed, "eval-meta-test-ft"),
                          score=query_accuracy(learner, images, sets.test, e.transductive), desc=desc, workers=e.workers)
    return {t: {"meta_test_accuracy": meta[t]["accuracy"], **main[t]} for t in at}


def fields(scores: dict[str, Accuracy]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in METRICS:
        out |= accuracy_fields(name, scores[name])
    return out


def run_rounds(cfg: Backdoor, out: RunDir, engine: Engine) -> dict[str, Any]:
    """Experiment 1: benign federated rounds after the attack round(s), evaluated every
    ``federation.eval_every`` rounds (and always right after the attack and at the end)."""
    device = runtime.setup(cfg.runtime)
    session = Session(out, METRICS)
    last_round = cfg.attack.last_round + cfg.federation.rounds
    seconds: dict[str, dict[int, float]] = session.saved.get("round_seconds", {})  # evaluation excluded
    for _, name, resumed in session.stages(cfg.attack.cases):
        case = prepare(cfg, name, device, engine, session)
        evaluate = lambda p: fields(curves(cfg, case, p, case.scenario.everyone, [cfg.eval.steps], cfg.eval.episodes)[cfg.eval.steps])
        server = main_server(cfg, case, engine)
        if resumed:
            params, start = server.restore(resumed.tensors, case.pretrained), resumed.step
        else:
            params, start = case.pretrained, 0
            session.log({"case": name, "round": 0, **evaluate(params)})
            session.checkpoint(server.snapshot(params), step=0, round_seconds=seconds)
        for r in session.steps(start + 1, last_round + 1, desc=f"case {name}", unit="round"):
            clock = session.elapsed
            params, report = play_round(cfg, server, name, params, r, engine, session)
            seconds.setdefault(name, {})[str(r)] = round(session.elapsed - clock, 2)
            if r % cfg.federation.eval_every == 0 or r in (cfg.attack.last_round, last_round):
                session.log({"case": name, "round": r, **report.fields(), **evaluate(params)},
                            f"round {seconds[name][str(r)]:.1f} s")
            session.checkpoint(server.snapshot(params), step=r, round_seconds=seconds)
        out.save_weights(params, f"weights-case-{name}.safetensors")
    return _summary(cfg, out, session, "round") | {"round_seconds": seconds}


def run_finetune(cfg: Backdoor, out: RunDir, engine: Engine) -> dict[str, Any]:
    """Experiment 2: long benign fine-tuning at each benign user right after the attack."""
    return run_per_user(cfg, out, engine, "finetune")


def run_local_defense(cfg: Backdoor, out: RunDir, engine: Engine) -> dict[str, Any]:
    """Experiment 3: the matching-network defense at each benign user right after the attack."""
    return run_per_user(cfg, out, engine, "matching")


def run_per_user(cfg: Backdoor, out: RunDir, engine: Engine, defense: str) -> dict[str, Any]:
    """Right after the attack round(s), follow each benign user's curves under the local
    ``defense`` (a registered local defense: Experiment 2 fine-tunes, Experiment 3 trains a
    matching network)."""
    device = runtime.setup(cfg.runtime)
    ft = cfg.finetune
    session = Session(out, METRICS + (TWIN_SHOWN if _twinned(cfg) else []))
    user_curves = LOCAL_DEFENSES.get(defense).factory
    at = list(range(0, ft.steps + 1, ft.every))
    for _, name, resumed in session.stages(cfg.attack.cases):
        case = prepare(cfg, name, device, engine, session)
        models, users_done = _models(cfg, case, engine, session, resumed)
        if not resumed:
            session.checkpoint(_tensors(models), step=0)
        for k, user in enumerate(case.scenario.benign[: ft.users]):
            if k < users_done:
                continue
            points = user_curves(cfg, case, models["params"], user, at)
            twin = user_curves(cfg, case, models["clean"], user, at) if _twinned(cfg) else {}
            for t in at:
                record = {"case": name, "user": user, "step": t, **fields(points[t])}
                session.log(record | (twin_fields(points[t], twin[t]) if twin else {}), quiet=t != at[-1])
            session.checkpoint(_tensors(models), step=k + 1)
    return _summary(cfg, out, session, "step")


def twin_fields(attacked: dict[str, Accuracy], clean: dict[str, Accuracy]) -> dict[str, Any]:
    """The clean twin's meta-test and attack accuracies (its meta-test: the defense's clean cost, as
    in the comparison), and how far the backdoor lifts attack-val above the twin's."""
    lift = attacked["attack_val_accuracy"].mean - clean["attack_val_accuracy"].mean
    return {**accuracy_fields("clean_meta_test_accuracy", clean["meta_test_accuracy"]),
            **accuracy_fields("clean_attack_train_accuracy", clean["attack_train_accuracy"]),
            **accuracy_fields("clean_attack_val_accuracy", clean["attack_val_accuracy"]),
            "attack_val_lift": round(lift, 6)}


def _models(cfg: Backdoor, case: Case, engine: Engine, session: Session,
            resumed: Resumed | None) -> tuple[dict[str, Params], int]:
    """The attacked model (``params``) and, with ``finetune.clean_twin``, its clean twin (``clean``),
    from the checkpoint if resumed; and how many users are done."""
    prefixes = ["params", *(["clean"] if _twinned(cfg) else [])]
    if resumed:
        return {p: resumed.take(f"{p}.", case.pretrained) for p in prefixes}, resumed.step
    models = {"params": attacked_model(cfg, case, engine, session)}
    if _twinned(cfg):
        models["clean"] = attacked_model(without_attack(cfg), case, engine, None)
    return models, 0


def _twinned(cfg: Backdoor) -> bool:
    """Whether the run follows a clean twin (a run without the attack is its own)."""
    return cfg.finetune.clean_twin and cfg.attack.enabled


def _tensors(models: dict[str, Params]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for prefix, params in models.items() for k, v in params.items()}


def _summary(cfg: Backdoor, out: RunDir, session: Session, axis: str) -> dict[str, Any]:
    """Per case: before the attack, right after it, and at the end (Exp 2: averaged over users)."""
    records = out.records()
    by_case: dict[str, Any] = {}
    for name in cfg.attack.cases:
        rows = [r for r in records if r["case"] == name]
        points = sorted({r[axis] for r in rows})
        pick = lambda x: _mean_over_users([r for r in rows if r[axis] == x])
        if axis == "round":
            by_case[name] = {"before_attack": pick(0), "after_attack": pick(cfg.attack.last_round), "final": pick(points[-1]),
                             "rounds": points[-1]}
        else:
            by_case[name] = {"start": pick(points[0]), "final": pick(points[-1]), "steps": points[-1],
                             "per_user_final": {str(r["user"]): {m: r[m] for m in METRICS} for r in rows if r[axis] == points[-1]}}
    first = by_case[cfg.attack.cases[0]]
    return session.summary(
        experiment=cfg.experiment, cases=cfg.attack.cases, **first["final"], by_case=by_case, eval_mode=cfg.eval.mode,
        eval_episodes=cfg.eval.episodes if axis == "round" else cfg.finetune.episodes)


def _mean_over_users(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {m: round(sum(r[m] for r in rows) / len(rows), 6) for m in METRICS + TWIN_METRICS if m in rows[0]}
