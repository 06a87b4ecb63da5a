"""R-MAML's unlabeled-data term and auxiliary contrastive task: hand-computed values, the sampling
of unlabeled images, and that with both options off the meta-step is bit for bit the one before them."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from fedmeta.attacks.evasion import LinfAttack, cross_entropy_of, pixels
from fedmeta.config import ConfigError, MetaConfig, load_config
from fedmeta.defenses.robust_maml import (
    Contrastive,
    RobustMaml,
    WithUnlabeled,
    adversarial_query_loss,
    augment,
    frozen,
    make_robust_learner,
    nt_xent,
    trades_loss,
)
from fedmeta.meta.maml import meta_update, sgd_adapt

CFG = MetaConfig(algorithm="fomaml", shots=1, queries=3, inner_steps=2, inner_lr=0.1, meta_lr=1e-3, meta_batch=2)
ATTACK = LinfAttack.fgsm_rs(pixels(8))
E = torch.eye(4, dtype=torch.float64)  # float64: the hand-computed values are exact to 1e-12


@pytest.fixture(scope="module")
def pool(omniglot):
    return omniglot.pool(torch.arange(40), rotations=False)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", [0.5, 0.1, 1.0])
def test_nt_xent_of_identical_orthonormal_pairs(temperature):
    """Pairs (e1, e1), (e2, e2): each anchor has its pair at similarity 1 and two others at 0, so the
    loss is -log(e^(1/t) / (e^(1/t) + 2)) = log(1 + 2 e^(-1/t)); the embeddings' lengths do not matter."""
    a, b = E[:2], 3.0 * E[:2]
    assert float(nt_xent(a, b, temperature)) == pytest.approx(math.log(1 + 2 * math.exp(-1 / temperature)), rel=1e-12)


def test_nt_xent_of_orthogonal_pairs_is_log_of_the_candidates():
    """Four mutually orthogonal embeddings: every candidate scores 0, the loss is log(2N - 1) = log 3."""
    assert float(nt_xent(E[:2], E[2:], 0.5)) == pytest.approx(math.log(3), rel=1e-12)


def test_nt_xent_of_opposite_pairs():
    """Pairs (e1, -e1), (e2, -e2): the pair scores -1/t, the other two 0: log(1 + 2 e^(1/t))."""
    assert float(nt_xent(E[:2], -E[:2], 0.5)) == pytest.approx(math.log(1 + 2 * math.exp(2.0)), rel=1e-12)


def test_augment_keeps_a_flat_image_flat_within_the_jitter():
    """Crop, resize and flip leave a constant image constant, contrast scales around its own mean,
    so only brightness moves it: each view is constant, within (1 +- 0.4) of the gray level."""
    x = torch.full((6, 3, 28, 28), 0.5)
    views = augment(x, torch.Generator().manual_seed(0))
    flat = views.flatten(1)
    assert torch.allclose(flat, flat[:, :1].expand_as(flat), atol=1e-6)
    assert bool(((flat >= 0.5 * 0.6 - 1e-6) & (flat <= 0.5 * 1.4 + 1e-6)).all())


def test_augment_is_a_seeded_random_view_in_the_pixel_range():
    x = _images(8, 0)
    a, b = augment(x, torch.Generator().manual_seed(1)), augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.allclose(a, augment(x, torch.Generator().manual_seed(2)))


def test_trades_on_unlabeled_images_vanishes_without_a_perturbation(tiny):
    """With epsilon = 0 the adversarial images are the clean ones: every KL, the unlabeled images' too,
    is exactly 0 and the meta-loss is the clean query cross-entropy."""
    params = tiny.init(torch.Generator().manual_seed(0))
    support, query, unlabeled = (_images(5, 1), torch.arange(5)), (_images(15, 2), torch.arange(5).repeat(3)), _images(10, 3)
    loss = trades_loss(tiny, params, support, query, LinfAttack.fgsm_rs(0.0), torch.Generator(), 5.0, unlabeled)
    assert float(loss) == float(F.cross_entropy(tiny(params, query[0]), query[1]))


