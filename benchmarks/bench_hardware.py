"""Time what a run waits for, in one process: training steps, evaluation, a federated round.

Each part is timed against today's path (the sequential code before parallel evaluation and the
local-pool engine) and a plain PyTorch reference, and the training step is set against two
peaks measured in the same run:

- **FMA peak**: a C loop of independent vector FMAs (AVX-512 where the CPU has it, else AVX2),
  compiled with the system's C compiler and run as one process per thread (MKL's float32 matmul
  is not a peak: on AMD CPUs it takes its AVX2 path, half the AVX-512 rate);
- **convolution peak**: oneDNN's best rate on a large channels-last 3x3 convolution (64 -> 64
  channels, batch 128, 56x56), the kernel Conv4 spends its time in.

Parts (``--parts``, all by default):

- ``reptile``: the Reptile outer step against a plain loop (``bench_reptile.py``'s variants).
- ``maml``: fedmeta's MAML meta-step (``Maml.train_step``: second order, and first order) against
  ``higher`` (``pip install higher``; without it, against a plain ``torch.autograd`` MAML loop,
  and the JSON says which: ``maml_reference``).
- ``eval``: 100 episodes, 5-way 5-shot, 50 Adam steps, non-transductive (Omniglot 28x28 with
  Conv4-64 on real images when the data is found, else random; mini-ImageNet 84x84 with Conv4-32
  on random images: timing does not depend on pixel values): the plain reference (``nn.Module``,
  ``deepcopy`` and ``torch.optim.Adam`` per episode), today's path (sequential, queries scored
  through ``vmap``), fedmeta sequential and fedmeta in one worker per thread (started for it); the
  predictions of today's path and of the workers are compared (``eval_identical_<size>``, and the
  fraction that agree, ``eval_agreement_<size>``), and those of today's path and fedmeta
  sequential at the same thread count (``eval_identical_same_threads_<size>``).
- ``round``: one federated round of 10 users (Omniglot exp1a, benign) on the in-process engine
  and on the local-pool engine (first round: with the workers' start-up; second: warm).

Speed-ups are today's time over fedmeta's (``speedup_eval_28``, ``speedup_round``, ...).

    python benchmarks/bench_hardware.py --json bench.json            # about 15 min on 2 idle cores
    python benchmarks/bench_hardware.py --quick --json quick.json    # a few minutes: fewer episodes, users train less
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from bench_reptile import PlainConv4, Setup, nchw, time_variants
from torch import Tensor
from torch.func import vmap

from fedmeta.config import MetaConfig, load_config
from fedmeta.data.episodes import Episodes, gather, sample_episodes
from fedmeta.data.pool import ClassPool
from fedmeta.engines.pool import LocalPool
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.engine import IN_PROCESS
from fedmeta.meta.evaluation import classifier, episode_scores
from fedmeta.meta.learner import Maml, Reptile
from fedmeta.models.conv4 import Conv4, Params
from fedmeta.rng import stream
from fedmeta.runtime import keep_freed_memory, machine
from fedmeta.scenario.builder import Phase, build_population, build_server

try:
    import higher
except ImportError:  # the reference falls back to a plain torch.autograd loop
    higher = None

FMA_C = r"""
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define CHAINS 12 /* independent accumulators in registers: more than FMA latency x FMA ports */
#define ALL(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define INIT(i) VEC a##i = SET1((float)i);
#define STEP(i) a##i = FMA(a##i, b, c);
#define SUM(i) STORE(lanes, a##i); sink += lanes[0];
int main(int argc, char **argv) {
    long iters = atol(argv[1]);
    VEC b = SET1(1.0000001f), c = SET1(1e-7f);
    ALL(INIT)
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long n = 0; n < iters; n++) { ALL(STEP) }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    float sink = 0, lanes[LANES];
    ALL(SUM)
    double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    printf("%.9f %g\n", 2.0 * LANES * CHAINS * iters / s / 1e9, sink);
    return 0;
}
"""
ISA = {
    "avx512f": ("-mavx512f", {"VEC": "__m512", "SET1": "_mm512_set1_ps", "FMA": "_mm512_fmadd_ps",
                              "STORE": "_mm512_storeu_ps", "LANES": "16"}),
    "avx2": ("-mavx2 -mfma", {"VEC": "__m256", "SET1": "_mm256_set1_ps", "FMA": "_mm256_fmadd_ps",
                              "STORE": "_mm256_storeu_ps", "LANES": "8"}),
}


def fma_peak(threads: int, iters: int = 200_000_000) -> dict[str, float | str]:
    """GFLOP/s of independent float32 FMAs, one process per thread, summed (and the ISA used)."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    isa = next((name for name in ISA if name in flags), None)
    if isa is None:
        return {"fma_isa": "none (no AVX2 or AVX-512 flag)"}
    options, macros = ISA[isa]
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "fma.c", Path(tmp) / "fma"
        source.write_text("".join(f"#define {k} {v}\n" for k, v in macros.items()) + FMA_C)
        subprocess.run(["cc", "-O2", *options.split(), str(source), "-o", str(binary)], check=True)
        runs = [subprocess.Popen([str(binary), str(iters)], stdout=subprocess.PIPE, text=True) for _ in range(threads)]
        rates = [float(p.communicate()[0].split()[0]) for p in runs]
    return {"fma_isa": isa, "peak_fma_gflops": round(sum(rates), 1), "peak_fma_gflops_per_thread": round(max(rates), 1)}


