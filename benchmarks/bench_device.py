"""Seconds per unit of work on one device (a GPU, or the CPU), and each paper preset's expected time.

The units are what every run is made of, each timed with fedmeta's own code on the preset's own
configuration (model, shots, inner steps, batch), with the device synchronised around each timing:

- a Reptile **outer step** (B episodes x e Adam steps), episodes one after another (``loop``) and
  all B at once through ``torch.func.vmap`` (``batched``: ``runtime.batched = true`` with
  ``meta.adam_carry = 'parallel'``, each episode its own Adam moments);
- an **attacker episode** of the paper's boosted attacker (``attacks.boosted.inner_epochs`` passes
  over each poisoned episode: an outer step with that many more inner steps, divided by B);
- a **MAML meta-step** (second and first order; 5-way 1-shot, 15 queries, 5 SGD steps, 4 tasks);
- an **evaluation episode** (5-way 5-shot, 50 steps, non-transductive: the preset's fine-tuning and scoring);
- one **federated round** of 10 benign users (Omniglot, E = 100 episodes each) in this process:
  users one after another (loop, and batched episodes), and all users at once (``--engine batched``:
  ``s_round_10_users_batched_users`` with the reference's sequential Adam carry, vmapped over
  users; ``..._users_episodes`` over users x episodes).

From these the expected time of each paper preset's training is the sum over its phases of the
number of units times the unit's time (``expected_hours_<preset>``; the phases are printed beside
it); evaluation is added where a preset's evaluation points are fixed by its config.
Images are random (timing does not depend on pixel values), except in the federated round,
which builds the real federation (Omniglot under ``FEDMETA_DATA``).

    python benchmarks/bench_device.py --device cuda --json gpu.json
    python benchmarks/bench_device.py --device cpu --quick            # the same units on this CPU
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from fedmeta.config import load_config
from fedmeta.data.episodes import sample_episodes
from fedmeta.data.pool import ClassPool
from fedmeta.engines.batched import BatchedUsers
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.engine import IN_PROCESS, Engine
from fedmeta.meta.evaluation import episode_scores, query_accuracy
from fedmeta.meta.learner import MetaLearner, build_learner
from fedmeta.registry import DATASETS
from fedmeta.rng import stream
from fedmeta.runtime import synchronized_time
from fedmeta.scenario.builder import Phase, build_population, build_server

PRETRAIN = {28: "omniglot-pretrain-paper", 84: "miniimagenet-pretrain-paper"}
BACKDOOR = {28: "omniglot-exp1a-paper", 84: "miniimagenet-exp1a-paper"}


def seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup``, the device synchronised around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = synchronized_time(device)
        fn()
        times.append(synchronized_time(device) - t0)
    return statistics.median(times)


def batching(batched: bool) -> list[str]:
    """Overrides for the loop or the ``vmap`` path (which needs Adam moments per episode: ``adam_carry = 'parallel'``)."""
    return ["runtime.batched=true", "meta.adam_carry=parallel"] if batched else []


def random_pool(shape: tuple[int, int, int], device: torch.device, classes: int = 64, per_class: int = 20) -> ClassPool:
    """``classes`` x ``per_class`` random uint8 images of ``shape`` (H, W, C) on ``device``."""
    images = torch.randint(0, 256, (classes, per_class, *shape), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return ClassPool.from_class_major(images, [str(c) for c in range(classes)]).to(device)


def image_shape(cfg) -> tuple[int, int, int]:
    """``(H, W, C)`` of the config's dataset, as its registered sizes state it (nothing loaded)."""
    return DATASETS.get(cfg.data.dataset).factory.sizes(cfg.data).image_shape


def step_seconds(learner: MetaLearner, pool: ClassPool, device: torch.device, repeats: int) -> float:
    """Seconds of one ``learner.train_step`` on episodes of ``pool``, from a fresh initialisation."""
    gen = stream(0, "bench-device")
    carried = {"params": {k: v.to(device) for k, v in learner.model.init(gen).items()}}
    carried["state"] = learner.init_state(carried["params"])

    def step() -> None:
        carried["params"], carried["state"], _ = learner.train_step(carried["params"], carried["state"],
                                                                    learner.sample(pool, gen), pool.images, gen, 0.0)
    return seconds(step, device, repeats)


def outer_step(preset: str, device: torch.device, repeats: int, batched: bool, inner_steps: int | None = None) -> float:
    """Seconds of one outer step of ``preset``'s meta-learner (``inner_steps`` instead of ``meta.inner_steps``)."""
    cfg = load_config(preset, batching(batched))
    meta = cfg.meta.model_copy(update={"inner_steps": inner_steps or cfg.meta.inner_steps})
    learner = build_learner(cfg, image_shape(cfg), meta)
    pool = random_pool(image_shape(cfg), device, per_class=max(20, meta.shots + meta.queries))
    return step_seconds(learner, pool, device, repeats)


def attacker_steps(preset: str) -> int:
    """Inner steps per episode of ``preset``'s boosted attacker (as ``AttackerContext.poisoned_client``)."""
    cfg = load_config(preset)
    m, epochs = cfg.meta, cfg.attacks["boosted"]["inner_epochs"]
    return math.ceil(epochs * m.ways * m.shots / m.inner_batch)


def maml_step(device: torch.device, repeats: int, algorithm: str) -> float:
    cfg = load_config("omniglot-pretrain-paper", [f"meta.algorithm={algorithm}", "meta.shots=1", "meta.queries=15",
                                                  "meta.inner_steps=5", "meta.inner_lr=0.4", "meta.meta_batch=4"])
    return step_seconds(build_learner(cfg, (28, 28, 1)), random_pool((28, 28, 1), device), device, repeats)


