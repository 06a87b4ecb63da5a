"""Membership inference on distributed MAML, and the defenses against it (paper 001, SPEC section 3).

Distributed MAML: at every outer step ``meta.meta_batch`` task learners each adapt omega on the
support set of a task from the train split and send the meta-gradient of their query loss (under
a noise defense, if any); the server averages them and takes an Adam step. The attacked tasks,
their members and the non-member candidates all come from the test split, so omega carries no
trace of any of them.

The run is a list of points, each a model (meta-trained once per defense and number of ways)
and an attack on ``trials`` tasks. Stages:

- ``main``: the undefended model, ``mia.trials`` tasks, ``mia.iterations`` inversion steps; the
  first ``mia.reconstructions`` trials keep their images (``reconstructions.safetensors``);
- ``aggregation``: the same model, the server sees the mean gradient of k tasks;
- ``defense``: the undefended model as the common reference (``defense = "none"``), then one
  model meta-trained and attacked under each noise defense and scale;
- ``ways``: an undefended model per number of ways.

Each task is attacked at one support slot and one query slot (the same observed gradient), with
the true example (member) and each kind of non-member as the prior. ``metrics.jsonl`` gets one
line per point, target, non-member kind and score, with ``attack_accuracy``, ``attack_auc``,
``tpr_at_1pct_fpr`` and the model's ``meta_test_accuracy``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm import tqdm

from fedmeta import runtime
from fedmeta.attacks.membership import (
    INVERSION_SCORES,
    ZERO_SCORES,
    Target,
    attack_accuracy,
    expected_observation,
    fit_classifier,
    inversion_scores,
    invert,
    roc_auc,
    tpr_at_fpr,
    zero_scores,
)
from fedmeta.config import Base as Config
from fedmeta.data.datasets import load_meta_splits
from fedmeta.data.episodes import gather, sample_episodes, way_labels
from fedmeta.data.pool import ClassPool
from fedmeta.defenses.noise import DEFENSES, Noise, shared_gradient
from fedmeta.meta.adam import AdamState, adam_step_
from fedmeta.meta.evaluation import Accuracy, meta_test
from fedmeta.meta.learner import Maml, outer_rate
from fedmeta.meta.maml import MetaGradient, task_meta_gradient
from fedmeta.models.build import build_model
from fedmeta.models.conv4 import Params
from fedmeta.models.smallconv import SmallConv
from fedmeta.rng import stream
from fedmeta.runs import RunDir, Session, accuracy_fields, format_duration

Stage = Literal["main", "aggregation", "defense", "ways"]
Task = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]
RECONSTRUCTIONS = "reconstructions.safetensors"
CLASSIFIER_BATCH = 128


@dataclass(frozen=True)
class Point:
    stage: Stage
    ways: int
    noise: Noise | None = None
    k: int = 1

    @property
    def key(self) -> str:
        """Names the point's random streams (and, for undefended models, the model's)."""
        defense = f"{self.noise.kind}-{self.noise.scale:g}" if self.noise else "none"
        return f"{self.stage}/ways-{self.ways}/{defense}/k-{self.k}"

    @property
    def model_key(self) -> str:
        return f"ways-{self.ways}/" + (f"{self.noise.kind}-{self.noise.scale:g}" if self.noise else "none")

    def fields(self) -> dict[str, Any]:
        noise = self.noise
        return {"stage": self.stage, "ways": self.ways, "k": self.k,
                "defense": noise.kind if noise else "none", "scale": noise.scale if noise else 0.0}


def plan(cfg: Config) -> list[Point]:
    """Every point of the run, in order (see the module docstring)."""
    ways = cfg.meta.ways
    points = [Point("main", ways)]
    points += [Point("aggregation", ways, k=k) for k in cfg.mia.aggregate]
    scales = cfg.mia.defenses.model_dump()
    defended = [Point("defense", ways, Noise(kind, s)) for kind in DEFENSES for s in scales[kind]]
    if defended:
        points += [Point("defense", ways), *defended]
    points += [Point("ways", n) for n in cfg.mia.ways]
    return points


@dataclass(frozen=True)
class Trial:
    """One attacked task and its candidates; ``spares[c]``: an image of way c, not in the task."""

    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]
    slots: dict[Target, int]
    candidates: dict[Target, dict[str, Tensor]]  # "member", "same-class", "other-class" -> image


def draw_trial(cfg: Config, pool: ClassPool, ways: int, gen: torch.Generator) -> Trial:
    """A task of ``ways`` classes of ``pool`` with one slot per target and its candidates.

    Every dataset class gets one spare image outside the task; the same-class non-member is the
    spare of the slot's class, the other-class one the spare of another dataset class (in the task
    or not: "any other class", so it exists for every number of ways).
    """
    m = cfg.meta
    episode = sample_episodes(pool, 1, pool.num_classes, m.shots, m.queries + 1, gen)
    rows = episode.rows[0]
    images = gather(pool.images, rows)  # [classes (random order), shots + queries + 1, C, H, W]
    device = images.device
    support = (images[:ways, : m.shots].flatten(0, 1), way_labels(ways, m.shots).to(device))
    query = (images[:ways, m.shots : -1].flatten(0, 1), way_labels(ways, m.queries).to(device))
    spares = images[:, -1]
    slots: dict[Target, int] = {}
    candidates: dict[Target, dict[str, Tensor]] = {}
    for target, (x, y) in (("support", support), ("query", query)):
        slot = int(torch.randint(len(y), (), generator=gen))
        way = int(y[slot])
        other = (way + 1 + int(torch.randint(pool.num_classes - 1, (), generator=gen))) % pool.num_classes
        slots[target] = slot
        candidates[target] = {"member": x[slot], "same-class": spares[way], "other-class": spares[other]}
    return Trial(support, query, slots, candidates)


@dataclass
class Context:
    """What every point shares: the config, data, device and the models trained so far."""

    cfg: Config
    train: ClassPool
    test: ClassPool
    device: torch.device
    classify: Callable[[Tensor], Tensor] | None = None  # images -> dataset classes (when some stage inverts)
    models: dict[str, tuple[Params, Accuracy]] = field(default_factory=dict)

    def learner(self, ways: int, params: Params) -> MetaGradient:
        """A task learner of the protocol in ``meta`` (what the server also simulates)."""
        m = self.cfg.meta
        model = build_model(self.cfg.model, self.train.image_shape, ways)
        return partial(task_meta_gradient, model, params, steps=m.inner_steps, lr=m.inner_lr,
                       first_order=m.algorithm == "fomaml")

    def task(self, pool: ClassPool, ways: int, gen: torch.Generator) -> Task:
        m = self.cfg.meta
        episodes = sample_episodes(pool, 1, ways, m.shots, m.queries, gen)
        return ((gather(pool.images, episodes.support[0]), way_labels(ways, m.shots).to(self.device)),
                (gather(pool.images, episodes.query[0]), way_labels(ways, m.queries).to(self.device)))


def meta_train(ctx: Context, ways: int, noise: Noise | None, name: str) -> Params:
    """Distributed MAML from the run's initialisation: each outer step averages what
    ``meta.meta_batch`` task learners share (under ``noise``) and takes an Adam step."""
    cfg = ctx.cfg
    model = build_model(cfg.model, ctx.train.image_shape, ways)
    params = {k: v.to(ctx.device) for k, v in model.init(stream(cfg.seed, "init", ways)).items()}
    state = AdamState.zeros(list(params.values()))
    gen = stream(cfg.seed, "mia-train", name)
    iterations = cfg.meta.iterations
    for it in tqdm(range(iterations), desc=f"meta-training {name}", unit="it", leave=False):
        learner = ctx.learner(ways, params)
        grads = [shared_gradient(learner, *ctx.task(ctx.train, ways, gen), noise, gen) for _ in range(cfg.meta.meta_batch)]
        mean = [torch.stack([g[k] for g in grads]).mean(0) for k in params]
        with torch.no_grad():
            adam_step_(list(params.values()), mean, state, lr=outer_rate(cfg.meta, it / iterations), beta1=0.9, beta2=0.999)
    runtime.check_finite(params, f"meta-training {name}")
    return params


def evaluate(ctx: Context, ways: int, params: Params) -> Accuracy:
    """Meta-test accuracy with clean adaptation (the same episodes for every model of ``ways``)."""
    cfg = ctx.cfg
    meta = cfg.meta.model_copy(update={"ways": ways})
    learner = Maml(build_model(cfg.model, ctx.train.image_shape, ways), meta)
    return meta_test(learner, params, ctx.test, cfg.eval.model_copy(update={"ways": ways}), shots=cfg.eval.shots[0],
                     episodes=cfg.eval.episodes, lr=cfg.eval.lr or cfg.meta.inner_lr, gen=stream(cfg.seed, "mia-eval", ways))


def model_for(ctx: Context, point: Point) -> tuple[Params, Accuracy]:
    """The point's model and its meta-test accuracy, trained on first use."""
    if point.model_key not in ctx.models:
        params = meta_train(ctx, point.ways, point.noise, point.model_key)
        ctx.models[point.model_key] = (params, evaluate(ctx, point.ways, params))
    return ctx.models[point.model_key]


