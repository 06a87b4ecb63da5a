"""Membership inference on distributed MAML, by three servers, and the defenses against it (paper 001, SPEC section 3).

Distributed MAML: in every round ``meta.meta_batch`` task learners each adapt omega on the
support set of a task from the train split and share the meta-gradient of their query loss (under
a defense, if any); the server averages them and takes an Adam step. The attacked tasks, their
members and the non-member candidates all come from the test split, so omega carries no trace of
any of them.

**Rounds go through the federation's server.** A task learner is a federation client
(``TaskClient``: global weights in, ``ClientUpdate`` out, its randomness from a stream named by
seed, phase, user and round), and every round, of meta-training and of the attack, is one round of
``fedmeta.federation.server.Server``: the seeded schedule and arrival order, the screening of
non-finite updates and FedAvg with equal weights, i.e. the mean of the shared gradients. Under
secure aggregation the server sees exactly that mean of the ``M`` participants' updates, computed by
the same client code. The experiment does not build its federation with
``fedmeta.scenario.builder``: the builder's clients share the displacement of several local Adam
steps (FedAvg-style), while paper 001's task learners share one task's meta-gradient per round
(FedSGD-style), which is what the attacks invert; a builder client would turn the attacked
quantity into a sign-like Adam step. For the same reason ``--engine flower`` is refused.

**Threat models** (``mia.threats``), each a point of its own and named in every metrics line:

- ``informed``: knows omega, the protocol and every example of the attacked task but the slot
  (Balle et al.'s informed adversary): an **upper bound** on leakage (``upper_bound = true``).
  Without a defense a member reproduces the shared gradient exactly.
- ``realistic``: an honest-but-curious server that knows omega, the protocol (its defense
  included, not the noise drawn), the candidate (x*, y*) and public data of the same
  distribution (the train split). What it does not know of the task it fills with public examples
  (the candidate's class in the candidate's way, when public data has that class).
- ``secagg``: the realistic server under secure aggregation: it sees only the mean of the round's
  ``M`` updates (``mia.users_per_round``), the attacked user's and ``M - 1`` others'.

Attacks (``mia.attacks``): the paper's gradient inversion with its scores
(``fedmeta.attacks.membership``), the threshold baseline and LiRA (``fedmeta.attacks.mia_scores``;
LiRA's shadows use the point's defense and ``M``; scored with per-candidate variances, ``lira``,
and with variances pooled over the point's candidates, ``lira-global``), and the realistic server's joint inversion of
the rest of the task (``fedmeta.attacks.task_inversion``; the first ``mia.joint.trials`` tasks of
each realistic point). Metrics with bootstrap intervals:
``fedmeta.attacks.mia_metrics``.

Stages of the run, each a list of points (a model meta-trained once per defense and number of
ways, attacked on its own trials):

- ``threat``: the undefended model, one point per threat model (and per ``M`` for ``secagg``),
  ``mia.trials`` tasks, ``mia.iterations`` inversion steps; the first point keeps the images of
  its first ``mia.reconstructions`` trials (``reconstructions.safetensors``);
- ``defense``: for each server of ``mia.sweep_threats``, the undefended model (unless
  ``mia.sweep_undefended`` is false), then one model meta-trained and attacked under each noise
  defense and scale and each DP-SGD noise multiplier;
- ``ways``: an undefended model per number of ways, for the same servers.

Each task is attacked at one support slot and one query slot (the same observation), with the
true example (member) and each kind of non-member as the candidate. ``metrics.jsonl`` gets one
line per point, target, non-member kind and score. The run checkpoints after each point, and
within a point saves the tasks done every 2 minutes (``TaskJournal``): a killed run goes on from there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm import tqdm

from fedmeta import runtime
from fedmeta.attacks.membership import (
    Target,
    expected_observation,
    fit_classifier,
    inversion_scores,
    invert,
    place,
    zero_scores,
)
from fedmeta.attacks.mia_metrics import summarize
from fedmeta.attacks.mia_scores import lira_statistic, pooled_variances, ratio, shadow_fit, threshold_scores
from fedmeta.attacks.task_inversion import Task, joint_residual, matched_fill
from fedmeta.config import Base as Config
from fedmeta.config.sections import MiaConfig
from fedmeta.data.datasets import load_meta_splits
from fedmeta.data.episodes import gather, sample_episodes, way_labels
from fedmeta.data.pool import ClassPool
from fedmeta.defenses.dp import DpSgd, epsilon, private_gradient
from fedmeta.defenses.noise import DEFENSES, Noise, shared_gradient
from fedmeta.federation.aggregation import make_rule
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.journal import SAVE_EVERY, read_save
from fedmeta.federation.schedule import Schedule
from fedmeta.federation.server import Server
from fedmeta.federation.updates import ClientUpdate
from fedmeta.meta.adam import AdamState, adam_step_
from fedmeta.meta.evaluation import Accuracy, meta_test
from fedmeta.meta.learner import Maml, outer_rate
from fedmeta.meta.maml import MetaGradient, task_meta_gradient
from fedmeta.models.build import build_model
from fedmeta.models.conv4 import Params
from fedmeta.models.protocol import Model
from fedmeta.models.smallconv import SmallConv
from fedmeta.rng import stream, stream_seed
from fedmeta.runs import RunDir, Session, accuracy_fields, format_duration
from fedmeta.storage import write_tensors

Stage = Literal["threat", "defense", "ways"]
Threat = Literal["informed", "realistic", "secagg"]
Defense = Noise | DpSgd | None
RECONSTRUCTIONS = "reconstructions.safetensors"
CLASSIFIER_BATCH = 128
ATTACK_OF = {"l0-cos": "inversion", "l0-l2": "inversion", "lt": "inversion", "distance": "inversion",
             "class": "inversion", "loss": "threshold", "grad-norm": "threshold", "alignment": "threshold",
             "lira": "lira", "lira-global": "lira", "joint": "joint", "joint-cal": "joint"}
"""The attack each score belongs to (``mia.attacks`` selects attacks)."""


def defense_name(defense: Defense) -> str:
    return "none" if defense is None else f"{defense.kind}-{defense.scale:g}"


@dataclass(frozen=True)
class Point:
    stage: Stage
    threat: Threat
    ways: int
    defense: Defense = None
    users: int = 1  # M: updates the server sees summed (1 but under secagg)

    @property
    def key(self) -> str:
        """Names the point's random streams."""
        return f"{self.stage}/{self.threat}/ways-{self.ways}/{defense_name(self.defense)}/users-{self.users}"

    @property
    def model_key(self) -> str:
        return f"ways-{self.ways}/{defense_name(self.defense)}"

    def fields(self) -> dict[str, Any]:
        d = self.defense
        return {"stage": self.stage, "threat": self.threat, "upper_bound": self.threat == "informed",
                "ways": self.ways, "users": self.users, "defense": d.kind if d else "none",
                "scale": d.scale if d else 0.0}


