"""Parallel paths give the sequential results: evaluation episodes in worker processes (identical
predictions on real Omniglot) and a round's users on the local-pool engine (same updates and
global model up to thread round-off)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor
from torch.func import vmap

import fedmeta.meta.learner
from fedmeta.config import MetaConfig, load_config
from fedmeta.data.episodes import gather, sample_episodes
from fedmeta.engines.batched import BatchedUsers
from fedmeta.engines.pool import LocalPool
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.engine import IN_PROCESS
from fedmeta.federation.updates import flatten
from fedmeta.meta.evaluation import Classifier, classifier, episode_scores, evaluate_curve, predict, query_accuracy
from fedmeta.meta.learner import Reptile
from fedmeta.models.conv4 import Conv4, Params
from fedmeta.rng import stream
from fedmeta.scenario.builder import Phase, build_population, build_server

TINY = [
    "model.filters=8", "meta.shots=2", "meta.inner_steps=2", "meta.meta_batch=2", "federation.episodes=4",
    "attacks.boosted.episodes=4", "attacks.boosted.inner_epochs=1", "runtime.threads=1",
]


@dataclass(frozen=True)
class Predictions:
    """A score that keeps every query's predicted way (picklable, so workers can run it)."""

    classify: Classifier
    images: Tensor
    query: Tensor

    def __call__(self, adapted: Params, support: Tensor, i: int) -> dict[str, Tensor]:
        return {"predicted": self.classify(adapted, support, gather(self.images, self.query[i]))}


@pytest.fixture(scope="module")
def evaluation(omniglot):
    """Reptile's learner on Conv4-16, briefly meta-trained, and 20 unseen 5-way 5-shot episodes."""
    gen = stream(0, "test-parallel")
    train = omniglot.pool(torch.arange(0, 300), rotations=False)
    test = omniglot.pool(torch.arange(1200, 1623), rotations=False)
    learner = Reptile(Conv4(1, 28, 5, filters=16), MetaConfig(shots=5, inner_steps=3, meta_batch=2))
    params = learner.model.init(gen)
    state = learner.init_state(params)
    for it in range(5):
        params, state, _ = learner.train_step(params, state, learner.sample(train, gen), train.images, gen, it / 5)
    return learner, params, test, sample_episodes(test, 20, 5, 5, 1, gen)


def test_parallel_evaluation_gives_the_sequential_predictions(evaluation):
    learner, params, test, episodes = evaluation
    score = Predictions(classifier(learner.model, False), test.images, episodes.query)

    def run(workers: int) -> dict:
        return episode_scores(learner, params, test.images, episodes, at=[0, 2, 4], batch=10, lr=1e-3, gen=stream(0, "ft"),
                              score=score, workers=workers)

    sequential, parallel = run(1), run(2)
    assert sequential.keys() == parallel.keys() == {0, 2, 4}
    for t in sequential:
        assert sequential[t]["predicted"].shape == (20, 5)
        assert torch.equal(sequential[t]["predicted"], parallel[t]["predicted"])

    def accuracy(workers: int) -> dict:
        return evaluate_curve(learner, params, test.images, episodes, at=[4], batch=10, lr=1e-3, gen=stream(0, "ft"),
                              score=query_accuracy(learner, test.images, episodes, False), workers=workers)

    assert accuracy(1) == accuracy(2)  # chunks of 3 episodes, the last of 2: same means, intervals, counts


def test_non_transductive_scoring_predicts_as_the_former_vmap_path(evaluation):
    """Each query alone with the support set, channels-last: the same logits as the former
    ``vmap`` of ``cat([support, query])`` on 28x28 Omniglot, hence the same predictions."""
    learner, params, test, episodes = evaluation
    model = learner.model
    for i in range(4):
        support, queries = gather(test.images, episodes.support[i]), gather(test.images, episodes.query[i])
        with torch.no_grad():
            former = vmap(lambda x: model(params, torch.cat([support, x[None]]))[-1])(queries)  # noqa: B023
        assert torch.equal(predict(model, params, support, queries, False), former.argmax(-1))


