"""Milliseconds per Reptile outer step with a given thread count, alone or beside another process.

Conv4-64 on 28x28 images, 5-way 10-shot, 10 inner Adam steps of batch 10 (the paper's Omniglot
step). The OpenMP wait policy is read when PyTorch loads, so set it in the environment:

    python benchmarks/bench_threads.py 2                              # alone
    python benchmarks/bench_threads.py 2 --steps 100000 & python benchmarks/bench_threads.py 2   # beside a twin
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_threads.py 2
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fedmeta.config import MetaConfig
from fedmeta.data.pool import ClassPool
from fedmeta.meta.learner import Reptile
from fedmeta.models.conv4 import Conv4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("threads", type=int)
    parser.add_argument("--steps", type=int, default=15, help="timed steps (after 3 warm-up steps)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(200, 20, 28, 28, 1, generator=gen) * 255).to(torch.uint8)
    pool = ClassPool.from_class_major(images, [str(i) for i in range(200)])
    learner = Reptile(Conv4(1, 28, 5, filters=64), MetaConfig())
    params = learner.model.init(gen)
    state = learner.init_state(params)
    for step in range(3 + args.steps):
        if step == 3:
            start = time.perf_counter()
        params, state, _ = learner.train_step(params, state, learner.sample(pool, gen), pool.images, gen, 0.0)
    per_step = (time.perf_counter() - start) / args.steps * 1000
    print(f"threads={args.threads} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}: {per_step:.0f} ms/step")


if __name__ == "__main__":
    main()
