"""Time Reptile's inner and outer steps, fedmeta's against a plain PyTorch loop, in one process.

The plain reference is what one would write first: an ``nn.Module`` Conv4 in the default (NCHW)
memory format, and per episode a ``copy.deepcopy`` of the model with a fresh
``torch.optim.Adam(betas=(0, 0.999))``. fedmeta's ``Reptile.train_step`` runs channels-last with
its fused Adam and carries Adam's moments from episode to episode as supervised-reptile does;
its ``torch.func.vmap`` path (all episodes at once, meant for GPUs) is timed beside it.

Phase 1 times the plain loop under glibc's default allocator settings, as a plain script runs.
Phase 2 switches fedmeta's allocator settings on (``fedmeta.runtime.keep_freed_memory``: freed
activations stay in the heap instead of being unmapped and faulted in again at every step) and
times the plain loop again beside fedmeta's variants, so the table separates what the allocator
setting gives from what the code gives. (The setting switches once: toggling it back and forth
makes glibc trim the heap at every switch.) Within a phase the variants alternate and medians are
reported, so drifting background load hits them alike.

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

B, E, BATCH, WAYS, SHOTS, CLASSES = 5, 10, 10, 5, 10, 40
Variants = dict[str, Callable[[], None]]  # name -> one timed call


class PlainConv4(nn.Module):
    """The same network as ``fedmeta.models.conv4.Conv4``, as an ordinary module."""

    def __init__(self, channels: int, size: int, filters: int = 64, ways: int = WAYS) -> None:
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


def nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 [n, H, W, C] -> float [n, C, H, W] with standard strides, as a plain script holds images.

    (``permute(...).contiguous()`` is not enough: with one channel the permuted tensor already counts
    as contiguous, keeps channels-last strides, and convolutions would then run channels-last.)
    """
    return images.permute(0, 3, 1, 2).float().div(255).clone(memory_format=torch.contiguous_format)


def plain_outer_step(model: PlainConv4, pool: ClassPool, gen: torch.Generator) -> None:
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
            x = nchw(pool.images[eps.support[j, idx]])
            opt.zero_grad()
            F.cross_entropy(local(x), labels[idx]).backward()
            opt.step()
        finals.append(local.state_dict())
    with torch.no_grad():
        model.load_state_dict({k: start[k] + 0.1 * (sum(f[k] for f in finals) / B - start[k]) for k in start})


class Setup:
    """Everything timed at one image size."""

    def __init__(self, size: int) -> None:
        self.size = size
        channels = 1 if size == 28 else 3
        self.gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (CLASSES, 20, size, size, channels), dtype=torch.uint8, generator=self.gen)
        self.pool = ClassPool.from_class_major(images, [str(i) for i in range(CLASSES)])
        self.model = Conv4(channels, size, WAYS, filters=64)
        cfg = MetaConfig(ways=WAYS, shots=SHOTS, inner_steps=E, inner_batch=BATCH, meta_batch=B)
        self.learner = Reptile(self.model, cfg)
        self.batched = Reptile(self.model, cfg.model_copy(update={"adam_carry": "parallel"}), batched=True)
        self.params = self.model.init(self.gen)
        self.state = self.learner.init_state(self.params)
        self.plain = PlainConv4(channels, size)
        self.plain_opt = torch.optim.Adam(self.plain.parameters(), lr=1e-3, betas=(0.0, 0.999))
        self.x = gather(self.pool.images, torch.arange(BATCH))  # channels-last, as fedmeta gathers
        self.x_plain = self.x.clone(memory_format=torch.contiguous_format)
        self.y = torch.arange(BATCH) % WAYS
        self.weights = [v.clone().requires_grad_() for v in self.params.values()]
        self.inner_state = AdamState.zeros(self.weights)

    def ours_outer(self, learner: Reptile) -> None:
        episodes = learner.sample(self.pool, self.gen)
        self.params, self.state, _ = learner.train_step(self.params, self.state, episodes, self.pool.images, self.gen, 0.0)

    def ours_inner(self) -> None:
        """The body of ``reptile_step``'s inner loop."""
        loss = F.cross_entropy(self.model(dict(zip(self.params, self.weights)), self.x), self.y)
        grads = torch.autograd.grad(loss, self.weights)
        with torch.no_grad():
            adam_step_(self.weights, grads, self.inner_state, lr=1e-3, beta1=0.0, beta2=0.999)

    def plain_inner(self) -> None:
        self.plain_opt.zero_grad()
        F.cross_entropy(self.plain(self.x_plain), self.y).backward()
        self.plain_opt.step()

    def plain_variants(self) -> Variants:
        return {"plain_outer": lambda: plain_outer_step(self.plain, self.pool, self.gen), "plain_inner": self.plain_inner}

    def fedmeta_variants(self) -> Variants:
        plain = self.plain_variants()
        return {
            "plain_fedmeta_malloc_outer": plain["plain_outer"],
            "plain_fedmeta_malloc_inner": plain["plain_inner"],
            "ours_outer": lambda: self.ours_outer(self.learner),
            "ours_vmap_outer": lambda: self.ours_outer(self.batched),
            "ours_inner": self.ours_inner,
        }

    def inner_step_flops(self) -> int:
        with FlopCounterMode(display=False) as counter:  # forward + backward of one inner step
            loss = F.cross_entropy(self.model(dict(zip(self.params, self.weights)), self.x), self.y)
            torch.autograd.grad(loss, self.weights)
        return counter.get_total_flops()


