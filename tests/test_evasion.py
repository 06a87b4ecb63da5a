"""Evasion attacks: they stay valid images in the ball, they are real attacks, and nothing masks them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import brief_fomaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.attacks.evasion import LinfAttack, cross_entropy_of, pgd, pixels, robust_meta_test
from fedmeta.config import EvalConfig
from fedmeta.models.conv4 import Conv4


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with many pixels exactly at 0 and 1 (like Omniglot's ink), so the range clamp matters."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(12, 1, 28, 28, generator=gen)
    return torch.where(x < 0.3, 0.0, torch.where(x > 0.7, 1.0, x)), torch.arange(12) % 5


@settings(max_examples=20, deadline=None)
@given(
    epsilon=st.floats(0.0, 0.3),
    step_factor=st.floats(0.05, 3.0),
    steps=st.integers(0, 4),
    random_start=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_pgd_stays_in_the_ball_and_the_image_range(epsilon, step_factor, steps, random_start, seed):
    model = Conv4(1, 28, 5, filters=4)
    params = model.init(torch.Generator().manual_seed(seed))
    x, y = _batch(seed)
    adv = pgd(cross_entropy_of(lambda z: model(params, z), y), x, epsilon=epsilon, step=step_factor * epsilon,
              steps=steps, random_start=random_start, gen=torch.Generator().manual_seed(seed))
    assert adv.shape == x.shape and not adv.requires_grad
    assert float((adv - x).abs().max()) <= epsilon + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_pgd_with_zero_steps_is_the_clean_input(tiny):
    params = tiny.init(torch.Generator().manual_seed(0))
    x, y = _batch()
    adv = LinfAttack.pgd(pixels(8), pixels(2), 0)(cross_entropy_of(lambda z: tiny(params, z), y), x, torch.Generator())
    assert torch.equal(adv, x)


def test_attacks_raise_the_loss_and_pgd_uses_its_budget(tiny):
    params = tiny.init(torch.Generator().manual_seed(0))
    x, y = _batch()
    loss = cross_entropy_of(lambda z: tiny(params, z), y)
    gen = torch.Generator().manual_seed(0)
    epsilon = pixels(8)
    for attack in (LinfAttack.fgsm(epsilon), LinfAttack.fgsm_rs(epsilon), LinfAttack.pgd(epsilon, pixels(2), 10)):
        assert float(loss(attack(loss, x, gen))) > float(loss(x)), attack
    adv = LinfAttack.pgd(epsilon, pixels(2), 10)(loss, x, gen)
    inside = (x > epsilon) & (x < 1 - epsilon)  # pixels that the range clamp cannot stop
    assert float((adv - x)[inside].abs().mean()) > 0.5 * epsilon


def test_fgsm_rs_takes_one_step_of_one_and_a_quarter_epsilon():
    attack = LinfAttack.fgsm_rs(pixels(8))
    assert (attack.steps, attack.random_start) == (1, True) and attack.step == pytest.approx(1.25 * pixels(8))
    assert LinfAttack.fgsm(0.1) == LinfAttack(0.1, 0.1, 1, random_start=False)


def test_same_generator_same_attack(tiny):
    params = tiny.init(torch.Generator().manual_seed(0))
    x, y = _batch()
    loss = cross_entropy_of(lambda z: tiny(params, z), y)
    attack = LinfAttack.pgd(pixels(8), pixels(2), 3)
    a, b = attack(loss, x, torch.Generator().manual_seed(5)), attack(loss, x, torch.Generator().manual_seed(5))
    c = attack(loss, x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_attack_leaves_no_gradient_on_the_weights(tiny):
    params = {k: v.requires_grad_() for k, v in tiny.init(torch.Generator().manual_seed(0)).items()}
    x, y = _batch()
    LinfAttack.pgd(pixels(8), pixels(2), 2)(cross_entropy_of(lambda z: tiny(params, z), y), x, torch.Generator())
    assert all(p.grad is None for p in params.values())


@pytest.fixture(scope="module")
def trained(omniglot):
    """A first-order MAML learner trained briefly on real Omniglot (1-shot, about 50% against 20% chance)."""
    return brief_fomaml(omniglot, 120, torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("transductive", "episodes"), [(True, 30), (False, 12)])  # non-transductive costs 6x
def test_pgd_is_at_least_as_strong_as_fgsm_and_robust_never_exceeds_standard(trained, transductive, episodes):
    learner, params, test = trained
    cfg = EvalConfig(ways=5, queries=5, steps=3, transductive=transductive)
    epsilon = pixels(16)
    attacks = {"pgd": LinfAttack.pgd(epsilon, pixels(4), 10), "fgsm": LinfAttack.fgsm(epsilon)}
    attack_gen = torch.Generator().manual_seed(2)
    accs = robust_meta_test(learner, params, test, cfg, attacks, shots=1, episodes=episodes, lr=0.4,
                            gen=torch.Generator().manual_seed(1), attack_gens={"pgd": attack_gen, "fgsm": attack_gen})
    standard, fgsm, robust = accs["standard"].mean, accs["fgsm"].mean, accs["pgd"].mean
    assert standard > 0.4, accs  # a model worth attacking (chance: 0.2)
    assert robust <= fgsm <= standard, accs
    assert robust < standard - 0.1, accs  # plain MAML is not robust: the attack bites


def test_a_query_survives_restarts_only_if_it_survives_each_of_them(trained):
    learner, params, test = trained
    cfg = EvalConfig(ways=5, queries=5, steps=3, transductive=True)

    def robust(episode: int, restarts: int, attack_gen: torch.Generator) -> float:
        attack = {"pgd": LinfAttack.pgd(pixels(16), pixels(2), 1, restarts)}  # the random start dominates
        accs = robust_meta_test(learner, params, test, cfg, attack, shots=1, episodes=1, lr=0.4,
                                gen=torch.Generator().manual_seed(episode), attack_gens={"pgd": attack_gen})
        return accs["pgd"].mean

    gains = []
    for episode in range(6, 13):  # one episode each: single run k draws restart k's start
        gen = torch.Generator().manual_seed(2)
        singles = [robust(episode, 1, gen) for _ in range(3)]
        together = robust(episode, 3, torch.Generator().manual_seed(2))
        assert together <= min(singles), (episode, singles, together)
        gains.append(singles[0] - together)
    # the later starts count: somewhere they fool a query the first start does not (which episode
    # depends on the threads' round-off; measured on episodes 10 and 12 with 1 thread, 12 with 2)
    assert max(gains) > 0, gains


def test_non_transductive_attack_sees_each_query_alone_with_the_support(tiny):
    from fedmeta.meta.evaluation import logits_fn

    params = tiny.init(torch.Generator().manual_seed(0))
    support, (queries, y) = torch.rand(5, 1, 28, 28), _batch()
    logits = logits_fn(tiny, params, support, transductive=False)
    attack = LinfAttack(pixels(8), pixels(2), 2, random_start=False)
    adv = attack(cross_entropy_of(logits, y), queries, torch.Generator())
    # the same attack on one query at a time: its gradient never depends on the other queries
    for i in range(3):
        alone = lambda z, i=i: F.cross_entropy(tiny(params, torch.cat([support, z]))[-1:], y[i : i + 1])  # noqa: E731
        same = torch.isclose(adv[i : i + 1], attack(alone, queries[i : i + 1], torch.Generator()), atol=1e-6)
        assert float(same.float().mean()) > 0.99  # round-off may flip the sign of a near-zero gradient
