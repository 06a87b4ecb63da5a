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

``robustness-federated`` runs one learner (``robust.client_learner``) on every client of a
federation instead, once per entry of ``robust.maml_clients``, that many clients training plain
MAML: whether the robustness of the global model survives non-robust participants.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from tqdm import tqdm

from fedmeta import runtime
from fedmeta.attacks.evasion import LinfAttack, pixels, robust_meta_test
from fedmeta.config import Config
from fedmeta.data.datasets import load_meta_splits
from fedmeta.data.pool import ClassPool
from fedmeta.data.splits import partition
from fedmeta.defenses.robust_maml import make_robust_learner
from fedmeta.experiments.common import accuracy_fields, build_model, format_duration, format_record
from fedmeta.federation.aggregation import make_rule
from fedmeta.federation.client import MetaClient, RoundSettings
from fedmeta.federation.schedule import Schedule
from fedmeta.federation.server import Server
from fedmeta.meta.adam import AdamState
from fedmeta.meta.evaluation import Accuracy
from fedmeta.meta.learner import MetaLearner
from fedmeta.models.conv4 import Conv4, Params
from fedmeta.rng import stream
from fedmeta.runs import RunDir, restore_generator

METRICS = {"standard": "standard_accuracy", "pgd": "robust_accuracy", "fgsm": "fgsm_accuracy"}
LOSS_EVERY = 50  # iterations between progress-bar loss updates (each one syncs with the device)


@dataclass(frozen=True)
class Bench:
    """What every learner of a run shares: config, run folder, data, model and evaluation."""

    cfg: Config
    out: RunDir
    train: ClassPool
    test: ClassPool
    model: Conv4
    device: torch.device

    @property
    def eval_epsilon(self) -> float:
        """The evaluation radius in pixel levels."""
        return self.cfg.robust.eval_epsilon or self.cfg.robust.epsilon

    def attacks(self) -> dict[str, LinfAttack]:
        robust, epsilon = self.cfg.robust, pixels(self.eval_epsilon)
        return {"pgd": LinfAttack.pgd(epsilon, pixels(robust.pgd_step), robust.pgd_steps), "fgsm": LinfAttack.fgsm(epsilon)}

    def evaluate(
        self, learner: MetaLearner, params: Params, shots: int, episodes: int, stream_name: str, desc: str | None = None
    ) -> dict[str, Accuracy]:
        """SA and accuracy under each attack; every learner sees the same episodes and attack noise."""
        cfg = self.cfg
        return robust_meta_test(
            learner, params, self.test, cfg.eval, self.attacks(), shots=shots, episodes=episodes,
            lr=cfg.eval.lr or cfg.meta.inner_lr, gen=stream(cfg.seed, stream_name, shots),
            attack_gen=stream(cfg.seed, stream_name, "attack", shots), desc=desc,
        )

    def record(self, where: dict[str, Any], shots: int, accs: dict[str, Accuracy], final: bool) -> dict[str, Any]:
        """Write and print one metrics line; ``where`` names the point (learner and step, or case and round)."""
        cfg = self.cfg
        record = {**where, "shots": shots, "ways": cfg.eval.ways, "mode": cfg.eval.mode,
                  "episodes": accs["standard"].episodes, "epsilon_255": self.eval_epsilon,
                  "pgd_steps": cfg.robust.pgd_steps}
        if final:
            record["final"] = True
        for key, metric in METRICS.items():
            record |= accuracy_fields(metric, accs[key])
        self.out.log(record)
        tqdm.write(format_record(record, list(METRICS.values())))
        return record