def test_trades_kl_averages_over_support_query_and_unlabeled_images(tiny):
    """As MetaAdv's MetaFT: the KL of one batch cat(support, query, unlabeled) against its attacked
    copy, summed over images and divided by their number (here recomputed from the same attack noise)."""
    params = tiny.init(torch.Generator().manual_seed(0))
    support, query, unlabeled = (_images(5, 1), torch.arange(5)), (_images(15, 2), torch.arange(5).repeat(3)), _images(10, 3)
    beta = 2.0
    loss = trades_loss(tiny, params, support, query, ATTACK, torch.Generator().manual_seed(4), beta, unlabeled)
    x = torch.cat([support[0], query[0], unlabeled])
    log_p = F.log_softmax(tiny(params, x), dim=-1)
    kl_to = lambda xa: F.kl_div(F.log_softmax(tiny(params, xa), -1), log_p, log_target=True,
                                reduction="batchmean")
    adv = ATTACK(kl_to, x, torch.Generator().manual_seed(4))  # the attack the loss made, from the same noise
    per_image = (log_p.exp() * (log_p - F.log_softmax(tiny(params, adv), -1))).sum(-1)
    expected = F.cross_entropy(tiny(params, query[0]), query[1]) + beta * per_image.mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss) != pytest.approx(float(trades_loss(tiny, params, support, query, ATTACK,
                                                          torch.Generator().manual_seed(4), beta)), rel=1e-6)


def test_contrastive_term_is_nt_xent_of_an_augmented_view_and_the_adversarial_example(tiny):
    """R-MAML-AT with the contrastive task: the AT loss, computed from the same adversarial logits,
    plus weight * NT-Xent(trunk(augment(x)), trunk(x_adv)), the view drawn after the attack's start."""
    params = tiny.init(torch.Generator().manual_seed(0))
    query = (_images(15, 2), torch.arange(5).repeat(3))
    contrastive = Contrastive(weight=0.3, temperature=0.5)
    loss = adversarial_query_loss(tiny, params, query, ATTACK, torch.Generator().manual_seed(5), 1.0, contrastive)
    gen = torch.Generator().manual_seed(5)
    adv = ATTACK(cross_entropy_of(partial(tiny, frozen(params)), query[1]), query[0], gen)
    view = augment(query[0], gen)
    at = F.cross_entropy(tiny(params, query[0]), query[1]) + F.cross_entropy(tiny(params, adv), query[1])
    expected = at + 0.3 * nt_xent(tiny.trunk(params, view), tiny.trunk(params, adv), 0.5)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_unlabeled_images_come_from_the_task_classes_beside_the_same_labelled_examples(pool, tiny):
    plain = RobustMaml(tiny, CFG, "rmaml-trades", ATTACK, 5.0, 1.0)
    with_unlabeled = RobustMaml(tiny, CFG, "rmaml-trades", ATTACK, 5.0, 1.0, unlabeled_per_class=4)
    episodes = plain.sample(pool, torch.Generator().manual_seed(0))
    drawn = with_unlabeled.sample(pool, torch.Generator().manual_seed(0))
    assert isinstance(drawn, WithUnlabeled) and drawn.unlabeled.shape == (CFG.meta_batch, CFG.ways * 4)
    assert torch.equal(drawn.rows, episodes.rows) and torch.equal(drawn.classes, episodes.classes)
    for e in range(CFG.meta_batch):
        for w in range(CFG.ways):
            own = set(pool.rows_of(int(drawn.classes[e, w])).tolist())
            rows = set(drawn.unlabeled[e, 4 * w: 4 * (w + 1)].tolist())
            assert len(rows) == 4 and rows <= own and not rows & set(drawn.rows[e, w].tolist())
    _, query = with_unlabeled.tasks(drawn, pool.images)
    assert query[0].shape[1] == CFG.ways * (CFG.queries + 4) and query[1].shape[1] == CFG.ways * CFG.queries


def _todays_task_loss(model, cfg, method, params, support, query, gen):
    """The R-MAML-AT and -TRADES meta-losses as they were before the options (a reference copy)."""
    adapted = sgd_adapt(model, params, *support, steps=cfg.inner_steps, lr=cfg.inner_lr, create_graph=False)
    x, y = query
    if method == "rmaml-at":
        adv = ATTACK(cross_entropy_of(partial(model, frozen(adapted)), y), x, gen)
        return F.cross_entropy(model(adapted, x), y) + F.cross_entropy(model(adapted, adv), y)
    x = torch.cat([support[0], query[0]])
    natural = F.log_softmax(model(adapted, x), dim=-1)
    target = natural.detach()
    kl_to = lambda xa: F.kl_div(F.log_softmax(model(frozen(adapted), xa), dim=-1), target, log_target=True,
                                reduction="batchmean")
    adv = ATTACK(kl_to, x, gen)
    kl = F.kl_div(F.log_softmax(model(adapted, adv), dim=-1), natural, log_target=True, reduction="batchmean")
    return F.cross_entropy(model(adapted, query[0]), query[1]) + 5.0 * kl


