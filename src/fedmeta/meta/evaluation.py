"""Meta-test evaluation: fine-tune on each episode's support set, classify its queries.

Because BatchNorm uses batch statistics, *what shares a batch with a query* changes its
prediction. Following supervised-reptile:

- transductive: all queries of the episode go through the network as one batch;
- non-transductive: each query goes through alone with the whole support set, so no query sees
  another (the stricter protocol, and the default here).

Every reported accuracy says which one it is.

Episodes are independent, and every random choice of an evaluation (the fine-tuning
mini-batches) is drawn up front, so on a CPU the episodes are split into contiguous chunks that
single-threaded worker processes fine-tune side by side (``eval.workers``); the chunks' scores are
concatenated in episode order, so the predictions are the sequential path's (tested on real data).
One thread per worker is what survives a shared machine (README, "Several experiments on one
machine"). On a GPU the episodes run one after another in this process (``vmap`` over episodes
was 2.35x slower than the loop on this CPU and has not been measured on a GPU).
"""

from __future__ import annotations

import functools
import math
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor
from tqdm import tqdm

from fedmeta.config import EvalConfig
from fedmeta.data.episodes import Episodes, gather, sample_episodes
from fedmeta.data.pool import ClassPool
from fedmeta.meta.learner import MetaLearner
from fedmeta.models.conv4 import Conv4, Params
from fedmeta.runtime import exit_with_parent, keep_freed_memory

Workers = int | Literal["auto"]

MIN_PARALLEL_STEPS = 4000
"""``eval.workers = "auto"`` runs worker processes only for evaluations of at least this many
fine-tuning steps (episodes x steps): below it, starting the workers (importing torch, about 1.5 s
per evaluation on 2 idle cores) costs more than they save. Measured on 2 idle cores: 40 Omniglot
episodes x 50 steps (Conv4-32), twice, 14.7 s in this process at 2 threads, 17.6 s in 2 workers
started for each; 100 episodes x 50 steps (Conv4-64): README, "Benchmark"."""

CHUNKS_PER_WORKER = 4
"""Contiguous chunks per worker: a worker slowed by another process on its core takes fewer."""