def eval_episode(preset: str, device: torch.device, episodes: int) -> float:
    """Seconds per evaluation episode of ``preset`` (5-shot, its steps, batch and scoring)."""
    cfg = load_config(preset)
    learner = build_learner(cfg, image_shape(cfg))
    pool = random_pool(image_shape(cfg), device)
    gen = stream(0, "bench-device")
    params = {k: v.to(device) for k, v in learner.model.init(gen).items()}
    e = cfg.eval
    sampled = sample_episodes(pool, episodes, e.ways, 5, e.queries, gen)

    def run() -> None:
        episode_scores(learner, params, pool.images, sampled, at=[e.steps], batch=e.batch, lr=e.lr or cfg.meta.inner_lr,
                       gen=stream(0, "bench-eval"), score=query_accuracy(learner, pool.images, sampled, e.transductive),
                       workers=1)
    return seconds(run, device, repeats=1, warmup=1) / episodes


def federated_round(device: torch.device, batched: bool, users: int = 10, episodes: int = 100,
                    engine: Engine = IN_PROCESS) -> float:
    cfg = load_config("omniglot-exp1a-quick", [
        f"federation.users={users + 1}", f"federation.per_round={users}", f"federation.min_updates={users}",
        f"federation.episodes={episodes}", "attack.enabled=false", f"runtime.device={device.type}", *batching(batched)])
    phase = Phase("main", "a")
    server = build_server(cfg, phase, build_population(cfg, phase), engine)
    params = next(iter(server.clients.values())).learner.model.init(stream(cfg.seed, "init"))
    params = {k: v.to(device) for k, v in params.items()}
    return seconds(lambda: server.updates(params, RoundSettings(1, "main")), device, repeats=1, warmup=1)


def expected_hours(units: dict[str, float]) -> dict[str, object]:
    """Each paper preset's training time from the unit times (and its phases, as counts of units)."""
    out: dict[str, object] = {}
    for size, preset in PRETRAIN.items():
        cfg = load_config(preset)
        points = cfg.meta.iterations // cfg.eval.every
        eval_episodes = (points * cfg.eval.episodes_during + cfg.eval.episodes) * len(cfg.eval.shots)
        out[f"phases_{preset}"] = f"{cfg.meta.iterations} outer steps + {eval_episodes} evaluation episodes"
        for mode in ("loop", "batched"):
            s = cfg.meta.iterations * units[f"s_outer_{mode}_{size}"] + eval_episodes * units[f"s_eval_episode_{size}"]
            out[f"expected_hours_{preset}_{mode}"] = round(s / 3600, 2)
    for size, preset in BACKDOOR.items():
        cfg = load_config(preset)
        fed, pre, boosted = cfg.federation, cfg.pretrain, cfg.attacks["boosted"]
        b = cfg.meta.meta_batch
        benign = (pre.rounds * max(1, pre.episodes // b) + fed.rounds * max(1, fed.episodes // b)) * fed.per_round
        attacker = boosted["episodes"]
        out[f"phases_{preset}"] = (f"{benign} benign outer steps ({pre.rounds} pre-training + {fed.rounds} rounds x "
                                   f"{fed.per_round} users) + {attacker} attacker episodes of "
                                   f"{attacker_steps(preset)} inner steps; evaluation not counted")
        for mode in ("loop", "batched"):
            s = benign * units[f"s_outer_{mode}_{size}"] + attacker * units[f"s_attacker_episode_{mode}_{size}"]
            out[f"expected_hours_{preset}_{mode}"] = round(s / 3600, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and episodes (a first look)")
    parser.add_argument("--parts", nargs="+", default=["steps", "round"], choices=["steps", "round"],
                        help="steps: outer steps, attacker episodes, evaluation, MAML (and the paper presets' time); "
                             "round: a federated round")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats, episodes = (2, 5) if args.quick else (5, 50)
    results: dict[str, object] = {"torch": torch.__version__, "device": str(device), "quick": args.quick,
                                  "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    def record(key: str, value: float | object) -> None:
        results[key] = round(value, 5) if isinstance(value, float) else value
        print(f"{key:<52} {results[key]}", flush=True)

    if "steps" in args.parts:
        unit_steps(device, repeats, episodes, record)
    if "round" in args.parts:
        for mode, batched in (("loop", False), ("batched", True)):
            record(f"s_round_10_users_{mode}", federated_round(device, batched))
        for mode, batched in (("users", False), ("users_episodes", True)):  # --engine batched
            record(f"s_round_10_users_batched_{mode}", federated_round(device, batched, engine=BatchedUsers()))
    if "steps" in args.parts:
        for key, value in expected_hours({k: v for k, v in results.items() if isinstance(v, float)}).items():
            record(key, value)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True))
        print(f"wrote {args.json}")


def unit_steps(device: torch.device, repeats: int, episodes: int, record: Callable[[str, float], None]) -> None:
    """Record the training and evaluation units of both image sizes, and the MAML meta-steps."""
    for size in (28, 84):
        pretrain, backdoor = PRETRAIN[size], BACKDOOR[size]
        batch = load_config(pretrain).meta.meta_batch
        for mode, batched in (("loop", False), ("batched", True)):
            record(f"s_outer_{mode}_{size}", outer_step(pretrain, device, repeats, batched))
            attacker = outer_step(backdoor, device, max(1, repeats // 2), batched, attacker_steps(backdoor))
            record(f"s_attacker_episode_{mode}_{size}", attacker / batch)
        record(f"s_eval_episode_{size}", eval_episode(pretrain, device, episodes))
    for algorithm in ("maml", "fomaml"):
        record(f"s_{algorithm}_step_28", maml_step(device, repeats, algorithm))


if __name__ == "__main__":
    main()