@dataclass
class Progress:
    """Where a learner's training stands; what a checkpoint restores."""

    params: Params
    state: AdamState
    episode_gen: torch.Generator
    attack_gen: torch.Generator
    iteration: int = 0
    train_s: float = 0.0

    def tensors(self) -> dict[str, torch.Tensor]:
        names = list(self.params)
        return ({f"params.{k}": v for k, v in self.params.items()} | self.state.to_tensors("state.", names)
                | {"rng.episodes": self.episode_gen.get_state(), "rng.attack": self.attack_gen.get_state()})

    @classmethod
    def restore(cls, tensors: dict[str, torch.Tensor], names: list[str], device: torch.device, iteration: int,
                train_s: float) -> Progress:
        on_device = {k: v.to(device) for k, v in tensors.items()}
        return cls({k: on_device[f"params.{k}"] for k in names}, AdamState.from_tensors(on_device, "state.", names),
                   restore_generator(tensors["rng.episodes"]), restore_generator(tensors["rng.attack"]),
                   iteration, train_s)


def run(cfg: Config, out: RunDir) -> dict[str, Any]:
    device = runtime.setup(cfg.runtime)
    splits = load_meta_splits(cfg.data, cfg.seed)
    bench = Bench(cfg, out, splits.train.to(device), splits.test.to(device), build_model(cfg.model, splits.image_shape, cfg.meta.ways), device)
    resumed = out.resume()
    saved = resumed[1] if resumed is not None else {"finished": {}, "elapsed_s": 0.0}
    finished: dict[str, dict[str, Any]] = saved["finished"]
    clock = time.perf_counter() - saved["elapsed_s"]
    for name in cfg.robust.learners:
        if name in finished:
            continue
        learner = make_robust_learner(bench.model, cfg.meta, cfg.robust, name)
        progress = start(bench, learner, name, resumed if resumed and saved.get("learner") == name else None)
        finished[name] = train_and_evaluate(bench, learner, name, progress, finished, clock)
        out.save_checkpoint({}, {"finished": finished, "elapsed_s": time.perf_counter() - clock})
    tqdm.write(results_table(cfg, finished))
    wall = time.perf_counter() - clock
    return summary(bench, finished, wall)


def start(bench: Bench, learner: MetaLearner, name: str, resumed: tuple[dict, dict] | None) -> Progress:
    """Fresh progress (shared initial weights and episode stream), or the checkpointed one."""
    cfg = bench.cfg
    params = {k: v.to(bench.device) for k, v in bench.model.init(stream(cfg.seed, "init")).items()}
    if resumed is None:
        return Progress(params, learner.init_state(params), stream(cfg.seed, "train"), stream(cfg.seed, "train-attack", name))
    tensors, saved = resumed
    tqdm.write(f"resuming {bench.out.path}: {name} at iteration {saved['iteration']}")
    return Progress.restore(tensors, list(params), bench.device, saved["iteration"], saved["train_s"])


def train_and_evaluate(
    bench: Bench, learner: MetaLearner, name: str, progress: Progress, finished: dict[str, Any], clock: float
) -> dict[str, Any]:
    """Meta-train one learner with evaluation points and checkpoints; returns its row of the table."""
    cfg, p = bench.cfg, progress
    iterations = cfg.meta.iterations
    loss_sum = torch.zeros((), device=bench.device)
    bar = tqdm(range(p.iteration, iterations), initial=p.iteration, total=iterations, desc=name, unit="it")
    segment = time.perf_counter()
    for it in bar:
        episodes = learner.sample(bench.train, p.episode_gen)
        p.params, p.state, loss = learner.train_step(p.params, p.state, episodes, bench.train.images, p.attack_gen,
                                                     it / iterations)
        loss_sum += loss
        p.iteration = it + 1
        if p.iteration % LOSS_EVERY == 0:
            bar.set_postfix(loss=f"{float(loss_sum) / LOSS_EVERY:.3f}")
            loss_sum.zero_()
        if p.iteration % cfg.eval.every == 0 or p.iteration == iterations:
            p.train_s += synchronized_time(bench.device) - segment
            accs = bench.evaluate(learner, p.params, cfg.eval.shots[0], cfg.eval.episodes_during, "eval-during")
            bench.record({"learner": name, "step": p.iteration}, cfg.eval.shots[0], accs, final=False)
            bench.out.save_checkpoint(p.tensors(), {"learner": name, "iteration": p.iteration, "train_s": p.train_s,
                                                    "finished": finished, "elapsed_s": time.perf_counter() - clock})
            segment = time.perf_counter()
    bar.close()
    accuracies = final_evaluation(bench, learner, p.params, {"learner": name, "step": iterations}, name)
    bench.out.save_weights(p.params, f"weights-{name}.safetensors")
    return {**accuracies, "train_time_s": round(p.train_s, 1), "seconds_per_iteration": round(p.train_s / iterations, 4)}