def observe(ctx: Context, learner: MetaGradient, trial: Trial, point: Point, gen: torch.Generator) -> Params:
    """What the server receives: the mean shared gradient of the attacked task and k - 1 others."""
    grads = [shared_gradient(learner, trial.support, trial.query, point.noise, gen)]
    grads += [shared_gradient(learner, *ctx.task(ctx.test, point.ways, gen), point.noise, gen) for _ in range(point.k - 1)]
    return {k: torch.stack([g[k] for g in grads]).mean(0) for k in grads[0]}


def shadow_mean(ctx: Context, learner: MetaGradient, point: Point) -> Params | None:
    """The server's estimate of another task's gradient: the mean over tasks of its own data."""
    if point.k == 1:
        return None
    gen = stream(ctx.cfg.seed, "mia-shadow", point.key)
    grads = [learner(*ctx.task(ctx.train, point.ways, gen)) for _ in range(ctx.cfg.mia.shadow_tasks)]
    return {k: torch.stack([g[k] for g in grads]).mean(0) for k in grads[0]}


@dataclass
class PointResult:
    scores: dict[tuple[str, str, str], list[float]]  # (target, candidate kind, score) -> per trial
    images: dict[str, list[Tensor]]  # "target.kind.start|end", "target.true" -> per kept trial