def sweep_defenses(cfg: Config) -> list[Defense]:
    """Every defended model of the sweep: the noise defenses by scale, then DP-SGD by sigma."""
    scales, dp = cfg.mia.defenses.model_dump(), cfg.mia.dp
    return ([Noise(kind, s) for kind in DEFENSES for s in scales[kind]]
            + [DpSgd(sigma, dp.clip, dp.unit) for sigma in dp.noise_multipliers])


def plan(cfg: Config) -> list[Point]:
    """Every point of the run, in order (see the module docstring)."""
    mia, ways = cfg.mia, cfg.meta.ways
    points = [Point("threat", threat, ways, None, users) for threat in mia.threats
              for users in (mia.users_per_round if threat == "secagg" else [1])]
    defended = sweep_defenses(cfg)
    for threat in mia.sweep_threats:
        users = mia.users_per_round[0] if threat == "secagg" else 1
        if defended:
            undefended = [None] if mia.sweep_undefended else []
            points += [Point("defense", threat, ways, d, users) for d in [*undefended, *defended]]
        points += [Point("ways", threat, n, None, users) for n in mia.ways]
    return points


def shared(learner: MetaGradient, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor], defense: Defense,
           gen: torch.Generator) -> Params:
    """What a task learner shares for one task under ``defense``."""
    if isinstance(defense, DpSgd):
        return private_gradient(learner, support, query, defense, gen)
    return shared_gradient(learner, support, query, defense, gen)


@dataclass(frozen=True)
class TaskClient:
    """A task learner of distributed MAML as a federation client (``fedmeta.federation.server.Client``):
    its update is the shared gradient of its task of the round."""

    user: int
    learner: Callable[[Params], MetaGradient]  # global weights -> the task learner at them
    task: Callable[[int, int], Task]  # (user, round) -> its task
    defense: Defense
    seed: int

    def update(self, global_params: Params, settings: RoundSettings) -> ClientUpdate:
        support, query = self.task(self.user, settings.round)
        gen = stream(self.seed, "mia-client", settings.phase, self.user, settings.round)
        g = shared(self.learner(global_params), support, query, self.defense, gen)
        return ClientUpdate(self.user, g, len(support[1]) + len(query[1]))


def round_mean(clients: list[TaskClient], params: Params, round_: int, phase: str, seed: int) -> Params:
    """One round of the federation's ``Server`` with every client taking part (equal-weight FedAvg):
    the mean of the finite updates, which is all a server under secure aggregation sees."""
    users = len(clients)
    server = Server({c.user: c for c in clients}, Schedule(users, users, seed), make_rule("fedavg"), users)
    settings = RoundSettings(round_, phase)
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    mean, _ = server.aggregate(zeros, server.updates(params, settings), settings)
    return mean