@pytest.mark.parametrize("method", ["rmaml-at", "rmaml-trades"])
def test_options_off_give_todays_meta_step_bit_for_bit(pool, tiny, method):
    robust = load_config("omniglot-rmaml-quick", ["robust.unlabeled_per_class=0", "robust.contrastive_weight=0",
                                                  "robust.at_weight=1", "robust.trades_beta=5"]).robust
    learner = make_robust_learner(tiny, CFG, robust, method)
    assert learner.unlabeled_per_class == 0 and learner.contrastive is None
    params = tiny.init(torch.Generator().manual_seed(0))
    episodes = learner.sample(pool, torch.Generator().manual_seed(1))
    ours, _, our_loss = learner.train_step(params, learner.init_state(params), episodes, pool.images,
                                           torch.Generator().manual_seed(2), 0.0)
    todays = partial(_todays_task_loss, tiny, CFG, method, gen=torch.Generator().manual_seed(2))
    reference, _, loss = meta_update(params, learner.init_state(params), todays, *learner.tasks(episodes, pool.images),
                                     meta_lr=CFG.meta_lr)
    assert torch.equal(our_loss, loss)
    for k in params:
        assert torch.equal(ours[k], reference[k]), k


def test_both_options_change_the_meta_step(pool, tiny):
    params = tiny.init(torch.Generator().manual_seed(0))

    def step(**options):
        learner = RobustMaml(tiny, CFG, "rmaml-trades", ATTACK, 5.0, 1.0, **options)
        episodes = learner.sample(pool, torch.Generator().manual_seed(1))
        return learner.train_step(params, learner.init_state(params), episodes, pool.images,
                                  torch.Generator().manual_seed(2), 0.0)

    off, _, off_loss = step()
    for options in ({"unlabeled_per_class": 3}, {"contrastive": Contrastive(1.0, 0.5)}):
        on, _, loss = step(**options)
        assert bool(torch.isfinite(loss)) and float(loss) != float(off_loss)
        assert any(not torch.equal(on[k], off[k]) for k in params)


def test_learners_refuse_options_they_have_no_use_for(tiny):
    with pytest.raises(ValueError, match="TRADES KL only"):
        RobustMaml(tiny, CFG, "rmaml-at", ATTACK, 5.0, 1.0, unlabeled_per_class=2)
    with pytest.raises(ValueError, match="R-MAML learners"):
        RobustMaml(tiny, CFG, "adml", ATTACK, 5.0, 1.0, contrastive=Contrastive(1.0, 0.5))


def test_factory_gives_each_learner_only_its_options(tiny):
    robust = load_config("omniglot-rmaml-quick", ["robust.unlabeled_per_class=4", "robust.contrastive_weight=0.5",
                                                  "robust.contrastive_temperature=0.2"]).robust
    trades, at, adml = (make_robust_learner(tiny, CFG, robust, m) for m in ("rmaml-trades", "rmaml-at", "adml"))
    assert trades.unlabeled_per_class == 4 and trades.contrastive == Contrastive(0.5, 0.2)
    assert at.unlabeled_per_class == 0 and at.contrastive == Contrastive(0.5, 0.2)
    assert adml.unlabeled_per_class == 0 and adml.contrastive is None


@pytest.mark.parametrize(("overrides", "message"), [
    (["robust.unlabeled_per_class=5"], r"robust\.unlabeled_per_class: 1 \+ 15 \+ 5 .* the data has 20"),
    (["robust.unlabeled_per_class=-1"], r"robust\.unlabeled_per_class: Input should be greater than or equal to 0"),
    (["robust.contrastive_weight=-0.5"], r"robust\.contrastive_weight: Input should be greater than or equal to 0"),
    (["robust.contrastive_temperature=0"], r"robust\.contrastive_temperature: Input should be greater than or equal"),
    (["robust.contrastive_weight=1", "model.architecture=mlp"], r"robust\.contrastive_weight: .* 'mlp'"),
])
def test_bad_options_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("omniglot-rmaml-quick", overrides)


def test_the_largest_unlabeled_draw_the_data_allows_is_accepted():
    """Omniglot's 20 examples per class: 1 support + 15 queries leave 4 unlabeled images per class."""
    assert load_config("omniglot-rmaml-quick", ["robust.unlabeled_per_class=4"]).robust.unlabeled_per_class == 4
