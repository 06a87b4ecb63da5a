"""Centralised meta-training (one learner, all meta-training classes) with meta-test evaluation.

Every ``eval.every`` iterations: a metrics line (meta-test accuracy on ``eval.episodes_during``
episodes) and a checkpoint. At the end: ``eval.episodes`` episodes for each of ``eval.shots``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm import tqdm

from fedmeta import runtime
from fedmeta.config import Config
from fedmeta.data.datasets import load_meta_splits
from fedmeta.experiments.common import accuracy_fields, build_learner, format_duration, format_record
from fedmeta.meta.adam import AdamState
from fedmeta.meta.evaluation import meta_test
from fedmeta.rng import stream
from fedmeta.runs import RunDir, restore_generator

LOSS_EVERY = 50  # iterations between progress-bar loss updates (each one syncs with the device)


def run(cfg: Config, out: RunDir) -> dict[str, Any]:
    device = runtime.setup(cfg.runtime)
    splits = load_meta_splits(cfg.data, cfg.seed)
    train, test = splits.train.to(device), splits.test.to(device)
    learner = build_learner(cfg, splits.image_shape)
    eval_lr = cfg.eval.lr or cfg.meta.inner_lr
    iterations = cfg.meta.iterations

    params = {k: v.to(device) for k, v in learner.model.init(stream(cfg.seed, "init")).items()}
    state = learner.init_state(params)
    gen = stream(cfg.seed, "train")
    start, elapsed = 0, 0.0
    if (resumed := out.resume()) is not None:
        tensors, progress = resumed
        params = {k: tensors[f"params.{k}"].to(device) for k in params}
        state = AdamState.from_tensors({k: v.to(device) for k, v in tensors.items()}, "state.", list(params))
        gen = restore_generator(tensors["rng"])
        start, elapsed = progress["iteration"], progress["elapsed_s"]
        tqdm.write(f"resuming {out.path} at iteration {start}")

    def evaluate(shots: int, episodes: int, stream_name: str, desc: str | None = None):
        return meta_test(
            learner, params, test, cfg.eval, shots=shots, episodes=episodes, lr=eval_lr,
            gen=stream(cfg.seed, stream_name, shots), desc=desc,
        )

    clock = time.perf_counter() - elapsed
    loss_sum = torch.zeros((), device=device)
    bar = tqdm(range(start, iterations), initial=start, total=iterations, desc="meta-training", unit="it")
    for it in bar:
        episodes = learner.sample(train, gen)
        params, state, loss = learner.train_step(params, state, episodes, train.images, gen, it / iterations)
        loss_sum += loss
        done = it + 1
        if done % LOSS_EVERY == 0:
            bar.set_postfix(loss=f"{float(loss_sum) / LOSS_EVERY:.3f}")
            loss_sum.zero_()
        if done % cfg.eval.every == 0 or done == iterations:
            acc = evaluate(cfg.eval.shots[0], cfg.eval.episodes_during, "eval-during")
            record = {"step": done, "shots": cfg.eval.shots[0], "ways": cfg.eval.ways, "mode": cfg.eval.mode,
                      "episodes": acc.episodes, **accuracy_fields("meta_test_accuracy", acc)}
            out.log(record)
            bar.write(format_record(record, ["meta_test_accuracy"]) + f" | {format_duration(time.perf_counter() - clock)}")
            tensors = {f"params.{k}": v for k, v in params.items()} | state.to_tensors("state.", list(params)) | {"rng": gen.get_state()}
            out.save_checkpoint(tensors, {"iteration": done, "elapsed_s": time.perf_counter() - clock})
    bar.close()
    train_time = time.perf_counter() - clock

    by_shots = {}
    for shots in cfg.eval.shots:
        acc = evaluate(shots, cfg.eval.episodes, "eval-final", desc=f"meta-test {cfg.eval.ways}-way {shots}-shot")
        record = {"step": iterations, "final": True, "shots": shots, "ways": cfg.eval.ways, "mode": cfg.eval.mode,
                  "episodes": acc.episodes, **accuracy_fields("meta_test_accuracy", acc)}
        out.log(record)
        tqdm.write(format_record(record, ["meta_test_accuracy"]) + f" ({cfg.eval.ways}-way {shots}-shot, final)")
        by_shots[str(shots)] = accuracy_fields("meta_test_accuracy", acc)
    out.save_weights(params)
    wall = time.perf_counter() - clock
    headline = by_shots[str(cfg.eval.shots[0])]
    return {
        "experiment": "pretrain",
        **headline,
        "eval_mode": cfg.eval.mode,
        "eval_ways": cfg.eval.ways,
        "eval_shots": cfg.eval.shots[0],
        "eval_episodes": cfg.eval.episodes,
        "meta_test_accuracy_by_shots": by_shots,
        "iterations": iterations,
        "train_time_s": round(train_time, 1),
        "seconds_per_iteration": round(train_time / iterations, 4),
        "wall_time_s": round(wall, 1),
        "wall_time": format_duration(wall),
    }