def conv_peak(repeats: int = 5) -> float:
    """GFLOP/s of oneDNN's forward 3x3 convolution, 64 -> 64 channels, batch 128 at 56x56, channels-last."""
    x = torch.randn(128, 64, 56, 56).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3)
    flops = 2 * 128 * 64 * 56 * 56 * 64 * 9
    with torch.no_grad():
        F.conv2d(x, w, padding=1)
        return flops / min(_seconds(lambda: F.conv2d(x, w, padding=1)) for _ in range(repeats)) / 1e9


T = TypeVar("T")


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and the seconds it took."""
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def _seconds(fn: Callable[[], object]) -> float:
    return _timed(fn)[1]


# --- Reptile -----------------------------------------------------------------------------------


def bench_reptile(repeats: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for size in (28, 84):
        setup = Setup(size)
        ms = time_variants({**setup.plain_variants(), "ours_outer": lambda s=setup: s.ours_outer(s.learner),
                            "ours_inner": setup.ours_inner}, repeats)
        flops = setup.inner_step_flops()
        out |= {f"ms_reptile_outer_plain_{size}": round(ms["plain_outer"], 2),
                f"ms_reptile_outer_{size}": round(ms["ours_outer"], 2),
                f"speedup_outer_{size}": round(ms["plain_outer"] / ms["ours_outer"], 3),
                f"ms_inner_step_{size}": round(ms["ours_inner"], 3),
                f"gflops_inner_step_{size}": round(flops / (ms["ours_inner"] / 1000) / 1e9, 1)}
    return out


# --- MAML --------------------------------------------------------------------------------------

MAML = MetaConfig(algorithm="maml", ways=5, shots=1, queries=15, inner_steps=5, inner_lr=0.4, meta_lr=1e-3, meta_batch=4)


def maml_reference(model: PlainConv4, opt: torch.optim.Optimizer, support: tuple[Tensor, Tensor],
                   query: tuple[Tensor, Tensor], first_order: bool) -> None:
    """One MAML meta-step (SGD inner loop, Adam outer step) with ``higher`` when it is installed,
    else with plain ``torch.autograd``; first order: the query gradient at the adapted weights is
    applied to the initial ones."""
    opt.zero_grad()
    weights = list(model.parameters())
    tasks = support[0].shape[0]
    for t in range(tasks):
        sx, sy, qx, qy = support[0][t], support[1][t], query[0][t], query[1][t]
        fast, forward = _adapted(model, sx, sy, first_order)
        loss = F.cross_entropy(forward(qx), qy) / tasks
        if first_order:
            for w, g in zip(weights, torch.autograd.grad(loss, fast)):
                w.grad = g if w.grad is None else w.grad + g
        else:
            loss.backward()
    opt.step()


def _adapted(model: PlainConv4, x: Tensor, y: Tensor, first_order: bool) -> tuple[list[Tensor], Callable[[Tensor], Tensor]]:
    """The weights after ``MAML.inner_steps`` SGD steps on (x, y), and the model as a function of its input at them."""
    if higher is not None:
        inner = torch.optim.SGD(model.parameters(), lr=MAML.inner_lr)
        fmodel = higher.monkeypatch(model, copy_initial_weights=False, track_higher_grads=not first_order)
        diffopt = higher.get_diff_optim(inner, model.parameters(), fmodel=fmodel, track_higher_grads=not first_order)
        for _ in range(MAML.inner_steps):
            diffopt.step(F.cross_entropy(fmodel(x), y))
        return list(fmodel.parameters()), fmodel
    names = [n for n, _ in model.named_parameters()]
    fast = list(model.parameters())
    call = lambda w, inputs: torch.func.functional_call(model, dict(zip(names, w)), inputs)
    for _ in range(MAML.inner_steps):
        grads = torch.autograd.grad(F.cross_entropy(call(fast, x), y), fast, create_graph=not first_order)
        fast = [w - MAML.inner_lr * g for w, g in zip(fast, grads)]
        if first_order:
            fast = [w.detach().requires_grad_() for w in fast]
    return fast, lambda inputs: call(fast, inputs)


def bench_maml(repeats: int) -> dict[str, float | str]:
    reference = "higher" if higher is not None else "plain torch.autograd loop (higher is not installed)"
    out: dict[str, float | str] = {"maml_reference": reference}
    for algorithm in ("maml", "fomaml"):
        ms = _maml_step_ms(algorithm, repeats)
        out |= {f"ms_{algorithm}_{reference.split()[0]}": round(ms["reference_outer"], 2),
                f"ms_{algorithm}_fedmeta": round(ms["ours_outer"], 2),
                f"speedup_{algorithm}": round(ms["reference_outer"] / ms["ours_outer"], 3)}
    return out


def _maml_step_ms(algorithm: str, repeats: int) -> dict[str, float]:
    """Median ms of one meta-step on the same 4 tasks (Conv4-64, 5-way 1-shot, 15 queries): ours and the reference."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 20, 28, 28, 1), dtype=torch.uint8, generator=gen)
    pool = ClassPool.from_class_major(images, [str(i) for i in range(40)])
    model = Conv4(1, 28, 5, filters=64)
    learner = Maml(model, MAML.model_copy(update={"algorithm": algorithm}))
    carried = {"params": model.init(gen)}
    carried["state"] = learner.init_state(carried["params"])
    plain = PlainConv4(1, 28)
    opt = torch.optim.Adam(plain.parameters(), lr=MAML.meta_lr)
    episodes = learner.sample(pool, gen)
    support, query = learner.tasks(episodes, pool.images)
    plain_tasks = [(nchw_float(t[0]), t[1]) for t in (support, query)]

    def ours() -> None:
        carried["params"], carried["state"], _ = learner.train_step(carried["params"], carried["state"], episodes,
                                                                    pool.images, gen, 0.0)

    reference = lambda: maml_reference(plain, opt, *plain_tasks, algorithm == "fomaml")
    return time_variants({"reference_outer": reference, "ours_outer": ours}, repeats)


