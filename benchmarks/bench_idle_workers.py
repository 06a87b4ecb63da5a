"""Does a pool of idle worker processes that have computed slow this process's own training?

Times an attacker-like Reptile outer step (Conv4-32, 28x28, 5-way 10-shot, 75 inner steps of
batch 10) at the process's default threads: before any worker exists, while a pool of 2
single-threaded spawned workers that have run some PyTorch work sits idle, and after that pool is
shut down. Evaluation workers used to be kept like that between evaluations; they now live for
one evaluation (``fedmeta.meta.evaluation._in_workers``). Run on an otherwise idle machine:

    python benchmarks/bench_idle_workers.py
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from fedmeta.config import MetaConfig
from fedmeta.data.pool import ClassPool
from fedmeta.meta.learner import Reptile
from fedmeta.models.conv4 import Conv4


def _one_thread() -> None:
    torch.set_num_threads(1)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(200, 20, 28, 28, 1, generator=gen) * 255).to(torch.uint8)
    pool = ClassPool.from_class_major(images, [str(i) for i in range(200)])
    learner = Reptile(Conv4(1, 28, 5, filters=32), MetaConfig(inner_steps=75))
    params = learner.model.init(gen)
    state = learner.init_state(params)

    def seconds_per_step(steps: int = 3) -> float:
        nonlocal params, state
        params, state, _ = learner.train_step(params, state, learner.sample(pool, gen), pool.images, gen, 0.0)  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            params, state, _ = learner.train_step(params, state, learner.sample(pool, gen), pool.images, gen, 0.0)
        return (time.perf_counter() - start) / steps

    print(f"threads {torch.get_num_threads()}: no workers {seconds_per_step():.2f} s/step")
    workers = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread)
    x = torch.randn(256, 256)
    [f.result() for f in [workers.submit(torch.linalg.matrix_rank, x) for _ in range(4)]]
    print(f"2 idle workers that have computed: {seconds_per_step():.2f} s/step")
    workers.shutdown()
    print(f"after shutting them down: {seconds_per_step():.2f} s/step")


if __name__ == "__main__":
    main()
