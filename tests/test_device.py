"""GPU-readiness without a GPU: a run's tensors stay on its device.

The run's device here is PyTorch's ``meta`` device (shapes, no data), and ``OnDevice`` watches
every torch call: an op that mixes the run's tensors with host tensors fails the test (a CPU
accumulator, a host label tensor, a host index at every fine-tuning step would each cost a host
sync or a pageable copy per call on a GPU), except explicit transfers (``Tensor.to``) and
indexing by a host index, which it counts, so a test can require that their number does not grow
with the number of steps.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from fedmeta.config import MetaConfig, load_config
from fedmeta.data.episodes import sample_episodes
from fedmeta.data.pool import ClassPool
from fedmeta.meta.evaluation import episode_scores, query_accuracy
from fedmeta.meta.learner import Maml, Reptile
from fedmeta.meta.reptile import reptile_step_batched, reptile_step_users
from fedmeta.models.conv4 import Conv4
from fedmeta.rng import stream
from fedmeta.scenario.backdoor import build_scenario

DEVICE = torch.device("meta")
TRANSFERS = {Tensor.to, Tensor.cuda, Tensor.copy_}
INDEXING = {Tensor.__getitem__, torch.index_select, Tensor.index_select}


class OnDevice(TorchFunctionMode):
    """Fails any op that mixes tensors on ``device`` with host tensors; counts transfers and host-indexed reads."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.transfers = 0
        self.host_indexing = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        host = [t for t in tensors if t.device != self.device]
        out = func(*args, **kwargs)
        if host and (len(host) < len(tensors) or _on_device(out, self.device)):
            if func in TRANSFERS:
                self.transfers += 1
            elif func in INDEXING and all(not t.is_floating_point() for t in host):
                self.host_indexing += 1
            else:
                shapes = [tuple(t.shape) for t in host]
                raise AssertionError(f"{getattr(func, '__name__', func)} mixes host tensors {shapes} with {self.device}")
        return out


def _on_device(out, device: torch.device) -> bool:
    return any(isinstance(t, Tensor) and t.device == device for t in tree_leaves(out))


def test_the_checker_catches_a_host_accumulator():
    with pytest.raises(AssertionError, match="mixes host tensors"), OnDevice(DEVICE):
        total = torch.zeros(())
        total += torch.ones((), device=DEVICE)


@pytest.fixture
def pool() -> ClassPool:
    """12 classes of 10 images, 28x28 gray, on the run's device (index tables on the host)."""
    return ClassPool(torch.empty(120, 28, 28, 1, dtype=torch.uint8, device=DEVICE), torch.arange(120).view(12, 10),
                     torch.full((12,), 10), tuple(map(str, range(12))))


def _counts(learner, pool: ClassPool, steps: int, *, batched: bool = False) -> tuple[int, int]:
    """Transfers and host-indexed reads of one outer step with ``steps`` inner steps."""
    learner = type(learner)(learner.model, learner.cfg.model_copy(update={"inner_steps": steps}),
                            **({"batched": batched} if isinstance(learner, Reptile) else {}))
    gen = stream(0, "device")
    params = {k: v.to(DEVICE) for k, v in learner.model.init(gen).items()}
    state = learner.init_state(params)
    with OnDevice(DEVICE) as mode:
        new, state, loss = learner.train_step(params, state, learner.sample(pool, gen), pool.images, gen, 0.0)
    assert all(v.device == DEVICE for v in [*new.values(), *state.exp_avg, *state.step, loss])
    return mode.transfers, mode.host_indexing


@pytest.mark.parametrize("algorithm", ["reptile", "reptile-batched", "fomaml"])
def test_a_training_step_keeps_its_tensors_on_the_device(pool, algorithm):
    model = Conv4(1, 28, 5, filters=4)
    if algorithm == "fomaml":
        learner = Maml(model, MetaConfig(algorithm="fomaml", shots=2, queries=1, meta_batch=2))
    else:
        learner = Reptile(model, MetaConfig(shots=3, inner_batch=5, meta_batch=2))
    batched = algorithm == "reptile-batched"
    assert _counts(learner, pool, 2, batched=batched) == _counts(learner, pool, 5, batched=batched)


