"""Robust meta-learning (R-MAML): train several meta-learners and compare clean and robust accuracy.

The learners of ``robust.learners`` (MAML, ADML, R-MAML-AT, R-MAML-TRADES) are trained one after
another from the same initial weights on the same training episodes (the random starts of their
training attacks come from a stream per learner), and evaluated on the same meta-test episodes
with the same attack noise, so the comparison is paired. Every ``eval.every`` iterations each
learner writes a metrics line on ``eval.episodes_during`` episodes; at the end, ``eval.episodes``
episodes for each of ``eval.shots`` (the summary's table holds the first).

Evaluation, as R-MAML's: ``eval.steps`` SGD steps on the clean support set, then standard
accuracy (SA), robust accuracy under PGD (RA) and, to show that the gradients are not masked,
accuracy under FGSM (PGD must be at least as strong). Whether all queries share one batch
(transductive, MetaAdv's protocol) or each goes alone with the support set is ``eval.mode``; it is
written beside every number. Time per meta-iteration counts training only, not evaluations.

Both run through the shared pieces: the centralised loop (``experiments.centralised``), the
federation builder (``scenario.builder``: the same clients and server a Flower node rebuilds) and
the run loop (``runs.Session``).

``robustness-federated`` runs one learner (``robust.client_learner``) on every client of a
federation instead, once per entry of ``robust.maml_clients``, that many clients training plain
MAML: whether the robustness of the global model survives non-robust participants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedmeta import runtime
from fedmeta.attacks.evasion import LinfAttack, pixels, robust_meta_test
from fedmeta.config import Base, Federated
from fedmeta.data.datasets import load_meta_splits
from fedmeta.data.pool import ClassPool
from fedmeta.defenses.robust_maml import make_robust_learner
from fedmeta.experiments.centralised import Training, meta_train
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.engine import Engine
from fedmeta.federation.server import Server
from fedmeta.meta.evaluation import Accuracy
from fedmeta.meta.learner import MetaLearner
from fedmeta.models.build import build_model
from fedmeta.models.conv4 import Conv4, Params
from fedmeta.rng import stream
from fedmeta.runs import Resumed, RunDir, Session, accuracy_fields
from fedmeta.runtime import synchronized_time
from fedmeta.scenario.builder import Phase, build_population, build_server

METRICS = {"standard": "standard_accuracy", "pgd": "robust_accuracy", "fgsm": "fgsm_accuracy",
           "strong": "strong_robust_accuracy"}


@dataclass(frozen=True)
class Bench:
    """What every learner of a run shares: config, session, meta-test data, model and evaluation."""

    cfg: Base
    session: Session
    test: ClassPool
    model: Conv4
    device: torch.device

    @property
    def eval_epsilon(self) -> float:
        """The evaluation radius in pixel levels."""
        return self.cfg.robust.eval_epsilon or self.cfg.robust.epsilon

    def attacks(self, final: bool) -> dict[str, LinfAttack]:
        """PGD and FGSM at every point; the stronger PGD with restarts at the final one only (its cost)."""
        robust, epsilon = self.cfg.robust, pixels(self.eval_epsilon)
        attacks = {"pgd": LinfAttack.pgd(epsilon, pixels(robust.pgd_step), robust.pgd_steps), "fgsm": LinfAttack.fgsm(epsilon)}
        if final and robust.strong_restarts:
            attacks["strong"] = LinfAttack.pgd(epsilon, pixels(robust.pgd_step), robust.strong_steps, robust.strong_restarts)
        return attacks

    def evaluate(
        self, learner: MetaLearner, params: Params, shots: int, episodes: int, stream_name: str,
        desc: str | None = None, final: bool = False,
    ) -> dict[str, Accuracy]:
        """SA and accuracy under each attack; every learner sees the same episodes and attack noise.

        PGD and FGSM share one stream (as before the stronger attack existed, so their numbers did
        not change); the stronger attack has its own.
        """
        cfg = self.cfg
        shared = stream(cfg.seed, stream_name, "attack", shots)
        gens = {"pgd": shared, "fgsm": shared, "strong": stream(cfg.seed, stream_name, "attack-strong", shots)}
        return robust_meta_test(
            learner, params, self.test, cfg.eval, self.attacks(final), shots=shots, episodes=episodes,
            lr=cfg.eval.lr or cfg.meta.inner_lr, gen=stream(cfg.seed, stream_name, shots), attack_gens=gens, desc=desc,
        )

    def record(self, where: dict[str, Any], shots: int, accs: dict[str, Accuracy], final: bool) -> dict[str, Any]:
        """Write and print one metrics line; ``where`` names the point (learner and step, or case and round)."""
        cfg = self.cfg
        record = {**where, "shots": shots, "ways": cfg.eval.ways, "mode": cfg.eval.mode,
                  "episodes": accs["standard"].episodes, "epsilon_255": self.eval_epsilon,
                  "pgd_steps": cfg.robust.pgd_steps}
        if final:
            record["final"] = True
        if "strong" in accs:
            record |= {"strong_steps": cfg.robust.strong_steps, "strong_restarts": cfg.robust.strong_restarts}
        for key, metric in METRICS.items():
            if key in accs:
                record |= accuracy_fields(metric, accs[key])
        self.session.log(record)
        return record


def run(cfg: Base, out: RunDir, engine: Any = None) -> dict[str, Any]:
    device = runtime.setup(cfg.runtime)
    splits = load_meta_splits(cfg.data, cfg.seed)
    train = splits.train.to(device)
    bench = Bench(cfg, Session(out, list(METRICS.values())), splits.test.to(device),
                  build_model(cfg.model, splits.image_shape, cfg.meta.ways), device)
    finished: dict[str, dict[str, Any]] = bench.session.saved.get("finished", {})
    for _, name, resumed in bench.session.stages(cfg.robust.learners):
        learner = make_robust_learner(bench.model, cfg.meta, cfg.robust, name)
        params = {k: v.to(device) for k, v in bench.model.init(stream(cfg.seed, "init")).items()}
        progress = (Training.restore(resumed, params, device) if resumed else
               Training(params, learner.init_state(params), stream(cfg.seed, "train"), stream(cfg.seed, "train-attack", name)))

        def point(run: Training, learner: MetaLearner = learner, name: str = name) -> None:
            accs = bench.evaluate(learner, run.params, cfg.eval.shots[0], cfg.eval.episodes_during, "eval-during")
            bench.record({"learner": name, "step": run.iteration}, cfg.eval.shots[0], accs, final=False)
            bench.session.checkpoint(run.tensors(), step=run.iteration, finished=finished, **run.progress())

        meta_train(bench.session, learner, train, progress, cfg.meta.iterations, cfg.eval.every, point, name)
        accuracies = final_evaluation(bench, learner, progress.params, {"learner": name, "step": cfg.meta.iterations}, name)
        out.save_weights(progress.params, f"weights-{name}.safetensors")
        finished[name] = {**accuracies, "train_time_s": round(progress.train_s, 1),
                          "seconds_per_iteration": round(progress.train_s / cfg.meta.iterations, 4)}
        bench.session.checkpoint({}, finished=finished)
    print(results_table(cfg, finished))
    return bench.session.summary(experiment="robustness", **protocol(bench),
                                 learners={name: finished[name] for name in cfg.robust.learners},
                                 iterations=cfg.meta.iterations)


def final_evaluation(bench: Bench, learner: MetaLearner, params: Params, where: dict[str, Any], desc: str) -> dict[str, Any]:
    """The final meta-test for each of ``eval.shots``; returns the accuracies of the first (the table's)."""
    cfg = bench.cfg
    finals = []
    for shots in cfg.eval.shots:
        accs = bench.evaluate(learner, params, shots, cfg.eval.episodes, "eval-final",
                              f"{desc}: meta-test {cfg.eval.ways}-way {shots}-shot", final=True)
        finals.append(bench.record(where, shots, accs, final=True))
    return {k: v for k, v in finals[0].items() if k.removesuffix("_ci95") in METRICS.values()}


def results_table(cfg: Base, rows: dict[str, dict[str, Any]], label: str = "learner") -> str:
    """The comparison as a Markdown table (what docs/robustness.md shows), one row per ``label``."""
    lines = [f"{cfg.eval.ways}-way {cfg.eval.shots[0]}-shot, {cfg.eval.mode}, {cfg.eval.episodes} episodes, 95% CI",
             f"| {label} | SA | RA (PGD) | FGSM | RA (strong PGD) | s / meta-iteration |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        cells = [f"{100 * row[m]:.2f}% ± {100 * row[m + '_ci95']:.2f}" if m in row else "-" for m in METRICS.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['seconds_per_iteration']:.3f} |")
    return "\n".join(lines)


def protocol(bench: Bench) -> dict[str, Any]:
    """How the numbers of a summary were measured: evaluation and training attacks."""
    cfg, robust = bench.cfg, bench.cfg.robust
    eps = f"{bench.eval_epsilon:g}/255"
    return {
        "eval_mode": cfg.eval.mode,
        "eval_ways": cfg.eval.ways,
        "eval_shots": cfg.eval.shots[0],
        "eval_episodes": cfg.eval.episodes,
        "eval_finetune_steps": cfg.eval.steps,
        "eval_attack": f"PGD-{robust.pgd_steps} L-inf eps {eps}, step {robust.pgd_step:g}/255, random start; "
                       f"FGSM eps {eps}" + (f"; final: PGD-{robust.strong_steps}, {robust.strong_restarts} restarts"
                                            if robust.strong_restarts else ""),
        "train_attack": f"FGSM-RS L-inf eps {robust.epsilon:g}/255, step {robust.fgsm_step:g} eps",
    }




def run_federated(cfg: Federated, out: RunDir, engine: Engine) -> dict[str, Any]:
    """Federated R-MAML: does a robust meta-initialisation survive clients that train plain MAML?

    The meta-training classes are split among ``federation.users`` users (the builder's
    ``Partition``). Each client runs ``robust.client_learner`` through the ordinary federation,
    except that in case ``k`` of ``robust.maml_clients`` users ``0..k-1`` train plain MAML. Every
    case starts from the same weights and sees the same schedule, and the global model is
    evaluated like the centralised learners (clean fine-tuning, SA, RA under PGD, FGSM) every
    ``federation.eval_every`` rounds and at the end. A checkpoint after every round resumes a run.
    """
    device = runtime.setup(cfg.runtime)
    population = build_population(cfg, Phase())
    bench = Bench(cfg, Session(out, list(METRICS.values())), population.test,
                  build_model(cfg.model, population.image_shape, cfg.meta.ways), device)
    finished: dict[str, dict[str, Any]] = bench.session.saved.get("finished", {})
    names = [f"{plain} MAML of {cfg.federation.users}" for plain in cfg.robust.maml_clients]
    for index, name, resumed in bench.session.stages(names):
        server = build_server(cfg, Phase(plain=cfg.robust.maml_clients[index]), population, engine)
        finished[name] = federate_and_evaluate(bench, server, name, resumed, finished)
        bench.session.checkpoint({}, finished=finished)
    print(results_table(cfg, finished, "case"))
    fed = cfg.federation
    return bench.session.summary(
        experiment="robustness-federated", **protocol(bench), client_learner=cfg.robust.client_learner,
        federation=f"{fed.users} users, {fed.per_round} per round, rule {fed.rule}, {fed.rounds} rounds of "
                   f"{fed.episodes} episodes per client", cases=finished)


def federate_and_evaluate(bench: Bench, server: Server, name: str, resumed: Resumed | None,
                          finished: dict[str, Any]) -> dict[str, Any]:
    """The federated rounds of one case with evaluation points and checkpoints; returns its row."""
    cfg, rounds, session = bench.cfg, bench.cfg.federation.rounds, bench.session
    params = {k: v.to(bench.device) for k, v in bench.model.init(stream(cfg.seed, "init")).items()}
    start, train_s = 0, 0.0
    if resumed is not None:
        params, start, train_s = server.restore(resumed.tensors, params), resumed.step, resumed.state["train_s"]
    evaluator = make_robust_learner(bench.model, cfg.meta, cfg.robust, "maml")  # clean fine-tuning, as for every learner
    for r in session.steps(start, rounds, desc=name, unit="round"):
        segment = synchronized_time(bench.device)
        params, report = server.round(params, RoundSettings(r, "main", (r / rounds, (r + 1) / rounds)))
        session.count(f"main/{name}", report)
        train_s += synchronized_time(bench.device) - segment
        if (r + 1) % cfg.federation.eval_every == 0 and r + 1 < rounds:
            accs = bench.evaluate(evaluator, params, cfg.eval.shots[0], cfg.eval.episodes_during, "eval-during")
            bench.record({"case": name, "round": r + 1}, cfg.eval.shots[0], accs, final=False)
        session.checkpoint(server.snapshot(params), step=r + 1, train_s=train_s, finished=finished)
    accuracies = final_evaluation(bench, evaluator, params, {"case": name, "round": rounds}, name)
    client_iterations = rounds * server.schedule.per_round * max(1, cfg.federation.episodes // cfg.meta.meta_batch)
    return {**accuracies, "train_time_s": round(train_s, 1), "seconds_per_round": round(train_s / max(rounds, 1), 2),
            "seconds_per_iteration": round(train_s / max(client_iterations, 1), 4)}
