"""Meta-test evaluation: fine-tune on each episode's support set, classify its queries.

Because BatchNorm uses batch statistics, *what shares a batch with a query* changes its
prediction. Following supervised-reptile:

- transductive: all queries of the episode go through the network as one batch;
- non-transductive: each query goes through alone with the whole support set, so no query sees
  another (the stricter protocol, and the default here).

Every reported accuracy says which one it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap
from tqdm import tqdm

from fedmeta.config import EvalConfig
from fedmeta.data.episodes import Episodes, gather, sample_episodes
from fedmeta.data.pool import ClassPool
from fedmeta.meta.learner import MetaLearner
from fedmeta.models.conv4 import Conv4, Params


@dataclass(frozen=True)
class Accuracy:
    mean: float
    ci95: float  # half-width of the normal 95% interval over episodes
    episodes: int

    @classmethod
    def of(cls, per_episode: Tensor) -> Accuracy:
        n = per_episode.numel()
        std = float(per_episode.std()) if n > 1 else 0.0
        return cls(float(per_episode.mean()), 1.96 * std / math.sqrt(n), n)


def logits_fn(model: Conv4, params: Params, support: Tensor, transductive: bool) -> Callable[[Tensor], Tensor]:
    """The classifier of queries after adaptation, as evaluated (see module docstring for the two modes).

    A function of the query batch, so that attacks differentiate exactly what is evaluated.
    """
    if transductive:
        return lambda inputs: model(params, inputs)
    alone = lambda x: model(params, torch.cat([support, x[None]]))[-1]  # noqa: E731
    return vmap(alone)


def predict(model: Conv4, params: Params, support: Tensor, inputs: Tensor, transductive: bool) -> Tensor:
    """Predicted labels of ``inputs`` after adaptation."""
    with torch.no_grad():
        return logits_fn(model, params, support, transductive)(inputs).argmax(-1)


EpisodeScore = Callable[[Params, Tensor, int], dict[str, Tensor]]
"""(adapted params, support images, episode index) -> named per-episode accuracies."""

Classifier = Callable[[Params, Tensor, Tensor], Tensor]
"""(weights, support images, inputs) -> predicted way of each input."""


def classifier(model: Conv4, transductive: bool) -> Classifier:
    """The model's own head (after fine-tuning on the support set)."""
    return lambda weights, support, inputs: predict(model, weights, support, inputs, transductive)


def score_episodes(params: Params, images: Tensor, episodes: Episodes, score: EpisodeScore) -> dict[str, Accuracy]:
    """Scores of ``params`` as they are, without fine-tuning (for classifiers that need none)."""
    results: dict[str, list[Tensor]] = {}
    for i in range(episodes.rows.shape[0]):
        for name, value in score(params, gather(images, episodes.support[i]), i).items():
            results.setdefault(name, []).append(value)
    return {name: Accuracy.of(torch.stack(v).float().cpu()) for name, v in results.items()}


def evaluate_episodes(
    learner: MetaLearner,
    params: Params,
    images: Tensor,
    episodes: Episodes,
    *,
    steps: int,
    batch: int,
    lr: float,
    gen: torch.Generator,
    score: EpisodeScore,
    desc: str | None = None,
) -> dict[str, Accuracy]:
    """Fine-tune ``steps`` steps on every episode's support set and aggregate the ``score`` of each."""
    curve = evaluate_curve(learner, params, images, episodes, at=[steps], batch=batch, lr=lr, gen=gen, score=score, desc=desc)
    return curve[steps]


def evaluate_curve(
    learner: MetaLearner,
    params: Params,
    images: Tensor,
    episodes: Episodes,
    *,
    at: Sequence[int],
    batch: int,
    lr: float,
    gen: torch.Generator,
    score: EpisodeScore,
    desc: str | None = None,
) -> dict[int, dict[str, Accuracy]]:
    """Scores after ``t`` fine-tuning steps, for every ``t`` in ``at`` (0: before fine-tuning).

    All randomness (the fine-tuning mini-batches) is drawn up front, as index tensors.
    """
    count = episodes.rows.shape[0]
    labels = episodes.support_labels().to(images.device)
    orders = learner.adapt_order(labels.numel(), max(at), batch, count, gen)
    wanted = set(at)
    results: dict[int, dict[str, list[Tensor]]] = {t: {} for t in sorted(wanted)}

    def keep(t: int, scores: dict[str, Tensor]) -> None:
        for name, value in scores.items():
            results[t].setdefault(name, []).append(value)

    for i in tqdm(range(count), desc=desc, leave=False, disable=desc is None):
        support = gather(images, episodes.support[i])
        if 0 in wanted:
            keep(0, score(params, support, i))
        for t, weights in enumerate(learner.adapt_path(params, support, labels, orders[i], lr), start=1):
            if t in wanted:
                keep(t, score(weights, support, i))
    return {t: {name: Accuracy.of(torch.stack(v).float().cpu()) for name, v in named.items()} for t, named in results.items()}


def query_accuracy(
    learner: MetaLearner, images: Tensor, episodes: Episodes, transductive: bool, classify: Classifier | None = None
) -> EpisodeScore:
    """Scores each episode by the accuracy on its own queries (by default with the model's head)."""
    labels = episodes.query_labels().to(images.device)
    classify = classify or classifier(learner.model, transductive)

    def score(adapted: Params, support: Tensor, i: int) -> dict[str, Tensor]:
        predicted = classify(adapted, support, gather(images, episodes.query[i]))
        return {"accuracy": (predicted == labels).float().mean()}

    return score


def meta_test(
    learner: MetaLearner,
    params: Params,
    pool: ClassPool,
    cfg: EvalConfig,
    *,
    shots: int,
    episodes: int,
    lr: float,
    gen: torch.Generator,
    desc: str | None = None,
) -> Accuracy:
    """Accuracy on ``episodes`` fresh ``cfg.ways``-way ``shots``-shot episodes of ``pool``."""
    sampled = sample_episodes(pool, episodes, cfg.ways, shots, cfg.queries, gen)
    scores = evaluate_episodes(
        learner,
        params,
        pool.images,
        sampled,
        steps=cfg.steps,
        batch=cfg.batch,
        lr=lr,
        gen=gen,
        score=query_accuracy(learner, pool.images, sampled, cfg.transductive),
        desc=desc,
    )
    return scores["accuracy"]