def test_local_pool_engine_computes_the_sequential_round(omniglot):
    """One attack round (two benign users and the boosted attacker) of a tiny federation on two
    worker processes: same users, updates and global model as in this process."""
    cfg = load_config("omniglot-exp1a-quick", TINY)
    phase = Phase("main", "a")
    population = build_population(cfg, phase)
    pool = LocalPool(2)
    sequential, parallel = (build_server(cfg, phase, population, engine) for engine in (IN_PROCESS, pool))
    params = {k: v for k, v in sequential.clients[0].learner.model.init(stream(cfg.seed, "init")).items()}
    settings = RoundSettings(1, "main")
    expected, got = sequential.updates(params, settings), parallel.updates(params, settings)
    assert [u.user for u in got] == [u.user for u in expected] and len(got) == cfg.federation.per_round
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(flatten(b.delta), flatten(a.delta), rtol=1e-4, atol=1e-6)
        assert b.examples == a.examples and b.metrics["loss"] == pytest.approx(a.metrics["loss"], rel=1e-4)
    (p_seq, r_seq), (p_par, r_par) = sequential.aggregate(params, expected, settings), parallel.aggregate(params, got, settings)
    assert r_par == r_seq
    torch.testing.assert_close(flatten(p_par), flatten(p_seq), rtol=1e-4, atol=1e-6)
    assert pool.stats() == {"pool_workers": 2}



def _gather64(images: Tensor, rows: Tensor) -> Tensor:
    return gather(images, rows).double()


@pytest.mark.parametrize("carry", ["sequential", "parallel"])
def test_batched_users_engine_computes_the_sequential_round(omniglot, carry, monkeypatch):
    """One attack round of a tiny federation with the benign users batched (the attacker, of
    another length, alone): same users, order, updates and losses as one after another (the
    server's aggregation is the in-process one).
    In float64: in float32 the two orders of summation differ by round-off, which Adam (steps of
    g / |g|) turns into visible steps where a gradient coordinate is near zero (3e-5 of 5e-4 here)."""
    monkeypatch.setattr(fedmeta.meta.learner, "gather", _gather64)
    cfg = load_config("omniglot-exp1a-quick", [*TINY, f"meta.adam_carry={carry}"])
    phase = Phase("main", "a")
    population = build_population(cfg, phase)
    sequential, batched = (build_server(cfg, phase, population, engine) for engine in (IN_PROCESS, BatchedUsers()))
    params = {k: v.double() for k, v in sequential.clients[0].learner.model.init(stream(cfg.seed, "init")).items()}
    settings = RoundSettings(1, "main")
    expected, got = sequential.updates(params, settings), batched.updates(params, settings)
    assert [u.user for u in got] == [u.user for u in expected] and len(got) == cfg.federation.per_round
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(flatten(b.delta), flatten(a.delta), rtol=0, atol=1e-12)
        assert flatten(a.delta).abs().max() > 1e-4  # every user trained
        assert b.examples == a.examples
        assert b.metrics["loss"] == pytest.approx(a.metrics["loss"], rel=1e-6)  # summed in float32

PARENT = '''
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from fedmeta.runtime import exit_with_parent

def pid():
    return os.getpid()

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=exit_with_parent, initargs=(0.1,)) as pool:
        print(pool.submit(pid).result(), flush=True)
        pool.submit(time.sleep, 120)  # the worker is busy (an idle one would see its queue close)
        time.sleep(120)
'''


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    """A sweep or run killed by a signal cannot shut its pool down: its workers must not go on
    computing as orphans (``runtime.exit_with_parent``, the initializer of every fedmeta pool)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()

    def alive() -> bool:  # an exited orphan may linger as a zombie where nothing reaps it
        status = Path(f"/proc/{worker}/status")
        return status.exists() and "\nState:\tZ" not in status.read_text()

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive()