def nchw_float(x: Tensor) -> Tensor:
    """Gathered fedmeta images (channels-last strides) in the standard layout of a plain script."""
    return x.clone(memory_format=torch.contiguous_format) if x.dim() == 4 else x.contiguous()


# --- evaluation --------------------------------------------------------------------------------

EVAL_STEPS, EVAL_BATCH, EVAL_LR = 50, 10, 1e-3


@dataclass(frozen=True)
class Predicted:
    """Score: every query's predicted way, by fedmeta's classifier (``former=False``) or by today's
    path, each query with the support set through ``vmap`` of ``cat`` (``former=True``)."""

    model: Conv4
    images: Tensor
    query: Tensor
    former: bool

    def __call__(self, weights: Params, support: Tensor, i: int) -> dict[str, Tensor]:
        queries = gather(self.images, self.query[i])
        if not self.former:
            return {"predicted": classifier(self.model, False)(weights, support, queries)}
        with torch.no_grad():
            logits = vmap(lambda x: self.model(weights, torch.cat([support, x[None]]))[-1])(queries)
        return {"predicted": logits.argmax(-1)}


def plain_evaluation(model: Conv4, params: Params, images: Tensor, episodes: Episodes, orders: Tensor) -> None:
    """What one would write first: per episode a ``deepcopy`` of an ``nn.Module`` and a fresh
    ``torch.optim.Adam``, NCHW images, each query with the support set in a loop."""
    plain = PlainConv4(model.in_channels, model.image_size, model.filters)
    labels = episodes.support_labels()
    for i in range(episodes.rows.shape[0]):
        local = copy.deepcopy(plain)
        opt = torch.optim.Adam(local.parameters(), lr=EVAL_LR, betas=(0.0, 0.999))
        support = nchw(images[episodes.support[i]])
        for idx in orders[i]:
            opt.zero_grad()
            F.cross_entropy(local(support[idx]), labels[idx]).backward()
            opt.step()
        with torch.no_grad():
            for x in nchw(images[episodes.query[i]]):
                local(torch.cat([support, x[None]]))