def attack(ctx: Context, point: Point, params: Params, trials: int, iterations: int, keep: int) -> PointResult:
    """Attack ``trials`` tasks; keep the images of the first ``keep``."""
    mia = ctx.cfg.mia
    learner = ctx.learner(point.ways, params)
    others = shadow_mean(ctx, learner, point)
    result = PointResult({}, {})
    for t in tqdm(range(trials), desc=f"attacking {point.key}", unit="task", leave=False):
        trial = draw_trial(ctx.cfg, ctx.test, point.ways, stream(ctx.cfg.seed, "mia-trial", point.ways, t))
        observed = observe(ctx, learner, trial, point, stream(ctx.cfg.seed, "mia-client", point.key, t))
        for target in mia.targets:
            predict = expected_observation(learner, trial.support, trial.query, target, trial.slots[target],
                                           k=point.k, others=others)
            if t < keep:
                result.images.setdefault(f"{target}.true", []).append(trial.candidates[target]["member"])
            for kind in ("member", *mia.nonmembers):
                prior = trial.candidates[target][kind]
                scores = zero_scores(predict, observed, prior)
                if iterations:
                    inversion = invert(predict, observed, prior, iterations=iterations, lr=mia.lr,
                                       distance=mia.distance, tv=mia.tv, signed=mia.signed)
                    scores |= inversion_scores(inversion, ctx.classify)
                    if t < keep:
                        result.images.setdefault(f"{target}.{kind}.start", []).append(inversion.start)
                        result.images.setdefault(f"{target}.{kind}.end", []).append(inversion.end)
                for name, value in scores.items():
                    result.scores.setdefault((target, kind, name), []).append(value)
    return result


def records(point: Point, result: PointResult, accuracy: Accuracy, cfg: Config, trials: int, iterations: int) -> list[dict]:
    """One metrics line per target, non-member kind and score."""
    lines = []
    names = ZERO_SCORES + (INVERSION_SCORES if iterations else ())
    for target in cfg.mia.targets:
        for kind in cfg.mia.nonmembers:
            for name in names:
                members = torch.tensor(result.scores[(target, "member", name)], dtype=torch.float64)
                nonmembers = torch.tensor(result.scores[(target, kind, name)], dtype=torch.float64)
                lines.append({
                    **point.fields(), "target": target, "nonmember": kind, "score": name,
                    "shots": cfg.meta.shots, "queries": cfg.meta.queries, "trials": trials, "iterations": iterations,
                    "attack_accuracy": round(attack_accuracy(members, nonmembers, 0.5 if name == "class" else None), 6),
                    "attack_auc": round(roc_auc(members, nonmembers), 6),
                    "tpr_at_1pct_fpr": round(tpr_at_fpr(members, nonmembers, 0.01), 6),
                    "member_mean": round(float(members.mean()), 6), "nonmember_mean": round(float(nonmembers.mean()), 6),
                    **accuracy_fields("meta_test_accuracy", accuracy),
                })
    return lines


def log_line(point: Point, lines: list[dict], clock: float) -> str:
    """``[stage ...] target/non-member: AUC per score | meta-test accuracy | elapsed``."""
    where = " ".join(f"{k} {v}" for k, v in point.fields().items())
    groups: dict[str, list[str]] = {}
    for r in lines:
        groups.setdefault(f"{r['target']}/{r['nonmember']}", []).append(f"{r['score']} {r['attack_auc']:.2f}")
    parts = [f"{g}: AUC " + " ".join(v) for g, v in groups.items()]
    acc = lines[0]
    return (f"[{where}] " + " | ".join(parts) + f" | meta_test_accuracy {100 * acc['meta_test_accuracy']:.2f}%"
            f" ±{100 * acc['meta_test_accuracy_ci95']:.2f} | {format_duration(time.perf_counter() - clock)}")