@functools.cache
def t95(n: int) -> float:
    """The factor of a 95% interval's half-width over ``n`` values: ``t(0.975, n - 1)``, Student's
    quantile (12.71 at n = 2, 2.09 at 20, 1.98 at 100; 1.96 only in the limit), 0 below 2 values.
    SciPy is imported here, not at the top: evaluation workers import this module and never call it."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1)) if n > 1 else 0.0


@dataclass(frozen=True)
class Accuracy:
    """A mean over ``episodes`` evaluation episodes with the half-width of its 95% t-interval,
    ``t95(episodes) * s / sqrt(episodes)``. (Before 2026-12-06 the factor was the normal 1.96, a
    few percent narrower at the 20-100 episodes of a quick run; kept results of that time hold it.)"""

    mean: float
    ci95: float
    episodes: int

    @classmethod
    def of(cls, per_episode: Tensor) -> Accuracy:
        n = per_episode.numel()
        std = float(per_episode.std()) if n > 1 else 0.0
        return cls(float(per_episode.mean()), t95(n) * std / math.sqrt(n), n)

    @property
    def stderr(self) -> float:
        """The standard error of the mean, ``s / sqrt(episodes)``, recovered from the interval."""
        return self.ci95 / t95(self.episodes) if self.episodes > 1 else 0.0


def logits_fn(model: Conv4, params: Params, support: Tensor, transductive: bool) -> Callable[[Tensor], Tensor]:
    """The classifier of queries after adaptation, as evaluated (see module docstring for the two modes).

    A function of the query batch, so that attacks differentiate exactly what is evaluated. Each
    non-transductive batch (support + one query) is a ``torch.cat``, whose layout is not
    channels-last; the model restores it (``models.conv4.channels_last``: on that layout scoring
    was 10x faster per 84x84 episode than the former ``vmap`` over queries, and about 2x faster per
    Omniglot episode than the NCHW maps a one-channel ``cat`` gave before 2026-12-07:
    ``benchmarks/bench_layout.py``).
    """
    if transductive:
        return lambda inputs: model(params, inputs)

    def alone(inputs: Tensor) -> Tensor:
        return torch.stack([model(params, torch.cat([support, x[None]]))[-1] for x in inputs])

    return alone


def predict(model: Conv4, params: Params, support: Tensor, inputs: Tensor, transductive: bool) -> Tensor:
    """Predicted labels of ``inputs`` after adaptation."""
    with torch.no_grad():
        return logits_fn(model, params, support, transductive)(inputs).argmax(-1)


EpisodeScore = Callable[[Params, Tensor, int], dict[str, Tensor]]
"""(adapted params, support images, episode index) -> named per-episode accuracies. Scores that
are picklable objects (``QueryAccuracy``, the backdoor experiments' score) can run in workers."""

Classifier = Callable[[Params, Tensor, Tensor], Tensor]
"""(weights, support images, inputs) -> predicted way of each input."""


@dataclass(frozen=True)
class Head:
    """The model's own head (after fine-tuning on the support set), as a ``Classifier``."""

    model: Conv4
    transductive: bool

    def __call__(self, weights: Params, support: Tensor, inputs: Tensor) -> Tensor:
        return predict(self.model, weights, support, inputs, self.transductive)


def classifier(model: Conv4, transductive: bool) -> Classifier:
    """The model's own head (after fine-tuning on the support set)."""
    return Head(model, transductive)


@dataclass(frozen=True)
class QueryAccuracy:
    """Scores each episode by the accuracy on its own queries."""

    classify: Classifier
    images: Tensor
    query: Tensor  # [episodes, ways * queries] image rows
    labels: Tensor

    def __call__(self, adapted: Params, support: Tensor, i: int) -> dict[str, Tensor]:
        predicted = self.classify(adapted, support, gather(self.images, self.query[i]))
        return {"accuracy": (predicted == self.labels).float().mean()}


def query_accuracy(
    learner: MetaLearner, images: Tensor, episodes: Episodes, transductive: bool, classify: Classifier | None = None
) -> EpisodeScore:
    """Scores each episode by the accuracy on its own queries (by default with the model's head)."""
    return QueryAccuracy(classify or classifier(learner.model, transductive), images,
                         episodes.query.to(images.device), episodes.query_labels().to(images.device))


def score_episodes(params: Params, images: Tensor, episodes: Episodes, score: EpisodeScore,
                   desc: str | None = None) -> dict[str, Accuracy]:
    """Scores of ``params`` as they are, without fine-tuning (for classifiers that need none);
    with ``desc``, a progress bar over the episodes (minutes on mini-ImageNet at one thread)."""
    results: dict[str, list[Tensor]] = {}
    for i in tqdm(range(episodes.rows.shape[0]), desc=desc, leave=False, disable=desc is None):
        for name, value in score(params, gather(images, episodes.support[i]), i).items():
            results.setdefault(name, []).append(value)
    return {name: Accuracy.of(torch.stack(v).float().cpu()) for name, v in results.items()}


@dataclass(frozen=True)
class Curve:
    """Everything one evaluation needs, on one device; ``run`` scores a contiguous span of episodes.

    The same ``run`` serves the sequential path and every worker, so both compute the same thing."""

    learner: MetaLearner
    params: Params
    images: Tensor
    support: Tensor  # [episodes, ways * shots] image rows
    labels: Tensor  # support labels
    orders: Tensor  # [episodes, steps, batch] positions of each fine-tuning mini-batch
    at: tuple[int, ...]
    lr: float
    score: EpisodeScore

    def run(self, span: range, bar: tqdm | None = None) -> dict[int, dict[str, Tensor]]:
        """Per-episode scores ``[len(span), ...]`` after ``t`` steps, for every ``t`` in ``at``."""
        results: dict[int, dict[str, list[Tensor]]] = {t: {} for t in self.at}

        def keep(t: int, scores: dict[str, Tensor]) -> None:
            for name, value in scores.items():
                results[t].setdefault(name, []).append(value)

        for i in span:
            support = gather(self.images, self.support[i])
            if 0 in results:
                keep(0, self.score(self.params, support, i))
            for t, weights in enumerate(self.learner.adapt_path(self.params, support, self.labels, self.orders[i], self.lr),
                                        start=1):
                if t in results:
                    keep(t, self.score(weights, support, i))
            if bar is not None:
                bar.update()
        return {t: {name: torch.stack(v) for name, v in named.items()} for t, named in results.items()}


def episode_scores(
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
    workers: Workers = 1,
) -> dict[int, dict[str, Tensor]]:
    """Each episode's scores (stacked in episode order) after ``t`` fine-tuning steps, for every
    ``t`` in ``at`` (0: before fine-tuning), on ``workers`` processes (see ``eval_workers``).

    All randomness (the fine-tuning mini-batches) is drawn up front, as index tensors, and moved
    to the images' device once (not at every fine-tuning step).
    """
    count = episodes.rows.shape[0]
    device = images.device
    orders = learner.adapt_order(episodes.support.shape[1], max(at), batch, count, gen).to(device)
    curve = Curve(learner, params, images, episodes.support.to(device), episodes.support_labels().to(device), orders,
                  tuple(sorted(set(at))), lr, score)
    n = eval_workers(workers, device, count * max(at))
    if n == 1:
        with tqdm(total=count, desc=desc, leave=False, disable=desc is None) as bar:
            return curve.run(range(count), bar)
    return _in_workers(curve, count, n, desc)


def eval_workers(workers: Workers, device: torch.device, steps: int) -> int:
    """How many processes an evaluation of ``steps`` fine-tuning steps (over all episodes) runs on:
    one off the CPU; ``"auto"``: one per thread this process may use (``runtime.threads``, else
    PyTorch's default of one per core) when the evaluation is long enough to pay for the workers."""
    if device.type != "cpu":
        return 1
    if workers == "auto":
        return torch.get_num_threads() if steps >= MIN_PARALLEL_STEPS else 1
    return workers


def _in_workers(curve: Curve, count: int, workers: int, desc: str | None) -> dict[int, dict[str, Tensor]]:
    """``curve.run`` over contiguous chunks of the episodes in ``workers`` single-threaded
    processes, concatenated in episode order. Tensors travel through shared memory.

    The workers live for this evaluation only. Kept alive between evaluations, idle workers that
    have computed slow this process's own multi-threaded training down 3-6x until they exit
    (measured: an attacker's outer step at 2 threads, 1.0 s before a parallel evaluation, 3.3-4.2 s
    after it, 0.9 s once the pool is shut down; the cause lies below PyTorch), which costs far more
    than starting them again (about 1.5 s per evaluation)."""
    step = -(-count // min(count, workers * CHUNKS_PER_WORKER))
    spans = [range(lo, min(lo + step, count)) for lo in range(0, count, step)]
    curve = replace(curve, params={k: v.detach() for k, v in curve.params.items()})
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_setup) as pool:
        futures = [pool.submit(curve.run, span) for span in spans]
        parts = [f.result() for f in tqdm(futures, desc=desc, leave=False, disable=desc is None, unit="chunk")]
    return {t: {name: torch.cat([p[t][name] for p in parts]) for name in parts[0][t]} for t in curve.at}


def _worker_setup() -> None:
    torch.set_num_threads(1)
    keep_freed_memory()
    exit_with_parent()


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
    workers: Workers = 1,
) -> dict[str, Accuracy]:
    """Fine-tune ``steps`` steps on every episode's support set and aggregate the ``score`` of each."""
    curve = evaluate_curve(learner, params, images, episodes, at=[steps], batch=batch, lr=lr, gen=gen, score=score,
                           desc=desc, workers=workers)
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
    workers: Workers = 1,
) -> dict[int, dict[str, Accuracy]]:
    """Scores after ``t`` fine-tuning steps, for every ``t`` in ``at`` (0: before fine-tuning),
    aggregated over the episodes (``episode_scores``)."""
    scores = episode_scores(learner, params, images, episodes, at=at, batch=batch, lr=lr, gen=gen, score=score,
                            desc=desc, workers=workers)
    return {t: {name: Accuracy.of(v.float().cpu()) for name, v in named.items()} for t, named in scores.items()}


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
    """Accuracy on ``episodes`` fresh ``cfg.ways``-way ``shots``-shot episodes of ``pool``
    (on ``cfg.workers`` processes)."""
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
        workers=cfg.workers,
    )
    return scores["accuracy"]