def bench_eval(episodes: int, omniglot_images: Tensor | None, sizes: list[int]) -> dict[str, float | bool | int]:
    gen = torch.Generator().manual_seed(0)
    out: dict[str, float | bool | int] = {"eval_episodes": episodes, "eval_steps": EVAL_STEPS}
    for size, channels, filters in [s for s in ((28, 1, 64), (84, 3, 32)) if s[0] in sizes]:
        if size == 28 and omniglot_images is not None:
            images = omniglot_images
        else:
            images = torch.randint(0, 256, (20 * 100, size, size, channels), dtype=torch.uint8, generator=gen)
        out |= {f"{k}_{size}": v for k, v in _eval_at(images, filters, episodes, gen).items()}
    return out


def _eval_at(images: Tensor, filters: int, episodes: int, gen: torch.Generator) -> dict[str, float | bool]:
    """Seconds of the four evaluation paths on ``episodes`` episodes of ``images`` ([classes x 20, H, W, C])."""
    size, channels = images.shape[1], images.shape[3]
    pool = ClassPool.from_class_major(images.view(-1, 20, size, size, channels), [str(c) for c in range(len(images) // 20)])
    learner = Reptile(Conv4(channels, size, 5, filters=filters), MetaConfig())
    params = learner.model.init(gen)
    sampled = sample_episodes(pool, episodes, 5, 5, 1, gen)

    def run(workers: int | str, former: bool, count: int = episodes) -> Tensor:
        part = Episodes(sampled.rows[:count], sampled.classes[:count], sampled.shots)
        score = Predicted(learner.model, pool.images, part.query, former)
        return episode_scores(learner, params, pool.images, part, at=[EVAL_STEPS], batch=EVAL_BATCH, lr=EVAL_LR,
                              gen=stream(0, "bench-eval"), score=score, workers=workers)[EVAL_STEPS]["predicted"]

    orders = learner.adapt_order(25, EVAL_STEPS, EVAL_BATCH, episodes, stream(0, "bench-eval"))
    plain_s = _seconds(lambda: plain_evaluation(learner.model, params, pool.images, sampled, orders))
    today, today_s = _timed(lambda: run(1, True))
    sequential, sequential_s = _timed(lambda: run(1, False))
    start_s = _seconds(lambda: run(torch.get_num_threads(), False, count=2))  # mostly the workers' start
    parallel, parallel_s = _timed(lambda: run(torch.get_num_threads(), False))  # workers started for it, as in a run
    return {"s_eval_plain": round(plain_s, 2), "s_eval_today": round(today_s, 2), "s_eval_sequential": round(sequential_s, 2),
            "s_eval_parallel": round(parallel_s, 2), "s_eval_workers_start": round(start_s, 2),
            "speedup_eval": round(today_s / parallel_s, 3), "speedup_eval_vs_plain": round(plain_s / parallel_s, 3),
            "eval_identical": bool(torch.equal(today, parallel)),
            # the workers run 1 thread each, the in-process paths this process's threads: round-off
            # differs, and a freshly initialised model has near-ties that it can flip
            "eval_identical_same_threads": bool(torch.equal(today, sequential)),
            "eval_agreement": round(float((today == parallel).float().mean()), 4)}


# --- a federated round -------------------------------------------------------------------------


def bench_round(users: int, episodes: int, workers: int | None) -> dict[str, float | int]:
    """A benign round of ``users`` of the exp1a federation (one more user: the attacker, idle here)."""
    cfg = load_config("omniglot-exp1a-quick", [
        f"federation.users={users + 1}", f"federation.per_round={users}", f"federation.min_updates={users}",
        f"federation.episodes={episodes}", "attack.enabled=false"])
    phase = Phase("main", "a")
    population = build_population(cfg, phase)
    pool = LocalPool(workers)
    sequential, parallel = (build_server(cfg, phase, population, engine) for engine in (IN_PROCESS, pool))
    params = next(iter(sequential.clients.values())).learner.model.init(stream(cfg.seed, "init"))
    seconds = {}
    for name, server in (("sequential", sequential), ("pool_cold", parallel), ("pool", parallel)):
        t0 = time.perf_counter()
        server.updates(params, RoundSettings(1, "main"))
        seconds[name] = time.perf_counter() - t0
    return {"round_users": users, "round_episodes_per_user": episodes, "pool_workers": pool.size,
            **{f"s_round_{k}": round(v, 2) for k, v in seconds.items()},
            "speedup_round": round(seconds["sequential"] / seconds["pool"], 3),
            "speedup_round_cold": round(seconds["sequential"] / seconds["pool_cold"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="minutes: 20 evaluation episodes, 20 per user, 3 repeats")
    parser.add_argument("--parts", nargs="+", default=["reptile", "maml", "eval", "round"],
                        choices=["reptile", "maml", "eval", "round"])
    parser.add_argument("--workers", type=int, help="pool engine workers (default: the engine's, one per thread)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[28, 84], choices=[28, 84],
                        help="image sizes of the eval part (84: minutes more)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    keep_freed_memory()
    threads = torch.get_num_threads()
    repeats, eval_episodes, round_episodes = (3, 20, 20) if args.quick else (7, 100, 100)
    results: dict[str, object] = {**machine(), "quick": args.quick, "load_average": os.getloadavg()[0]}
    results |= fma_peak(threads)
    results["peak_conv_gflops"] = round(conv_peak(), 1)
    if "reptile" in args.parts:
        results |= bench_reptile(repeats)
        for size in (28, 84):
            rate = results[f"gflops_inner_step_{size}"]
            if "peak_fma_gflops" in results:
                results[f"inner_step_of_fma_peak_{size}"] = round(rate / results["peak_fma_gflops"], 3)
            results[f"inner_step_of_conv_peak_{size}"] = round(rate / results["peak_conv_gflops"], 3)
    if "maml" in args.parts:
        results |= bench_maml(repeats)
    if "eval" in args.parts:
        results |= bench_eval(eval_episodes, _omniglot_images(), args.sizes)
    if "round" in args.parts:
        results |= bench_round(10, round_episodes, args.workers)
    for key, value in results.items():
        print(f"{key:<36} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True))
        print(f"wrote {args.json}")


def _omniglot_images() -> Tensor | None:
    """100 real Omniglot test characters x 20 images (uint8), or None without the data."""
    from fedmeta.data.files import DataError
    from fedmeta.data.omniglot import load_omniglot

    try:
        pool = load_omniglot().pool(torch.arange(1200, 1300), rotations=False)
    except DataError:
        return None
    return pool.images[pool.index.flatten()]


if __name__ == "__main__":
    main()
