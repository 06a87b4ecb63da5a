"""Local defenses: what a benign user can do on its own with the attacked global model (registered).

A local defense is a function ``(cfg, case, attacked, user, at) -> {step: {metric: Accuracy}}``:
the four metrics of ``user``'s model after each number of steps in ``at`` (0: before any), scored
on the same evaluation episodes whatever the defense. Experiments 2 and 3 and the comparison's
local rows call them by name; add one with ``@LOCAL_DEFENSES.register("name")``.

- ``finetune`` (Experiment 2, Figs 5-6): the user fine-tunes the global model on each evaluation
  episode's support set, as at meta-test time, for ``t`` steps.
- ``matching`` (Experiment 3, Figs 7-8; paper Sec. 4): the user turns its trunk into a matching
  network (``fedmeta.defenses.matching``) and trains it on episodes of its own examples; a point
  scores the network as it is after that many steps, by attention over each episode's support
  set, with no per-episode fine-tuning.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from fedmeta.config import Backdoor as Config
from fedmeta.data.episodes import Episodes, sample_classes, sample_examples, way_labels
from fedmeta.defenses import matching
from fedmeta.experiments.backdoor import Case, always_included, backdoor_score, curves, eval_sets
from fedmeta.meta.evaluation import Accuracy, Classifier, query_accuracy, score_episodes
from fedmeta.models.conv4 import Params
from fedmeta.registry import LOCAL_DEFENSES
from fedmeta.rng import stream
from fedmeta.scenario.backdoor import EvalPool

Curves = dict[int, dict[str, Accuracy]]


@LOCAL_DEFENSES.register("finetune")
def finetune(cfg: Config, case: Case, attacked: Params, user: int, at: list[int]) -> Curves:
    """Fine-tuning alone (Experiment 2): the global model adapted on each episode's support set."""
    return curves(cfg, case, attacked, case.scenario.evaluation[user], at, cfg.finetune.episodes,
                  desc=f"case {case.name}, user {user}")


@LOCAL_DEFENSES.register("matching")
def defense_curves(cfg: Config, case: Case, attacked: Params, user: int, at: list[int]) -> Curves:
    """The matching-network defense (paper Sec. 4): delta-mixed trunk, gated cosine attention."""
    d, e = cfg.defense, cfg.eval
    ev = case.scenario.evaluation[user]
    images = case.scenario.images
    gen = stream(cfg.seed, "defense", case.name, user)
    weights = start_weights(cfg, case, attacked, gen)
    train = training_episodes(cfg, ev, max(at) * d.episodes, gen)
    sets = eval_sets(cfg, case, ev, cfg.finetune.episodes)
    classify = matching_classifier(cfg, case, way_labels(e.ways, e.shots[0]).to(images.device))
    meta = query_accuracy(case.learner, images, sets.test, e.transductive, classify)
    main = backdoor_score(case, ev, sets.tasks, classify)

    def scores(w: Params, t: int) -> dict[str, Accuracy]:
        where = f"case {case.name}, user {user}, step {t}"
        return {"meta_test_accuracy": score_episodes(w, images, sets.test, meta, f"meta-test, {where}")["accuracy"],
                **score_episodes(w, images, sets.tasks, main, f"backdoor tasks, {where}")}

    points = {0: scores(weights, 0)} if 0 in at else {}
    steps = matching.finetune(
        case.learner.model, weights, images,
        train.support.view(max(at), d.episodes, -1), train.query.view(max(at), d.episodes, -1),
        (way_labels(e.ways, d.shots).to(images.device), way_labels(e.ways, d.queries).to(images.device)),
        ways=e.ways, head_steps=d.head_steps, train_head=d.gates, lr=d.lr,
    )
    for t, w in enumerate(tqdm(steps, total=max(at), desc=f"defense, case {case.name}, user {user}", leave=False), start=1):
        if t in at:
            points[t] = scores(w, t)
    return points


def start_weights(cfg: Config, case: Case, attacked: Params, gen: torch.Generator) -> Params:
    """The delta-mixed trunk and a fresh head (gates open; scale 1 when gates and scales are off)."""
    d = cfg.defense
    model = case.learner.model
    head = matching.init_head(cfg.eval.ways, model.feature_dim, d.scale if d.gates else 1.0)
    device = next(iter(attacked.values())).device
    return {**matching.mix_with_glorot(attacked, d.mix, gen), **{k: v.to(device) for k, v in head.items()}}


def training_episodes(cfg: Config, ev: EvalPool, count: int, gen: torch.Generator) -> Episodes:
    """The user's own training episodes, drawn up front: its classes with the target always in
    (and a backdoor class in case c; without ``defense.always_target``, classes at random),
    examples only from below each class's evaluation split."""
    d = cfg.defense
    include = always_included(cfg, ev, count, gen) if d.always_target else None
    classes = sample_classes(ev.pool.num_classes, count, cfg.eval.ways, gen, include=include)
    return Episodes(sample_examples(ev.pool, classes, d.shots + d.queries, gen, hi=ev.split), classes, d.shots)


def matching_classifier(cfg: Config, case: Case, support_labels: torch.Tensor) -> Classifier:
    model, ways, transductive = case.learner.model, cfg.eval.ways, cfg.eval.transductive
    return lambda w, support, inputs: matching.log_probs(model, w, support, support_labels, inputs, ways, transductive).argmax(-1)