@dataclass(frozen=True)
class Trial:
    """One attacked task and its candidates, with each candidate's class in the test pool."""

    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]
    slots: dict[Target, int]
    candidates: dict[Target, dict[str, Tensor]]  # "member", "same-class", "other-class" -> image
    classes: dict[Target, dict[str, int]]  # the same keys -> class id in the test pool

    def label(self, target: Target) -> int:
        """y*: the task label of the attacked slot (every candidate is asked about this slot)."""
        return int((self.support if target == "support" else self.query)[1][self.slots[target]])


def draw_trial(cfg: Config, pool: ClassPool, ways: int, gen: torch.Generator) -> Trial:
    """A task of ``ways`` classes of ``pool`` with one slot per target and its candidates.

    Every dataset class gets one spare image outside the task; the same-class non-member is the
    spare of the slot's class, the other-class one the spare of another dataset class (in the task
    or not: "any other class", so it exists for every number of ways).
    """
    m = cfg.meta
    episode = sample_episodes(pool, 1, pool.num_classes, m.shots, m.queries + 1, gen)
    images = gather(pool.images, episode.rows[0])  # [classes (random order), shots + queries + 1, C, H, W]
    order = episode.classes[0].tolist()
    device = images.device
    support = (images[:ways, : m.shots].flatten(0, 1), way_labels(ways, m.shots).to(device))
    query = (images[:ways, m.shots : -1].flatten(0, 1), way_labels(ways, m.queries).to(device))
    spares = images[:, -1]
    slots: dict[Target, int] = {}
    candidates: dict[Target, dict[str, Tensor]] = {}
    classes: dict[Target, dict[str, int]] = {}
    for target, (x, y) in (("support", support), ("query", query)):
        slot = int(torch.randint(len(y), (), generator=gen))
        way = int(y[slot])
        other = (way + 1 + int(torch.randint(pool.num_classes - 1, (), generator=gen))) % pool.num_classes
        slots[target] = slot
        candidates[target] = {"member": x[slot], "same-class": spares[way], "other-class": spares[other]}
        classes[target] = {"member": order[way], "same-class": order[way], "other-class": order[other]}
    return Trial(support, query, slots, candidates, classes)


@dataclass
class Context:
    """What every point shares: the config, data, device and the models trained so far."""

    cfg: Config
    train: ClassPool  # meta-training data, and the public data of the realistic servers
    test: ClassPool
    device: torch.device
    classify: Callable[[Tensor], Tensor] | None = None  # images -> dataset classes (when some stage inverts)
    models: dict[str, tuple[Params, Accuracy]] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: Config) -> Context:
        """The run's context: the runtime set up, the config's splits on its device, no model yet."""
        device = runtime.setup(cfg.runtime)
        splits = load_meta_splits(cfg.data, cfg.seed)
        return cls(cfg, splits.train.to(device), splits.test.to(device), device)

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

    def public_task(self, ways: int, label: int, test_class: int, gen: torch.Generator) -> Task:
        """A task of public data whose way ``label`` is the class named like ``test_class`` when the
        public data has it (MNIST, Fashion-MNIST), else a random class."""
        m, name = self.cfg.meta, self.test.names[test_class]
        include = torch.tensor([self.train.names.index(name)]) if name in self.train.names else None
        episode = sample_episodes(self.train, 1, ways, m.shots, m.queries, gen, include=include)
        rows = episode.rows[0].clone()
        if include is not None:
            way = int((episode.classes[0] == include[0]).nonzero()[0])
            rows[[way, label]] = rows[[label, way]]
        images = gather(self.train.images, rows)  # [ways, shots + queries, C, H, W]
        return ((images[:, : m.shots].flatten(0, 1), way_labels(ways, m.shots).to(self.device)),
                (images[:, m.shots :].flatten(0, 1), way_labels(ways, m.queries).to(self.device)))


def slot_of(task: Task, target: Target, label: int) -> int:
    """The first slot of ``target`` with task label ``label``."""
    labels = (task[0] if target == "support" else task[1])[1]
    return int((labels == label).nonzero()[0])


def meta_train(ctx: Context, ways: int, defense: Defense, name: str) -> Params:
    """Distributed MAML from the run's initialisation: each round averages what ``meta.meta_batch``
    task learners share (under ``defense``) and the server takes an Adam step."""
    cfg = ctx.cfg
    model = build_model(cfg.model, ctx.train.image_shape, ways)
    params = {k: v.to(ctx.device) for k, v in model.init(stream(cfg.seed, "init", ways)).items()}
    state = AdamState.zeros(list(params.values()))

    def task(user: int, round_: int) -> Task:
        return ctx.task(ctx.train, ways, stream(cfg.seed, "mia-train", name, user, round_))

    clients = [TaskClient(u, partial(ctx.learner, ways), task, defense, cfg.seed) for u in range(cfg.meta.meta_batch)]
    iterations = cfg.meta.iterations
    for it in tqdm(range(iterations), desc=f"meta-training {name}", unit="it", leave=False):
        mean = round_mean(clients, params, it, f"train/{name}", cfg.seed)
        with torch.no_grad():
            adam_step_(list(params.values()), [mean[k] for k in params], state,
                       lr=outer_rate(cfg.meta, it / iterations), beta1=0.9, beta2=0.999)
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
        params = meta_train(ctx, point.ways, point.defense, point.model_key)
        ctx.models[point.model_key] = (params, evaluate(ctx, point.ways, params))
    return ctx.models[point.model_key]


