"""Centralised meta-training (one learner, all meta-training classes) with meta-test evaluation.

Every ``eval.every`` iterations: a metrics line (meta-test accuracy on ``eval.episodes_during``
episodes) and a checkpoint. At the end: ``eval.episodes`` episodes for each of ``eval.shots``.
"""

from __future__ import annotations

from typing import Any

from fedmeta import runtime
from fedmeta.config import Base
from fedmeta.data.datasets import load_meta_splits
from fedmeta.experiments.centralised import Training, meta_train
from fedmeta.meta.evaluation import meta_test
from fedmeta.meta.learner import build_learner
from fedmeta.rng import stream
from fedmeta.runs import RunDir, Session, accuracy_fields


def run(cfg: Base, out: RunDir, engine: Any = None) -> dict[str, Any]:
    device = runtime.setup(cfg.runtime)
    splits = load_meta_splits(cfg.data, cfg.seed)
    train, test = splits.train.to(device), splits.test.to(device)
    learner = build_learner(cfg, splits.image_shape)
    eval_lr = cfg.eval.lr or cfg.meta.inner_lr
    iterations = cfg.meta.iterations
    session = Session(out, ["meta_test_accuracy"])

    params = {k: v.to(device) for k, v in learner.model.init(stream(cfg.seed, "init")).items()}
    if (resumed := session.resumed()) is not None:
        progress = Training.restore(resumed, params, device)
    else:
        gen = stream(cfg.seed, "train")
        progress = Training(params, learner.init_state(params), gen, gen)

    def evaluate(shots: int, episodes: int, stream_name: str, desc: str | None = None):
        return meta_test(
            learner, progress.params, test, cfg.eval, shots=shots, episodes=episodes, lr=eval_lr,
            gen=stream(cfg.seed, stream_name, shots), desc=desc,
        )

    def record(step: int, shots: int, acc: Any, **extra: Any) -> dict[str, Any]:
        return {"step": step, **extra, "shots": shots, "ways": cfg.eval.ways, "mode": cfg.eval.mode,
                "episodes": acc.episodes, **accuracy_fields("meta_test_accuracy", acc)}

    def point(run: Training) -> None:
        session.log(record(run.iteration, cfg.eval.shots[0], evaluate(cfg.eval.shots[0], cfg.eval.episodes_during, "eval-during")))
        session.checkpoint(run.tensors(), step=run.iteration, **run.progress())

    meta_train(session, learner, train, progress, iterations, cfg.eval.every, point, "meta-training")
    params, train_time = progress.params, progress.train_s

    by_shots = {}
    for shots in cfg.eval.shots:
        acc = evaluate(shots, cfg.eval.episodes, "eval-final", desc=f"meta-test {cfg.eval.ways}-way {shots}-shot")
        session.log(record(iterations, shots, acc, final=True), f"{cfg.eval.ways}-way {shots}-shot, final")
        by_shots[str(shots)] = accuracy_fields("meta_test_accuracy", acc)
    out.save_weights(params)
    headline = by_shots[str(cfg.eval.shots[0])]
    return session.summary(
        experiment="pretrain", **headline, eval_mode=cfg.eval.mode, eval_ways=cfg.eval.ways, eval_shots=cfg.eval.shots[0],
        eval_episodes=cfg.eval.episodes, meta_test_accuracy_by_shots=by_shots, iterations=iterations,
        train_time_s=round(train_time, 1), seconds_per_iteration=round(train_time / iterations, 4),
    )
