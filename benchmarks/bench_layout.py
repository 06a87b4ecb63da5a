"""One-channel images channels-last (fedmeta since 2026-12-07) against the layout they had before.

    python benchmarks/bench_layout.py [--episodes 20] [--repeats 3]

``torch.cat`` of one-channel images (the non-transductive scorer's support + query batch, keyed
images) returns NCHW strides, and ``contiguous(memory_format=torch.channels_last)`` leaves them:
with C = 1 both layouts count as contiguous. The convolutions then wrote NCHW maps, on which
max-pool is many times slower. ``fedmeta.models.conv4.channels_last`` sets the NHWC strides by
hand. This times, in one process at 1 thread (Omniglot's shape, Conv4-64, 5-way 5-shot, random
weights and images), both layouts round-robin: non-transductive scoring of 5 and 45 queries
(median ms per episode, ``bench_reptile.time_variants``) and a sequential evaluation of
``--episodes`` episodes (50 Adam steps each, then scoring; seconds, each variant ``--repeats``
times, median), and says whether the predictions agree.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from bench_reptile import time_variants
from torch import Tensor

import fedmeta.models.conv4 as conv4
from fedmeta.config import MetaConfig
from fedmeta.data.episodes import gather, sample_episodes
from fedmeta.data.pool import ClassPool
from fedmeta.meta.evaluation import evaluate_episodes, logits_fn, query_accuracy
from fedmeta.meta.learner import Reptile

LAYOUTS: dict[str, Callable[[Tensor], Tensor]] = {
    "before": lambda x: x.contiguous(memory_format=torch.channels_last),  # a no-op when C = 1
    "now": conv4.channels_last,
}


def with_layout(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the trunk's layout function ``name``."""

    def run() -> object:
        conv4.channels_last = LAYOUTS[name]
        try:
            return fn()
        finally:
            conv4.channels_last = LAYOUTS["now"]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    model = conv4.Conv4(1, 28, 5, 64)
    params = model.init(gen)
    images = torch.randint(0, 256, (100 * 20, 28, 28, 1), dtype=torch.uint8, generator=gen)
    support = gather(images, torch.arange(25))
    with torch.no_grad():
        for count in (5, 45):
            queries = gather(images, torch.arange(25, 25 + count))
            score = logits_fn(model, params, support, transductive=False)
            runs = {name: with_layout(name, lambda: score(queries)) for name in LAYOUTS}
            same = torch.equal(runs["before"]().argmax(-1), runs["now"]().argmax(-1))
            ms = time_variants(runs, args.repeats)
            print(f"scoring {count} queries: before {ms['before']:.1f} ms, now {ms['now']:.1f} ms "
                  f"({ms['before'] / ms['now']:.2f}x), same predictions: {same}")

    rows = torch.arange(len(images)).view(100, 20)
    pool = ClassPool(images, rows, torch.full((100,), 20), tuple(map(str, range(100))))
    learner = Reptile(model, MetaConfig())
    episodes = sample_episodes(pool, args.episodes, 5, 5, 1, torch.Generator().manual_seed(1))
    score = query_accuracy(learner, images, episodes, transductive=False)

    def evaluate() -> Tensor:
        return evaluate_episodes(learner, params, images, episodes, steps=50, batch=10, lr=1e-3,
                                 gen=torch.Generator().manual_seed(2), score=score)["accuracy"].mean

    seconds: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    accuracy: dict[str, object] = {}
    for _ in range(args.repeats):
        for name in LAYOUTS:
            t0 = time.perf_counter()
            accuracy[name] = with_layout(name, evaluate)()
            seconds[name].append(time.perf_counter() - t0)
    before, now = (statistics.median(seconds[name]) for name in LAYOUTS)
    print(f"evaluation of {args.episodes} episodes: before {before:.2f} s, now {now:.2f} s ({before / now:.2f}x), "
          f"same accuracy: {accuracy['before'] == accuracy['now']}")


if __name__ == "__main__":
    main()