def observe(ctx: Context, point: Point, params: Params, trial: Trial, t: int) -> Params:
    """What the server receives in the attacked round: the mean of the updates of ``point.users``
    users, user 0 holding the attacked task and the others tasks of the test split."""

    def task(user: int, _round: int) -> Task:
        if user == 0:
            return trial.support, trial.query
        return ctx.task(ctx.test, point.ways, stream(ctx.cfg.seed, "mia-other", point.key, t, user))

    clients = [TaskClient(u, partial(ctx.learner, point.ways), task, point.defense, ctx.cfg.seed)
               for u in range(point.users)]
    return round_mean(clients, params, t, point.key, ctx.cfg.seed)


@dataclass(frozen=True)
class Adversary:
    """What the attacking server holds at one point, beyond the observation."""

    point: Point
    params: Params  # omega, which it sent
    learner: MetaGradient  # the protocol's task learner at omega
    model: Model
    others: Params | None  # its estimate of the mean of another user's gradient (inversion, M > 1)
    shadow_others: list[Params]  # per LiRA shadow: the sum of M - 1 simulated public updates
    out_cache: dict[tuple[int, int], list[Params]] = field(default_factory=dict)  # see ``out_shadows``
    joint_starts: dict[tuple[int, str, int], tuple[Task, float]] = field(default_factory=dict)  # see ``joint_scores``


def _sum(grads: list[Params], like: Params) -> Params:
    return {k: sum((g[k] for g in grads), torch.zeros_like(v)) for k, v in like.items()}


def adversary(ctx: Context, point: Point, params: Params) -> Adversary:
    """The server's simulations that do not depend on the trial (public data only)."""
    mia, seed = ctx.cfg.mia, ctx.cfg.seed
    learner = ctx.learner(point.ways, params)
    model = build_model(ctx.cfg.model, ctx.train.image_shape, point.ways)
    others = None
    if point.users > 1:
        gen = stream(seed, "mia-shadow", point.key)
        grads = [learner(*ctx.task(ctx.train, point.ways, gen)) for _ in range(mia.shadow_tasks)]
        others = {k: torch.stack([g[k] for g in grads]).mean(0) for k in grads[0]}
    shadows = mia.lira.shadows if "lira" in mia.attacks and point.threat != "informed" else 0
    gen = stream(seed, "mia-lira-others", point.key)
    shadow_others = [_sum([shared(learner, *ctx.task(ctx.train, point.ways, gen), point.defense, gen)
                           for _ in range(point.users - 1)], params) for _ in range(shadows)]
    return Adversary(point, params, learner, model, others, shadow_others)


def out_shadows(ctx: Context, server: Adversary, y: int, test_class: int) -> list[Params]:
    """The observations of the OUT shadow tasks for candidates of ``test_class`` at label ``y``:
    public tasks with that class at way ``y``, drawn once per point and shared by every candidate."""
    point = server.point
    if (test_class, y) not in server.out_cache:
        gen = stream(ctx.cfg.seed, "mia-lira-out", point.key, test_class, y)
        observations = []
        for others in server.shadow_others:
            g = shared(server.learner, *ctx.public_task(point.ways, y, test_class, gen), point.defense, gen)
            observations.append({k: (g[k] + others[k]) / point.users for k in g})
        server.out_cache[(test_class, y)] = observations
    return server.out_cache[(test_class, y)]


def lira(ctx: Context, server: Adversary, x: Tensor, y: int, test_class: int, target: Target,
         observed: dict[str, float], gen: torch.Generator) -> dict[str, float]:
    """LiRA's fit for candidate (``x``, ``y``) (``shadow_fit``): shadow tasks of public data, observed
    as the real round would be, with the candidate in the attacked slot (IN, online only) and
    without (OUT)."""
    point, step, lira_cfg = server.point, ctx.cfg.meta.inner_lr, ctx.cfg.mia.lira

    def statistic(observation: Params) -> float:
        return lira_statistic(threshold_scores(server.model, server.params, observation, x, y, step), lira_cfg.statistic)

    outs = [statistic(o) for o in out_shadows(ctx, server, y, test_class)]
    ins = []
    for others in server.shadow_others if lira_cfg.online else []:
        task = ctx.public_task(point.ways, y, test_class, gen)
        g = shared(server.learner, *place(*task, target, slot_of(task, target, y), x), point.defense, gen)
        ins.append(statistic({k: (g[k] + others[k]) / point.users for k in g}))
    return shadow_fit(lira_statistic(observed, lira_cfg.statistic), ins, outs)


