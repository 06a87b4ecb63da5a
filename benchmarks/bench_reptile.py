"""Time Reptile's inner step and outer step, fedmeta's against a plain PyTorch loop, in one process.

The plain reference is what one would write first: an ``nn.Module`` Conv4 in the default (NCHW)
memory format, and per episode a ``copy.deepcopy`` of the model with a fresh
``torch.optim.Adam(betas=(0, 0.999))``. fedmeta's path runs channels-last with its fused Adam.
Both run under the same allocator settings: fedmeta's (``fedmeta.runtime.keep_freed_memory``) by
default, glibc's defaults with ``--default-malloc`` (run both ways to see what the allocator
setting is worth; switching it inside one process would make glibc trim the heap at every switch).
Measurements alternate between variants and report medians, so background load hits them alike.

Also reported: achieved GFLOP/s of an inner step (FLOPs counted by ``FlopCounterMode``) against
the float32 matmul rate measured in the same run, and the ``vmap`` (batched) outer step.

    python benchmarks/bench_reptile.py [--repeats 7] [--json bench.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fedmeta.config import MetaConfig
from fedmeta.data.episodes import gather, minibatch_order, sample_episodes
from fedmeta.data.pool import ClassPool
from fedmeta.meta.adam import AdamState, adam_step_
from fedmeta.meta.learner import Reptile
from fedmeta.models.conv4 import Conv4
from fedmeta.runtime import keep_freed_memory

B, E, BATCH, WAYS, SHOTS = 5, 10, 10, 5, 10
class PlainConv4(nn.Module):
    """The same network as ``fedmeta.models.conv4.Conv4``, as an ordinary module."""

    def __init__(self, channels: int, size: int, filters: int = 64, ways: int = 5) -> None:
        super().__init__()
        layers, cin = [], channels
        for _ in range(4):
            layers += [nn.Conv2d(cin, filters, 3, padding=1, bias=False),
                       nn.BatchNorm2d(filters, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
            cin = filters
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(filters * (size // 16) ** 2, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def plain_outer_step(model: PlainConv4, images: torch.Tensor, pool: ClassPool, gen: torch.Generator) -> None:
    """Reptile as a first implementation would do it (see module docstring)."""
    eps = sample_episodes(pool, B, WAYS, SHOTS, 0, gen)
    order = minibatch_order(WAYS * SHOTS, E, BATCH, B, gen)
    labels = eps.support_labels()
    start = copy.deepcopy(model.state_dict())
    finals = []
    for j in range(B):
        local = copy.deepcopy(model)
        opt = torch.optim.Adam(local.parameters(), lr=1e-3, betas=(0.0, 0.999))
        for s in range(E):
            idx = order[j, s]
            x = images[eps.support[j, idx]].permute(0, 3, 1, 2).float().div(255).contiguous()
            opt.zero_grad()
            F.cross_entropy(local(x), labels[idx]).backward()
            opt.step()
        finals.append(local.state_dict())
    with torch.no_grad():
        new = {k: start[k] + 0.1 * (sum(f[k] for f in finals) / B - start[k]) for k in start}
    model.load_state_dict(new)


def median_ms(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n**3 / (median_ms(lambda: a @ b, repeats) / 1000) / 1e9


def bench_size(size: int, repeats: int) -> dict[str, float]:
    channels = 1 if size == 28 else 3
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20 * 40, size, size, channels), dtype=torch.uint8, generator=gen)
    pool = ClassPool.from_class_major(images.view(40, 20, size, size, channels), [str(i) for i in range(40)])
    model = Conv4(channels, size, WAYS, filters=64)
    learner = Reptile(model, MetaConfig(ways=WAYS, shots=SHOTS, inner_steps=E, inner_batch=BATCH, meta_batch=B))
    batched = Reptile(model, learner.cfg.model_copy(update={"adam_carry": "parallel"}), batched=True)
    params = model.init(gen)
    state = learner.init_state(params)
    plain = PlainConv4(channels, size)

    def ours_outer(which: Reptile = learner) -> None:
        nonlocal params, state
        params, state, _ = which.train_step(params, state, which.sample(pool, gen), pool.images, gen, 0.0)

    # one inner step each: forward, backward, Adam
    x_ours = gather(pool.images, torch.arange(BATCH))
    x_plain = x_ours.contiguous()
    y = torch.arange(BATCH) % WAYS
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3, betas=(0.0, 0.999))
    weights = [v.clone().requires_grad_() for v in params.values()]
    inner_state = AdamState.zeros(weights)

    def ours_inner() -> None:  # the body of reptile_step's inner loop
        loss = F.cross_entropy(model(dict(zip(params, weights)), x_ours), y)
        grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            adam_step_(weights, grads, inner_state, lr=1e-3, beta1=0.0, beta2=0.999)

    def plain_inner() -> None:
        opt.zero_grad()
        F.cross_entropy(plain(x_plain), y).backward()
        opt.step()

    variants = {
        "plain_outer": lambda: plain_outer_step(plain, pool.images, pool, gen),
        "ours_outer": ours_outer,
        "ours_outer_vmap": lambda: ours_outer(batched),
        "plain_inner": plain_inner,
        "ours_inner": ours_inner,
    }
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(repeats):  # interleaved, so drifting background load hits every variant alike
        for name, fn in variants.items():
            samples[name].append(median_ms(fn, 1 if name.endswith("outer") or "vmap" in name else 10))
    ms = {k: statistics.median(v) for k, v in samples.items()}

    with FlopCounterMode(display=False) as counter:  # forward + backward of one inner step
        torch.autograd.grad(F.cross_entropy(model(dict(zip(params, weights)), x_ours), y), weights)
    flops_step = counter.get_total_flops()
    return {
        **{f"ms_{k}_{size}": round(v, 2) for k, v in ms.items()},
        f"speedup_outer_{size}": round(ms["plain_outer"] / ms["ours_outer"], 3),
        f"speedup_inner_{size}": round(ms["plain_inner"] / ms["ours_inner"], 3),
        f"gflop_per_inner_step_{size}": round(flops_step / 1e9, 4),
        f"gflops_{size}": round(flops_step / (ms["ours_inner"] / 1000) / 1e9, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 84])
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's allocator defaults")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    results: dict[str, float | str | int] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                             "malloc": "glibc default" if args.default_malloc else "fedmeta"}
    if not args.default_malloc:
        keep_freed_memory()
    results["peak_gflops"] = round(matmul_peak_gflops(), 1)
    for size in args.sizes:
        results |= bench_size(size, args.repeats)
    print(f"torch {results['torch']}, {results['threads']} threads, malloc settings: {results['malloc']}, "
          f"float32 matmul peak {results['peak_gflops']} GFLOP/s")
    print(f"Reptile outer step: B={B} episodes x e={E} Adam steps of batch b={BATCH}, Conv4 64 filters; medians of {args.repeats}")
    print(f"{'size':>5} {'plain ms':>9} {'ours ms':>8} {'speedup':>8} {'vmap ms':>8}"
          f" {'inner plain/ours ms':>20} {'GFLOP/s':>8} {'% of peak':>9}")
    for s in args.sizes:
        print(f"{s:>5} {results[f'ms_plain_outer_{s}']:>9.1f} {results[f'ms_ours_outer_{s}']:>8.1f}"
              f" {results[f'speedup_outer_{s}']:>7.2f}x"
              f" {results[f'ms_ours_outer_vmap_{s}']:>8.1f}"
              f" {results[f'ms_plain_inner_{s}']:>9.2f}/{results[f'ms_ours_inner_{s}']:<10.2f}"
              f" {results[f'gflops_{s}']:>8.1f} {100 * results[f'gflops_{s}'] / results['peak_gflops']:>8.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