def time_variants(variants: Variants, repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each variant, measured round-robin."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            calls = 1 if name.endswith("outer") else 10
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append(1000 * (time.perf_counter() - t0) / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 84])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    setups = [Setup(size) for size in args.sizes]
    ms: dict[int, dict[str, float]] = {}
    for setup in setups:  # phase 1: glibc defaults
        ms[setup.size] = time_variants(setup.plain_variants(), args.repeats)
    keep_freed_memory()
    for setup in setups:  # phase 2: fedmeta's allocator settings
        ms[setup.size] |= time_variants(setup.fedmeta_variants(), args.repeats)
    peak = matmul_peak_gflops()

    results: dict[str, float | str | int] = {"torch": torch.__version__, "threads": threads, "peak_gflops": round(peak, 1)}
    for setup in setups:
        s, m = setup.size, ms[setup.size]
        flops = setup.inner_step_flops()
        results |= {f"ms_{name}_{s}": round(v, 2) for name, v in m.items()}
        results |= {
            f"speedup_outer_{s}": round(m["plain_outer"] / m["ours_outer"], 3),
            f"speedup_outer_same_malloc_{s}": round(m["plain_fedmeta_malloc_outer"] / m["ours_outer"], 3),
            f"speedup_inner_{s}": round(m["plain_inner"] / m["ours_inner"], 3),
            f"gflop_per_inner_step_{s}": round(flops / 1e9, 4),
            f"gflops_{s}": round(flops / (m["ours_inner"] / 1000) / 1e9, 1),
        }

    print(f"torch {results['torch']}, {threads} threads, float32 matmul (2048^2) {peak:.0f} GFLOP/s")
    print(f"Reptile outer step, ms (median of {args.repeats}): B={B} episodes x e={E} Adam steps of batch b={BATCH}, "
          "Conv4 with 64 filters")
    head = ["size", "plain", "plain+malloc", "ours", "speedup", "same malloc", "vmap", "inner plain/ours",
            "GFLOP/s", "of peak"]
    print("".join(f"{h:>17}" for h in head))
    for s in args.sizes:
        r = {k.removesuffix(f"_{s}"): v for k, v in results.items() if k.endswith(f"_{s}")}
        row = [s, f"{r['ms_plain_outer']:.1f}", f"{r['ms_plain_fedmeta_malloc_outer']:.1f}", f"{r['ms_ours_outer']:.1f}",
               f"{r['speedup_outer']:.2f}x", f"{r['speedup_outer_same_malloc']:.2f}x",
               f"{r['ms_ours_vmap_outer']:.1f}", f"{r['ms_plain_inner']:.2f}/{r['ms_ours_inner']:.2f}",
               f"{r['gflops']:.0f}", f"{100 * r['gflops'] / peak:.0f}%"]
        print("".join(f"{c:>17}" for c in row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