@dataclass
class PointResult:
    scores: dict[tuple[str, str, str], list[float]]  # (target, candidate kind, score) -> per trial
    images: dict[str, list[Tensor]]  # "target.kind.start|end", "target.true" -> per kept trial


def joint_scores(ctx: Context, server: Adversary, fill: Task, target: Target, slot: int, x: Tensor,
                 observed: Params, key: tuple[int, str, int]) -> dict[str, float]:
    """The joint inversion's scores for candidate ``x`` in ``slot`` of ``fill``. The start (``fill``,
    or its images matched to the observation) and the reference's residual (the fill's own image
    in the slot) are computed once per ``key`` = (trial, target, class) and shared by the
    candidates of that class, whose public fills are the same draw."""
    joint = ctx.cfg.mia.joint
    if key not in server.joint_starts:
        if joint.fill == "matched":
            fill = matched(ctx, server, fill, target, slot, observed, key)
        reference = (fill[0] if target == "support" else fill[1])[0][slot]
        server.joint_starts[key] = fill, joint_residual(server.learner, fill, target, slot, reference, observed,
                                                        joint.iterations, joint.lr)
    start, reference_loss = server.joint_starts[key]
    loss = joint_residual(server.learner, start, target, slot, x, observed, joint.iterations, joint.lr)
    return {"joint": -loss, "joint-cal": reference_loss - loss}


def matched(ctx: Context, server: Adversary, fill: Task, target: Target, slot: int, observed: Params,
            key: tuple[int, str, int]) -> Task:
    """``matched_fill`` on the public data, with a stream of its own (the candidates' streams stay
    common random numbers for the other attacks)."""
    public, test_class = ctx.train, key[2]
    name = ctx.test.names[test_class]
    gen = stream(ctx.cfg.seed, "mia-joint-fill", server.point.key, *key)

    def draw(c: int, n: int) -> Tensor:
        rows = public.rows_of(c)
        return gather(public.images, rows[torch.randint(len(rows), (n,), generator=gen).to(rows.device)])

    own = public.names.index(name) if name in public.names else None
    return matched_fill(server.learner, fill, target, slot, observed, range(public.num_classes), own, draw,
                        ctx.cfg.mia.joint.pool, gen)


def score_candidate(ctx: Context, server: Adversary, trial: Trial, t: int, target: Target, kind: str,
                    observed: Params, gen: torch.Generator, iterations: int, result: PointResult, keep: bool
                    ) -> dict[str, float]:
    """Every selected attack's scores for candidate ``kind`` of trial ``t``."""
    mia, point = ctx.cfg.mia, server.point
    x, y, test_class = trial.candidates[target][kind], trial.label(target), trial.classes[target][kind]
    scores: dict[str, float] = {}
    joint = "joint" in mia.attacks and point.threat == "realistic" and t < mia.joint.trials
    task, slot = (trial.support, trial.query), trial.slots[target]
    if point.threat != "informed" and ("inversion" in mia.attacks or joint):
        task = ctx.public_task(point.ways, y, test_class, gen)  # the public fill of the unknown slots
        slot = slot_of(task, target, y)
    if joint:
        scores |= joint_scores(ctx, server, task, target, slot, x, observed, (t, target, test_class))
    if "inversion" in mia.attacks:
        predict = expected_observation(server.learner, *task, target, slot, k=point.users, others=server.others)
        scores |= zero_scores(predict, observed, x)
        if iterations:
            inversion = invert(predict, observed, x, iterations=iterations, lr=mia.lr, distance=mia.distance,
                               tv=mia.tv, signed=mia.signed)
            scores |= inversion_scores(inversion, ctx.classify)
            if keep:
                result.images.setdefault(f"{target}.{kind}.start", []).append(inversion.start)
                result.images.setdefault(f"{target}.{kind}.end", []).append(inversion.end)
    baseline = threshold_scores(server.model, server.params, observed, x, y, ctx.cfg.meta.inner_lr)
    if "threshold" in mia.attacks:
        scores |= baseline
    if server.shadow_others:
        fit = lira(ctx, server, x, y, test_class, target, baseline, gen)
        scores |= {"lira": ratio(fit)} | {f"{LIRA_FIT}{k}": v for k, v in fit.items()}
    return scores


LIRA_FIT = "lira:"
"""Prefix of the scores that hold a candidate's LiRA fit (``shadow_fit``), kept for ``lira-global``."""


