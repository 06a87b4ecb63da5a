"""Non-transductive scoring: one forward pass per query (fedmeta's) against all queries in one batch.

    python benchmarks/bench_grouped_scoring.py [--size 28|84] [--queries 5 45] [--repeats 3]

Non-transductive evaluation runs each query through the network beside the whole support set, so
BatchNorm's statistics see one query at a time (``fedmeta.meta.evaluation.logits_fn``). The
alternative timed here puts every query's (support + query) group in one batch and computes
BatchNorm's statistics per group, from a view of the channels-last activations as
``[groups, images x H x W, channels]``: the same function, one convolution call per layer instead
of one per query. It prints both times (median milliseconds per episode, measured round-robin by
``bench_reptile.time_variants``; 1 thread, one process) and
whether the predictions agree. With 5 queries a backdoor episode scores its main task; with 45,
its main task and 40 keyed images.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_reptile import time_variants
from torch import Tensor

from fedmeta.meta.evaluation import logits_fn
from fedmeta.models.conv4 import BLOCKS, BN_EPS, Conv4, Params


def grouped_logits(model: Conv4, params: Params, support: Tensor, queries: Tensor) -> Tensor:
    """Logits of each query, BatchNorm over (support + that query) only, all queries in one batch."""
    groups, size = queries.shape[0], support.shape[0] + 1
    x = torch.cat([support.expand(groups, *support.shape), queries[:, None]], 1).flatten(0, 1)
    x = x.contiguous(memory_format=torch.channels_last)
    for i in range(BLOCKS):
        x = F.conv2d(x, params[f"trunk.{i}.conv.weight"], padding=1)
        n, c, h, w = x.shape
        g = x.permute(0, 2, 3, 1).reshape(groups, size * h * w, c)  # a view of channels-last memory
        var, mean = torch.var_mean(g, dim=1, keepdim=True, correction=0)
        scale = params[f"trunk.{i}.bn.weight"] * torch.rsqrt(var + BN_EPS)
        g = torch.addcmul(params[f"trunk.{i}.bn.bias"] - mean * scale, g, scale)
        x = F.relu(F.max_pool2d(g.view(n, h, w, c).permute(0, 3, 1, 2), 2))
    return model.head(params, x.flatten(1)).unflatten(0, (groups, size))[:, -1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=28, choices=[28, 84])
    parser.add_argument("--queries", type=int, nargs="+", default=[5, 45])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    channels, filters = (1, 64) if args.size == 28 else (3, 32)
    model = Conv4(channels, args.size, 5, filters)
    gen = torch.Generator().manual_seed(0)
    params = model.init(gen)
    support = torch.randn(25, channels, args.size, args.size, generator=gen)
    support = support.contiguous(memory_format=torch.channels_last)
    for count in args.queries:
        queries = torch.randn(count, channels, args.size, args.size, generator=gen)
        queries = queries.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ours = logits_fn(model, params, support, transductive=False)
            same = bool((ours(queries).argmax(-1) == grouped_logits(model, params, support, queries).argmax(-1)).all())
            ms = time_variants({"per_query": lambda: ours(queries),
                                "grouped": lambda: grouped_logits(model, params, support, queries)}, args.repeats)
        per_query, grouped = ms["per_query"], ms["grouped"]
        print(f"{args.size}x{args.size}, {count} queries: one pass per query {per_query:.1f} ms, "
              f"one batch {grouped:.1f} ms ({per_query / grouped:.2f}x), same predictions: {same}")


if __name__ == "__main__":
    main()
