"""The matching network's non-transductive scorer: one batch per query (fedmeta's) against ``vmap``.

    python benchmarks/bench_matching_scorer.py [--size 28|84] [--queries 75] [--repeats 3]

Experiment 3 scores a matching network on each evaluation episode without fine-tuning; each query
goes through the trunk beside the whole support set (25 images), alone, so that BatchNorm's
statistics see no other query (``fedmeta.defenses.matching.log_probs``). Until 2026-12-06 that was
``torch.func.vmap`` over the queries, which holds every query's activations at once. Each variant
runs in a fresh process (1 thread), so that its peak resident memory is its own; the script prints
the median seconds per episode's scoring, that peak, and the largest difference between the two
variants' log-probabilities.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from fedmeta.defenses import matching
from fedmeta.models.conv4 import Conv4, Params, trunk_params

WAYS, SUPPORT = 5, 25


def with_vmap(model: Conv4, weights: Params, support: Tensor, labels: Tensor, inputs: Tensor) -> Tensor:
    """The former scorer: ``vmap`` over the queries of (support + query) through the trunk."""
    def alone(x: Tensor) -> tuple[Tensor, Tensor]:
        features = model.trunk(weights, torch.cat([support, x[None]]))
        return features[-1], features[:-1]

    query_features, support_features = vmap(alone)(inputs)
    return matching.attention_log_probs(weights, query_features, support_features, labels, WAYS)


def measure(variant: str, size: int, queries: int, repeats: int) -> tuple[float, float, np.ndarray]:
    """Median seconds per call, peak resident GB of this process, and the last output."""
    torch.set_num_threads(1)
    channels, filters = (1, 64) if size == 28 else (3, 32)
    model = Conv4(channels, size, WAYS, filters)
    gen = torch.Generator().manual_seed(0)
    weights = {**trunk_params(model.init(gen)), **matching.init_head(WAYS, model.feature_dim, 10.0)}
    support = torch.rand(SUPPORT, channels, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    inputs = torch.rand(queries, channels, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(WAYS).repeat_interleave(SUPPORT // WAYS)
    if variant == "vmap":
        def run() -> Tensor:
            return with_vmap(model, weights, support, labels, inputs)
    else:
        def run() -> Tensor:
            return matching.log_probs(model, weights, support, labels, inputs, WAYS, transductive=False)
    seconds = []
    with torch.no_grad():
        out = run()  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            out = run()
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, out.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=84, choices=[28, 84])
    parser.add_argument("--queries", type=int, default=75)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    found = {}
    for variant in ("per_query", "vmap"):  # a fresh process each: its peak memory is the variant's
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            found[variant] = pool.submit(measure, variant, args.size, args.queries, args.repeats).result()
    for variant, (seconds, peak, _) in found.items():
        print(f"{args.size}x{args.size}, {args.queries} queries beside {SUPPORT}: {variant:9} {seconds:.2f} s, "
              f"peak {peak:.2f} GB")
    ours, former = found["per_query"], found["vmap"]
    print(f"per query {former[0] / ours[0]:.2f}x faster, {former[1] / ours[1]:.1f}x less memory; "
          f"largest difference {float(np.abs(ours[2] - former[2]).max()):.1e}")


if __name__ == "__main__":
    main()