def add_global_lira(scores: dict[tuple[str, str, str], list[float]]) -> None:
    """Add ``lira-global``: each candidate's LiRA score with each side's variance pooled over every
    candidate of the point and target (``pooled_variances``): the member and every kind of
    non-member of ``mia.nonmembers``, so the pooled variance, and each AUC, depends on which kinds
    are scored. It needs the whole point's fits, so it is computed once the tasks are done, from
    the fits the journal keeps."""
    fits: dict[tuple[str, str], list[dict[str, float]]] = {}
    for (target, kind, name), values in scores.items():
        if name.startswith(LIRA_FIT):
            rows = fits.setdefault((target, kind), [{} for _ in values])
            for row, value in zip(rows, values, strict=True):
                row[name.removeprefix(LIRA_FIT)] = value
    for target in {t for t, _ in fits}:
        pooled = pooled_variances([f for (t, _), rows in fits.items() if t == target for f in rows])
        for (t, kind), rows in fits.items():
            if t == target:
                scores[(target, kind, "lira-global")] = [ratio(f, **pooled) for f in rows]


def attack(ctx: Context, point: Point, params: Params, trials: int, iterations: int, keep: int,
           journal: Path | None = None) -> PointResult:
    """Attack ``trials`` tasks; keep the images of the first ``keep``. With a ``journal`` file, the
    scores so far are saved as the tasks go and a rerun goes on from there (``TaskJournal``)."""
    mia, seed = ctx.cfg.mia, ctx.cfg.seed
    server = adversary(ctx, point, params)
    saves = TaskJournal(journal, {"point": point.key, "trials": trials, "iterations": iterations, "keep": keep,
                                  "format": 2})  # 2: LiRA's fits kept (lira-global); a save without them starts again
    done, result = saves.resume()
    for t in tqdm(range(done, trials), desc=f"attacking {point.key}", unit="task", leave=False, initial=done,
                  total=trials):
        trial = draw_trial(ctx.cfg, ctx.test, point.ways, stream(seed, "mia-trial", point.ways, t))
        observed = observe(ctx, point, params, trial, t)
        for target in mia.targets:
            if t < keep:
                result.images.setdefault(f"{target}.true", []).append(trial.candidates[target]["member"])
            for kind in ("member", *mia.nonmembers):
                # One stream per trial and target, the same for every candidate: the public fill of
                # the unknown slots and LiRA's shadow tasks are common random numbers, so a member and
                # its non-members differ only by the candidate (a fill per candidate added its noise
                # to every score: realistic AUCs spread ±0.15 around 0.5 at 24 trials).
                gen = stream(seed, "mia-server", point.key, t, target)
                scores = score_candidate(ctx, server, trial, t, target, kind, observed, gen, iterations, result,
                                         t < keep)
                check_scores(scores, point, t, kind, observed)
                for name, value in scores.items():
                    result.scores.setdefault((target, kind, name), []).append(value)
        saves.save(t + 1, result)
    add_global_lira(result.scores)
    return result


def check_scores(scores: dict[str, float], point: Point, t: int, kind: str, observed: Params) -> None:
    """Raise ``Diverged`` at the first task whose scores are not all finite, instead of attacking
    the rest of the point and failing in the ROC computation at its end. A noise defense at a large
    scale can make the attacked user's own adaptation diverge: the update it shares is then finite
    but astronomically large (inner-loop noise at 30 x RMS sent updates of 1e23), and every score
    computed from it overflows."""
    bad = [name for name, value in scores.items() if not math.isfinite(value)]
    if bad:
        peak = max(float(v.abs().max()) for v in observed.values())
        cause = (f"; under defense {defense_name(point.defense)} the attacked user's update diverges: lower its scale"
                 if point.defense is not None else "")
        raise runtime.Diverged(f"attacking {point.key}, task {t}: the {kind} candidate's scores {', '.join(bad)} are "
                               f"not finite (the observed update's largest coordinate is {peak:.3g}){cause}")