def test_batched_reptile_accumulates_its_loss_on_the_device():
    model = Conv4(1, 28, 5, filters=4)
    params = {k: v.to(DEVICE) for k, v in model.init(stream(0, "init")).items()}
    x = torch.empty(2, 3, 5, 1, 28, 28, device=DEVICE)
    y = torch.zeros(2, 3, 5, dtype=torch.long, device=DEVICE)
    with OnDevice(DEVICE):
        _, _, loss = reptile_step_batched(model, params, Reptile(model, MetaConfig()).init_state(params), x, y,
                                          lr=1e-3, beta2=0.99, epsilon=0.1)
    assert loss.device == DEVICE


@pytest.mark.parametrize("carry", ["sequential", "parallel"])
def test_users_batched_reptile_keeps_its_tensors_on_the_device(carry):
    """``--engine batched``'s step: weights, moments and losses of every user stay on the device."""
    model = Conv4(1, 28, 5, filters=4)
    params = {k: v.to(DEVICE) for k, v in model.init(stream(0, "init")).items()}
    users = {k: v.unsqueeze(0).repeat(3, *([1] * v.dim())) for k, v in params.items()}
    x = torch.empty(3, 2, 3, 5, 1, 28, 28, device=DEVICE)
    y = torch.zeros(3, 2, 3, 5, dtype=torch.long, device=DEVICE)
    state = Reptile(model, MetaConfig()).init_state(params).expand(3)
    with OnDevice(DEVICE) as mode:
        new, state, loss = reptile_step_users(model, users, state, x, y, lr=1e-3, beta2=0.99, epsilon=0.1, carry=carry)
    assert mode.transfers == 0 and loss.shape == (3,)
    assert all(v.device == DEVICE for v in [*new.values(), *state.exp_avg, *state.step, loss])


@pytest.mark.parametrize("transductive", [False, True])
def test_an_evaluation_moves_its_indices_once_not_at_every_step(pool, transductive):
    learner = Reptile(Conv4(1, 28, 5, filters=4), MetaConfig())
    params = {k: v.to(DEVICE) for k, v in learner.model.init(stream(0, "init")).items()}
    episodes = sample_episodes(pool, 2, 5, 3, 1, stream(0, "episodes"))

    def counts(steps: int) -> tuple[int, int]:
        with OnDevice(DEVICE) as mode:
            scores = episode_scores(learner, params, pool.images, episodes, at=[0, steps], batch=5, lr=1e-3,
                                    gen=stream(0, "ft"), score=query_accuracy(learner, pool.images, episodes, transductive),
                                    workers="auto")
        assert scores[steps]["accuracy"].device == DEVICE and scores[steps]["accuracy"].shape == (2,)
        return mode.transfers, mode.host_indexing

    assert counts(2) == counts(6)


def test_a_backdoor_scenario_moves_its_one_image_store(omniglot):
    cfg = load_config("omniglot-exp1c-quick", ["federation.users=4"])
    scenario = build_scenario(cfg, "c").to(DEVICE)
    store = scenario.images
    assert store.device == DEVICE
    pools = [*scenario.users, *(e.pool for e in scenario.evaluation), scenario.everyone.pool, scenario.test]
    assert all(p.images is store for p in pools)


def test_a_node_builds_its_backdoor_population_on_the_runs_device(omniglot, monkeypatch):
    """A Flower node or a pool worker builds the population itself (not the experiment that moves
    its scenario): it must land on the run's device too (found on a GPU: host images, CUDA weights)."""
    from fedmeta.scenario import builder

    monkeypatch.setattr(builder.runtime, "setup", lambda cfg: DEVICE)
    cfg = load_config("omniglot-exp1c-quick", ["federation.users=4"])
    population = builder.build_population(cfg, builder.Phase("main", "c"))
    assert population.images.device == DEVICE