def reference_classifier(ctx: Context) -> tuple[Callable[[Tensor], Tensor], float]:
    """The server's classifier for the class rule, and its accuracy on 2000 test images."""
    train, test = ctx.train, ctx.test
    height, _, channels = train.image_shape
    model = SmallConv(channels, height, train.num_classes, 32)
    params = fit_classifier(model, train, steps=ctx.cfg.mia.classifier_steps, batch=CLASSIFIER_BATCH, lr=1e-3,
                            gen=stream(ctx.cfg.seed, "mia-classifier"))

    def classify(x: Tensor) -> Tensor:
        with torch.no_grad():
            return model(params, x).argmax(-1)

    pick = torch.randperm(sum(test.counts.tolist()), generator=stream(ctx.cfg.seed, "mia-classifier-test"))[:2000]
    rows = torch.cat([test.rows_of(c) for c in range(test.num_classes)])
    labels = torch.arange(test.num_classes).repeat_interleave(test.counts)
    accuracy = float((classify(gather(test.images, rows[pick])).cpu() == labels[pick]).float().mean())
    return classify, accuracy


def run(cfg: Config, out: RunDir, engine: Any = None) -> dict[str, Any]:
    device = runtime.setup(cfg.runtime)
    session = Session(out, [])
    splits = load_meta_splits(cfg.data, cfg.seed)
    ctx = Context(cfg, splits.train.to(device), splits.test.to(device), device)
    mia = cfg.mia
    classifier_accuracy = None
    if mia.iterations or mia.sweep_iterations:
        ctx.classify, classifier_accuracy = reference_classifier(ctx)
    points = plan(cfg)
    clean_key = Point("main", cfg.meta.ways).model_key
    if (resumed := session.resumed()) is not None:  # the undefended model: the later stages attack it again
        ctx.models[clean_key] = (resumed.group("clean.", device), Accuracy(*resumed.state["accuracy"]))
    for index in session.steps(resumed.step if resumed else 0, len(points), desc="points", unit="point"):
        point = points[index]
        params, accuracy = model_for(ctx, point)
        main = point.stage == "main"
        trials, iterations = (mia.trials, mia.iterations) if main else (mia.sweep_trials, mia.sweep_iterations)
        result = attack(ctx, point, params, trials, iterations, mia.reconstructions if main and iterations else 0)
        if result.images:
            out.save_weights({k: torch.stack(v) for k, v in result.images.items()}, RECONSTRUCTIONS)
        lines = records(point, result, accuracy, cfg, trials, iterations)
        for line in lines:
            session.log(line, quiet=True)
        tqdm.write(log_line(point, lines, session.clock))
        clean, clean_accuracy = ctx.models[clean_key]
        session.checkpoint({f"clean.{k}": v for k, v in clean.items()}, step=index + 1,
                           accuracy=[clean_accuracy.mean, clean_accuracy.ci95, clean_accuracy.episodes])
    clean, clean_accuracy = ctx.models[clean_key]
    out.save_weights(clean)
    return _summary(cfg, out.records(), clean_accuracy, classifier_accuracy) | session.summary()


def _summary(cfg: Config, lines: list[dict], clean: Accuracy, classifier_accuracy: float | None) -> dict[str, Any]:
    """The main attack's numbers, and per point the AUC of every score."""
    headline = {"target": cfg.mia.targets[0], "nonmember": cfg.mia.nonmembers[0],
                "score": "distance" if cfg.mia.iterations else "l0-cos"}
    top = next(r for r in lines if r["stage"] == "main" and all(r[k] == v for k, v in headline.items()))
    points: dict[str, dict[str, Any]] = {}
    for r in lines:
        name = f"{r['stage']} ways={r['ways']} defense={r['defense']} scale={r['scale']:g} k={r['k']}"
        entry = points.setdefault(name, {"meta_test_accuracy": r["meta_test_accuracy"], "attack_auc": {}})
        entry["attack_auc"][f"{r['target']}/{r['nonmember']}/{r['score']}"] = r["attack_auc"]
    return {
        "experiment": "membership",
        "headline": headline,
        **{k: top[k] for k in ("attack_accuracy", "attack_auc", "tpr_at_1pct_fpr")},
        **accuracy_fields("meta_test_accuracy", clean),
        "eval_mode": cfg.eval.mode, "eval_episodes": cfg.eval.episodes,
        "classifier_accuracy": classifier_accuracy,
        "points": points,
    }