@dataclass
class TaskJournal:
    """A point's attack, task by task, on disk: a point attacks tens to hundreds of tasks (the
    joint inversion, about a minute each on a CPU thread), and the run checkpoints between
    points, so a kill would lose them all. The tasks done are saved when ``SAVE_EVERY`` seconds
    have passed since the last save (a kill loses at most that, and fast points write little).
    Every task draws from streams of its own (trial, target, candidate) and the server's caches
    are filled from fixed streams, so tasks resumed from a save give the scores of a run never
    killed. A save of another point or length, or a damaged one, is named and the point starts
    again."""

    path: Path | None
    what: dict[str, Any]  # the point, its task count, inversion steps and kept reconstructions
    last: float = field(default_factory=time.monotonic)

    def resume(self) -> tuple[int, PointResult]:
        """The tasks done and their scores and images (none without a save to go on from)."""
        found = None if self.path is None else read_save(self.path, "attacking the point's tasks again", "what",
                                                         self.what)
        result = PointResult({}, {})
        if found is None:
            return 0, result
        tensors, meta = found
        for name, values in tensors.items():
            kind, _, rest = name.partition("|")
            if kind == "scores":
                result.scores[tuple(rest.split("|"))] = values.tolist()
            else:
                result.images[rest] = list(values.unbind(0))
        tqdm.write(f"resuming the attack at task {meta['done']} of {self.what['trials']} from {self.path}")
        return meta["done"], result

    def save(self, done: int, result: PointResult) -> None:
        """Save the scores and images of the first ``done`` tasks, if ``SAVE_EVERY`` seconds passed
        (after the last task: nothing, the point is logged)."""
        if self.path is None or done >= self.what["trials"] or time.monotonic() - self.last < SAVE_EVERY:
            return
        tensors = {"scores|" + "|".join(key): torch.tensor(values, dtype=torch.float64)
                   for key, values in result.scores.items()}
        tensors |= {f"images|{key}": torch.stack(images) for key, images in result.images.items()}
        write_tensors(self.path, tensors, {"what": self.what, "done": done})
        self.last = time.monotonic()


def inversion_steps(mia: MiaConfig, point: Point, iterations: int) -> int:
    """The inversion steps ``point`` runs: ``iterations`` where its server is in ``mia.invert_threats``
    and the inversion is among ``mia.attacks``; 0 elsewhere (the zero-iteration scores)."""
    return iterations if "inversion" in mia.attacks and point.threat in mia.invert_threats else 0


def records(point: Point, result: PointResult, accuracy: Accuracy, cfg: Config, iterations: int) -> list[dict]:
    """One metrics line per target, non-member kind and score, each metric with its 95% interval;
    ``iterations``: the inversion steps the point ran (``inversion_steps``)."""
    lines = []
    dp = cfg.mia.dp
    privacy = {}
    if isinstance(point.defense, DpSgd):  # add/remove one clipped term, and replace one (dp.py's docstring)
        privacy = {name: round(epsilon(point.defense.noise_multiplier, releases=dp.releases, delta=dp.delta,
                                       sensitivity=factor), 6)
                   for name, factor in (("epsilon", 1.0), ("epsilon_substitution", 2.0))}
        privacy |= {"delta": dp.delta, "clip": dp.clip, "unit": dp.unit}
    names = [n for n in ATTACK_OF if (cfg.mia.targets[0], "member", n) in result.scores]
    for target in cfg.mia.targets:
        for kind in cfg.mia.nonmembers:
            for name in names:
                members, nonmembers = result.scores[(target, "member", name)], result.scores[(target, kind, name)]
                found = summarize(members, nonmembers, resamples=cfg.mia.bootstrap,
                                  seed=stream_seed(cfg.seed, "mia-bootstrap", point.key, target, kind, name))
                metrics = {}
                for metric, interval in found.items():
                    column = {"auc": "attack_auc", "balanced_accuracy": "attack_accuracy"}.get(metric, metric)
                    metrics |= {column: round(interval.value, 6), f"{column}_low": round(interval.low, 6),
                                f"{column}_high": round(interval.high, 6)}
                lines.append({
                    **point.fields(), **privacy, "target": target, "nonmember": kind, "attack": ATTACK_OF[name],
                    "score": name, "shots": cfg.meta.shots, "queries": cfg.meta.queries, "trials": len(members),
                    "iterations": cfg.mia.joint.iterations if ATTACK_OF[name] == "joint" else iterations, **metrics,
                    "member_mean": round(sum(members) / len(members), 6),
                    "nonmember_mean": round(sum(nonmembers) / len(nonmembers), 6),
                    **accuracy_fields("meta_test_accuracy", accuracy),
                })
    return lines


def not_scored(point: Point, accuracy: Accuracy, reason: str) -> dict[str, Any]:
    """The line of a point whose attack stopped with ``Diverged`` (a defense so strong that the
    attacked user's update overflows): its model's meta-test accuracy, and why it has no scores.
    The run goes on with its other points and exits with an error once its summary is written.
    Its ``score`` is ``not-scored``, so that a table can ask for it beside a score
    (``--where score=loss,not-scored``)."""
    return {**point.fields(), "score": NOT_SCORED, "not_scored": reason,
            **accuracy_fields("meta_test_accuracy", accuracy)}


NOT_SCORED = "not-scored"