def final_evaluation(bench: Bench, learner: MetaLearner, params: Params, where: dict[str, Any], desc: str) -> dict[str, Any]:
    """The final meta-test for each of ``eval.shots``; returns the accuracies of the first (the table's)."""
    cfg = bench.cfg
    finals = []
    for shots in cfg.eval.shots:
        accs = bench.evaluate(learner, params, shots, cfg.eval.episodes, "eval-final",
                              f"{desc}: meta-test {cfg.eval.ways}-way {shots}-shot")
        finals.append(bench.record(where, shots, accs, final=True))
    return {k: v for k, v in finals[0].items() if k.endswith(("_accuracy", "_ci95"))}


def synchronized_time(device: torch.device) -> float:
    """``perf_counter`` after the device has finished its queued work (GPU timings are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def results_table(cfg: Config, rows: dict[str, dict[str, Any]], label: str = "learner") -> str:
    """The comparison as a Markdown table (what docs/robustness.md shows), one row per ``label``."""
    lines = [f"{cfg.eval.ways}-way {cfg.eval.shots[0]}-shot, {cfg.eval.mode}, {cfg.eval.episodes} episodes, 95% CI",
             f"| {label} | SA | RA (PGD) | FGSM | s / meta-iteration |", "| --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        cells = [f"{100 * row[m]:.2f}% ± {100 * row[m + '_ci95']:.2f}" for m in METRICS.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['seconds_per_iteration']:.3f} |")
    return "\n".join(lines)


def summary(bench: Bench, rows: dict[str, dict[str, Any]], wall: float) -> dict[str, Any]:
    cfg = bench.cfg
    return {
        "experiment": "robustness",
        **protocol(bench),
        "learners": {name: rows[name] for name in cfg.robust.learners},
        "iterations": cfg.meta.iterations,
        "wall_time_s": round(wall, 1),
        "wall_time": format_duration(wall),
    }


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
                       f"FGSM eps {eps}",
        "train_attack": f"FGSM-RS L-inf eps {robust.epsilon:g}/255, step {robust.fgsm_step:g} eps",
    }


def run_federated(cfg: Config, out: RunDir) -> dict[str, Any]:
    """Federated R-MAML: does a robust meta-initialisation survive clients that train plain MAML?

    The meta-training classes are split among ``federation.users`` users. Each client runs
    ``robust.client_learner`` locally through the ordinary federation (``MetaClient``, ``Server``,
    ``federation.rule``), except that in case ``k`` of ``robust.maml_clients`` users ``0..k-1``
    train plain MAML. Every case starts from the same weights and sees the same schedule, and the
    global model is evaluated like the centralised learners (clean fine-tuning, SA, RA under PGD,
    FGSM) every ``eval.every`` rounds and at the end. A checkpoint after every round resumes a run.
    """
    device = runtime.setup(cfg.runtime)
    splits = load_meta_splits(cfg.data, cfg.seed)
    bench = Bench(cfg, out, splits.train.to(device), splits.test.to(device), build_model(cfg.model, splits.image_shape, cfg.meta.ways), device)
    owners = partition(torch.arange(bench.train.num_classes), cfg.federation.users, stream(cfg.seed, "users"))
    resumed = out.resume()
    saved = resumed[1] if resumed is not None else {"finished": {}, "elapsed_s": 0.0}
    finished: dict[str, dict[str, Any]] = saved["finished"]
    clock = time.perf_counter() - saved["elapsed_s"]
    for plain in cfg.robust.maml_clients:
        name = f"{plain} MAML of {cfg.federation.users}"
        if name in finished:
            continue
        at = resumed if resumed is not None and saved.get("case") == name else None
        finished[name] = federate_and_evaluate(bench, robust_federation(bench, owners, plain), name, at, finished, clock)
        out.save_checkpoint({}, {"finished": finished, "elapsed_s": time.perf_counter() - clock})
    tqdm.write(results_table(cfg, finished, "case"))
    wall = time.perf_counter() - clock
    fed = cfg.federation
    return {
        "experiment": "robustness-federated",
        **protocol(bench),
        "client_learner": cfg.robust.client_learner,
        "federation": f"{fed.users} users, {fed.per_round} per round, rule {fed.rule}, {fed.rounds} rounds of "
                      f"{fed.episodes} episodes per client",
        "cases": finished,
        "wall_time_s": round(wall, 1),
        "wall_time": format_duration(wall),
    }


def robust_federation(bench: Bench, owners: list[torch.Tensor], plain: int) -> Server:
    """Clients on their own classes running the robust learner, the first ``plain`` of them plain MAML."""
    cfg, fed = bench.cfg, bench.cfg.federation
    robust = make_robust_learner(bench.model, cfg.meta, cfg.robust, cfg.robust.client_learner)
    maml = make_robust_learner(bench.model, cfg.meta, cfg.robust, "maml")
    clients = {}
    for user, classes in enumerate(owners):
        learner, pool = maml if user < plain else robust, bench.train.classes(classes)
        clients[user] = MetaClient(user, learner, pool.images, partial(learner.sample, pool),
                                   max(1, fed.episodes // cfg.meta.meta_batch), int(pool.counts.sum()), cfg.seed)
    schedule = Schedule(fed.users, fed.per_round, cfg.seed)
    return Server(clients, schedule, make_rule(fed), min(fed.min_updates, fed.per_round), fed.weighting)


def federate_and_evaluate(
    bench: Bench, server: Server, name: str, resumed: tuple[dict, dict] | None, finished: dict[str, Any], clock: float
) -> dict[str, Any]:
    """The federated rounds of one case with evaluation points and checkpoints; returns its row."""
    cfg, rounds = bench.cfg, bench.cfg.federation.rounds
    params = {k: v.to(bench.device) for k, v in bench.model.init(stream(cfg.seed, "init")).items()}
    start, train_s = 0, 0.0
    if resumed is not None:
        tensors, saved = resumed
        params, start, train_s = {k: tensors[k].to(bench.device) for k in params}, saved["round"], saved["train_s"]
        tqdm.write(f"resuming {bench.out.path}: {name} at round {start}")
    evaluator = make_robust_learner(bench.model, cfg.meta, cfg.robust, "maml")  # clean fine-tuning, as for every learner
    for r in tqdm(range(start, rounds), initial=start, total=rounds, desc=name, unit="round"):
        segment = time.perf_counter()
        params, _ = server.round(params, RoundSettings(r, "main", (r / rounds, (r + 1) / rounds)))
        train_s += synchronized_time(bench.device) - segment
        if (r + 1) % cfg.eval.every == 0 and r + 1 < rounds:
            accs = bench.evaluate(evaluator, params, cfg.eval.shots[0], cfg.eval.episodes_during, "eval-during")
            bench.record({"case": name, "round": r + 1}, cfg.eval.shots[0], accs, final=False)
        bench.out.save_checkpoint(params, {"case": name, "round": r + 1, "train_s": train_s, "finished": finished,
                                           "elapsed_s": time.perf_counter() - clock})
    accuracies = final_evaluation(bench, evaluator, params, {"case": name, "round": rounds}, name)
    client_iterations = rounds * server.schedule.per_round * max(1, cfg.federation.episodes // cfg.meta.meta_batch)
    return {**accuracies, "train_time_s": round(train_s, 1), "seconds_per_round": round(train_s / max(rounds, 1), 2),
            "seconds_per_iteration": round(train_s / max(client_iterations, 1), 4)}