def log_line(point: Point, lines: list[dict], clock: float) -> str:
    """``[point] target/non-member: AUC per score | meta-test accuracy | elapsed``, or ``[point]
    not scored: why`` (``not_scored``)."""
    where = " ".join(f"{k} {v}" for k, v in point.fields().items())
    if "not_scored" in lines[0]:
        return f"[{where}] not scored: {lines[0]['not_scored']}"
    groups: dict[str, list[str]] = {}
    for r in lines:
        groups.setdefault(f"{r['target']}/{r['nonmember']}", []).append(f"{r['score']} {r['attack_auc']:.2f}")
    parts = [f"{g}: AUC " + " ".join(v) for g, v in groups.items()]
    acc = lines[0]
    eps = (f" | epsilon {acc['epsilon']:.3g} (substituting an example: {acc['epsilon_substitution']:.3g})"
           if "epsilon" in acc else "")
    return (f"[{where}] " + " | ".join(parts) + f" | meta_test_accuracy {100 * acc['meta_test_accuracy']:.2f}%"
            f" ±{100 * acc['meta_test_accuracy_ci95']:.2f}{eps} | {format_duration(time.perf_counter() - clock)}")
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
    ctx = Context.build(cfg)
    session = Session(out, [])
    mia = cfg.mia
    classifier_accuracy = None
    if "inversion" in mia.attacks and (mia.iterations or mia.sweep_iterations):
        ctx.classify, classifier_accuracy = reference_classifier(ctx)
    points = plan(cfg)
    undefended = Point("threat", "informed", cfg.meta.ways)
    if (resumed := session.resumed()) is not None:  # the undefended model: the later stages attack it again
        ctx.models[undefended.model_key] = (resumed.group("clean.", ctx.device), Accuracy(*resumed.state["accuracy"]))
    clean, clean_accuracy = model_for(ctx, undefended)  # trained here when no point attacks it (the summary's accuracy)
    for index in session.steps(resumed.step if resumed else 0, len(points), desc="points", unit="point"):
        point = points[index]
        params, accuracy = model_for(ctx, point)
        first_stage = point.stage == "threat"
        trials, iterations = (mia.trials, mia.iterations) if first_stage else (mia.sweep_trials, mia.sweep_iterations)
        iterations = inversion_steps(mia, point, iterations)
        keep = mia.reconstructions if index == 0 and iterations else 0
        journal = out.path / f"attack-point-{index}.partial.safetensors"  # the point's tasks so far
        try:
            result = attack(ctx, point, params, trials, iterations, keep, journal)
        except runtime.Diverged as err:  # the point's model and accuracy stand; its attack has no scores
            lines = [not_scored(point, accuracy, str(err))]
        else:
            if result.images:
                out.save_weights({k: torch.stack(v) for k, v in result.images.items()}, RECONSTRUCTIONS)
            lines = records(point, result, accuracy, cfg, iterations)
        for line in lines:
            session.log(line, quiet=True)
        tqdm.write(log_line(point, lines, session.clock))
        session.checkpoint({f"clean.{k}": v for k, v in clean.items()}, step=index + 1,
                           accuracy=[clean_accuracy.mean, clean_accuracy.ci95, clean_accuracy.episodes])
        journal.unlink(missing_ok=True)  # the point is logged and checkpointed
    out.save_weights(clean)
    return _summary(out.records(), clean_accuracy, classifier_accuracy) | session.summary()


PRIVACY = ("epsilon", "epsilon_substitution", "delta", "unit")
"""A DP point's guarantees (``_attack``'s lines) that the summary repeats per point."""


def _summary(lines: list[dict], clean: Accuracy, classifier_accuracy: float | None) -> dict[str, Any]:
    """Per point, the strongest score by AUC for each target (first non-member kind): its AUC and
    TPR at 1% FPR as [value, low, high], and a DP point's ε for adding or removing one clipped term
    (``epsilon``) and for substituting one example (``epsilon_substitution``, the membership game);
    every score is in ``metrics.jsonl``."""
    points: dict[str, dict[str, Any]] = {}
    scored = [r for r in lines if "not_scored" not in r]
    unscored = {_point_name(r): r["not_scored"] for r in lines if "not_scored" in r}
    nonmember = scored[0]["nonmember"] if scored else None
    for r in (r for r in scored if r["nonmember"] == nonmember):
        name = _point_name(r)
        entry = points.setdefault(name, {"meta_test_accuracy": r["meta_test_accuracy"],
                                         **{k: r[k] for k in PRIVACY if k in r}})
        best = entry.get(r["target"])
        if best is None or r["attack_auc"] > best["attack_auc"][0]:
            entry[r["target"]] = {"score": r["score"], **{m: [r[m], r[f"{m}_low"], r[f"{m}_high"]]
                                                          for m in ("attack_auc", "tpr_at_1pct_fpr")}}
    return {
        "experiment": "membership",
        "nonmember": nonmember,
        **accuracy_fields("meta_test_accuracy", clean),
        "classifier_accuracy": classifier_accuracy,
        "points": points,
        **({"not_scored": unscored} if unscored else {}),
    }


def _point_name(r: dict[str, Any]) -> str:
    return (f"{r['stage']} threat={r['threat']} users={r['users']} ways={r['ways']} "
            f"defense={r['defense']} scale={r['scale']:g}")
