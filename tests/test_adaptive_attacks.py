"""Adaptive backdoor attackers: each keeps the promise its paper makes about the update it sends.

One tiny federation (Conv4-8, 2-shot episodes, a few outer steps) holds one malicious user per
strategy, all attacking in rounds 1 and 2 under norm clipping; each test checks one strategy's
property on its real update from an untrained global model, or a helper on crafted values.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from scipy.stats import norm

from fedmeta.attacks.alie import z_max
from fedmeta.attacks.replacement import Replacement, clipped
from fedmeta.attacks.steering import ball, box, chain, frozen
from fedmeta.config import ConfigError, load_config
from fedmeta.data.triggers import make_trigger
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.updates import flatten
from fedmeta.meta.learner import build_learner
from fedmeta.registry import ATTACKS
from fedmeta.rng import stream
from fedmeta.scenario.backdoor import build_scenario
from fedmeta.scenario.builder import Phase, build_clients, build_server
from fedmeta.sweeps.grid import plan

STRATEGIES = {0: "boosted", 1: "replacement", 2: "projected", 3: "neurotoxin", 4: "alie", 5: "dba", 6: "dba"}
CLIP = 0.5
EPS = 0.002
TINY = [
    "model.filters=8", "meta.shots=2", "meta.inner_steps=2", "meta.meta_batch=2", "federation.episodes=4",
    "federation.users=15", "federation.per_round=8", "federation.min_updates=8", "federation.rule=clip",
    f"rules.clip.norm={CLIP}", f"attacks.projected.eps={EPS}", "attacks.alie.z=0.5", "eval.episodes=3", "eval.steps=2",
    "attack.attackers=[" + ", ".join(f"{{user={u}, strategy='{s}', rounds=[1, 2]}}" for u, s in STRATEGIES.items()) + "]",
    *(f"attacks.{s}.{k}={v}" for s in set(STRATEGIES.values()) for k, v in (("episodes", 4), ("inner_epochs", 1))),
]
SETTINGS = RoundSettings(1)


@pytest.fixture(scope="module")
def cfg():
    return load_config("omniglot-exp1a-quick", TINY)


@pytest.fixture(scope="module")
def scenario(cfg, omniglot):
    return build_scenario(cfg, "a")


@pytest.fixture(scope="module")
def clients(cfg, scenario):
    return build_clients(cfg, Phase(), scenario)


@pytest.fixture(scope="module")
def start(cfg, scenario):
    return build_learner(cfg, scenario.images.shape[1:]).model.init(stream(0, "test-init"))


def test_every_strategy_attacks_in_two_rounds_statelessly(cfg, scenario, start):
    server = build_server(cfg, Phase(), scenario)
    params, sent = start, {}
    for r in (1, 2):
        settings = RoundSettings(r)
        updates = server.updates(params, settings)
        assert set(STRATEGIES) <= {u.user for u in updates}
        sent[r] = {u.user: u for u in updates}
        before = params
        params, report = server.aggregate(params, updates, settings)
        assert set(STRATEGIES) <= set(report.aggregated) and not report.rejected
    for user in STRATEGIES:  # round 2 starts from round 1's model; nothing carried over
        again = server.clients[user].update(before, RoundSettings(2))
        assert all(torch.equal(again.delta[k], sent[2][user].delta[k]) for k in again.delta)
        assert not torch.equal(flatten(sent[1][user].delta), flatten(sent[2][user].delta))


def test_the_target_way_is_random_or_the_papers_last(cfg, scenario, clients):
    """``attack.target_way`` reaches the attacker's episodes: "last" puts the target slot (class
    -1) at the N-th way of every episode (the paper's "N-th model output"); the default at any."""
    def target_ways(client) -> set[int]:  # over 10 outer steps' episodes
        episodes = [client.sample(torch.Generator().manual_seed(i)) for i in range(10)]
        return {w for e in episodes for w in (e.classes == -1).int().argmax(1).tolist()}

    last = build_clients(load_config("omniglot-exp1a-quick", [*TINY, "attack.target_way=last"]), Phase(), scenario)
    assert target_ways(last[0]) == {cfg.meta.ways - 1}
    assert len(target_ways(clients[0])) > 1


def trained(attacker, start) -> torch.Tensor:
    """What ``attacker`` trains this round, steered as it plans, before it scales what it sends."""
    return flatten(attacker.trained(start, SETTINGS, attacker.steering(start, SETTINGS)).delta)


def test_replacement_trains_inside_the_clip_norm_then_sends_gamma_times_it_clipped(clients, start):
    """Bagdasaryan's code under a norm bound S: every step projected into the S-ball, then the
    update scaled by gamma = n / f = 8 / 7 and clipped to S. Under a tight clip (EPS) training
    presses against the ball and S is sent; under the loose one (CLIP) it stays inside and gamma
    times it is sent."""
    attacker = clients[1]
    tight = replace(attacker, ctx=replace(attacker.ctx, rule_options={**attacker.ctx.rule_options, "norm": EPS}))
    assert flatten(attacker.training.update(start, SETTINGS).delta).norm().item() > 2 * EPS  # free training leaves it
    pressed = trained(tight, start)
    assert pressed.norm().item() == pytest.approx(EPS, rel=1e-5)  # the projection holds it on the sphere
    sent = flatten(tight.update(start, SETTINGS).delta)
    torch.testing.assert_close(sent, pressed, rtol=1e-5, atol=1e-9)  # 8/7 of it, clipped back to EPS
    inside = trained(attacker, start)
    assert inside.norm().item() < CLIP * 7 / 8
    torch.testing.assert_close(flatten(attacker.update(start, SETTINGS).delta), inside * 8 / 7, rtol=1e-5, atol=1e-9)


def test_replacement_without_a_cap_bounds_by_the_estimated_benign_median(clients, start):
    attacker = clients[1]
    blind = replace(attacker, ctx=replace(attacker.ctx, rule="median", rule_options={}), slack=2.0)
    benign = blind.ctx.benign_updates(start, SETTINGS, blind.estimates)
    assert len({round(float(n), 9) for n in benign.norm(dim=1)}) == blind.estimates  # distinct draws
    bound = 2.0 * float(benign.norm(dim=1).median())  # odd count: the middle one
    inside = trained(blind, start).norm().item()
    assert inside <= bound * (1 + 1e-5)
    sent = flatten(blind.update(start, SETTINGS).delta).norm().item()
    assert sent == pytest.approx(min(8 / 7 * inside, bound), rel=1e-5)


def test_clipped_shortens_only_what_is_longer():
    assert torch.allclose(clipped(torch.tensor([3.0, 4.0]), 1.0), torch.tensor([0.6, 0.8]))
    assert torch.equal(clipped(torch.tensor([0.3, 0.4]), 1.0), torch.tensor([0.3, 0.4]))
    assert torch.equal(clipped(torch.zeros(2), 1.0), torch.zeros(2))


def test_replacement_against_plain_fedavg_scales_by_n_over_f(clients, start):
    """Bagdasaryan's gamma = n / eta (eta = 1), shared by the f = 7 colluders of the round: with
    n = 7 averaged updates the raw update (gamma = 1), with n = 8 exactly 8/7 of it, and 7 times it
    when the other six attack in another round (f counts this round's attackers only). FedAvg
    checks nothing, so by default there is no anomaly term (alpha_unchecked = 1): the raw update is
    plain poisoned training; with the term kept (alpha_unchecked = alpha), the direction sent
    against the clip."""
    attacker = clients[1]

    def sent(n: int, ctx: dict | None = None, **change) -> torch.Tensor:
        fedavg = replace(attacker, ctx=replace(attacker.ctx, rule="fedavg", averaged=n, **(ctx or {})), **change)
        return flatten(fedavg.update(start, SETTINGS).delta)

    assert torch.allclose(sent(8), sent(7) * 8 / 7, rtol=1e-5, atol=1e-8)
    later = {u: (1,) if u == attacker.ctx.user else (2,) for u in attacker.ctx.attack_rounds}
    assert attacker.ctx.attacking(1) == 7 and replace(attacker.ctx, attack_rounds=later).attacking(1) == 1
    assert torch.allclose(sent(7, {"attack_rounds": later}), sent(7) * 7, rtol=1e-5, atol=1e-7)
    estimated = []  # the benign updates it estimates: none, even for a benign-mean anomaly term, at weight 0
    estimate = type(attacker.ctx).benign_updates
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(attacker.ctx), "benign_updates", lambda ctx, *a: estimated.append(1) or estimate(ctx, *a))
        plain_sent = sent(7, anomaly="benign")
        assert not estimated
        sent(7, anomaly="benign", alpha_unchecked=attacker.alpha)
        assert estimated
    plain = flatten(attacker.training.update(start, SETTINGS).delta)
    torch.testing.assert_close(plain_sent, plain, rtol=1e-5, atol=1e-7)
    clipped = flatten(attacker.update(start, SETTINGS).delta)
    kept = sent(7, alpha_unchecked=attacker.alpha)
    assert torch.nn.functional.cosine_similarity(kept, clipped, dim=0).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.nn.functional.cosine_similarity(plain, clipped, dim=0).item() < 1 - 1e-5


def test_replacement_step_descends_the_weighted_loss(clients):
    """theta + alpha (theta' - theta) - (1 - alpha) eps v / ||v||, v = (theta - theta_G) - r: the
    gradient of Bagdasaryan's plain L2 anomaly term, by hand (v = (0.5, 1), ||v|| = sqrt(1.25));
    no pull at v = 0."""
    attacker: Replacement = clients[1]
    eps = attacker.training.learner.cfg.meta_lr
    anchor, before, after = {"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 2.0])}
    step = attacker.constrained(anchor, torch.tensor([0.5, 0.0]))(before, after, 0.0)
    alpha, length = attacker.alpha, 1.25**0.5
    expected = torch.tensor([1 + alpha * 2 - (1 - alpha) * eps * 0.5 / length, 2 - (1 - alpha) * eps * 1.0 / length])
    assert torch.allclose(step["w"], expected)
    at_reference = attacker.constrained(anchor, torch.tensor([1.0, 1.0]))(before, after, 0.0)
    assert torch.allclose(at_reference["w"], torch.tensor([1 + alpha * 2, 2.0]))


def test_projected_stays_in_the_ball(clients, start):
    attacker = clients[2]
    free = flatten(attacker.training.update(start, SETTINGS).delta).norm().item()
    sent = flatten(attacker.update(start, SETTINGS).delta).norm().item()
    assert free > 2 * EPS  # the projection is active...
    assert sent <= EPS * (1 + 1e-5) and sent == pytest.approx(EPS, rel=1e-4)  # ...and holds
    assert replace(attacker, eps="rule").radius(start, SETTINGS) == CLIP  # by default: the rule's cap


def test_ball_box_and_frozen_on_crafted_weights():
    anchor = {"w": torch.tensor([1.0, 1.0])}
    far, near = {"w": torch.tensor([4.0, 5.0])}, {"w": torch.tensor([1.3, 1.4])}
    assert torch.allclose(ball(anchor, 1.0)(anchor, far, 0.0)["w"], torch.tensor([1.6, 1.8]))  # 3-4-5 triangle
    assert torch.allclose(ball(anchor, 1.0)(anchor, near, 0.0)["w"], near["w"])
    clamped = box(anchor, torch.tensor([-1.0, 0.0]), torch.tensor([2.0, 0.2]))(anchor, far, 0.0)
    assert torch.allclose(clamped["w"], torch.tensor([3.0, 1.2]))
    kept = frozen(anchor, torch.tensor([True, False]))(anchor, far, 0.0)
    assert torch.equal(kept["w"], torch.tensor([1.0, 5.0]))
    shift = lambda before, after, progress: {"w": after["w"] + 3.0}  # noqa: E731  far + 3 = (7, 8): the ray (6, 7)
    shifted = chain(shift, ball(anchor, 1.0))
    assert torch.allclose(shifted(anchor, far, 0.0)["w"], torch.tensor([1.0 + 6 / 85**0.5, 1.0 + 7 / 85**0.5]))


def test_neurotoxin_leaves_the_benign_top_coordinates_exactly_untouched(clients, start):
    attacker = clients[3]
    mask = attacker.mask(start, SETTINGS)
    assert int(mask.sum()) == math.floor(attacker.top * mask.numel())
    free = flatten(attacker.training.update(start, SETTINGS).delta)
    sent = flatten(attacker.update(start, SETTINGS).delta)
    assert (free[mask] != 0).any()  # unconstrained training would change them
    assert (sent[mask] == 0).all() and (sent[~mask] != 0).float().mean() > 0.5


def test_neurotoxin_ranks_coordinates_by_the_mean_of_its_estimates(clients, start):
    """With ``estimates = 3`` the mask is the top-k of |mean of three honest updates|, not of one."""
    attacker = replace(clients[3], estimates=3)
    benign = attacker.ctx.benign_updates(start, SETTINGS, 3)
    k = math.floor(attacker.top * benign.shape[1])
    mask = attacker.mask(start, SETTINGS)
    assert torch.equal(mask.nonzero().flatten(), benign.mean(dim=0).abs().topk(k).indices.sort().values)
    assert not torch.equal(mask, clients[3].mask(start, SETTINGS))


def test_alie_update_stays_within_benign_mean_plus_minus_z_std(clients, start):
    """The box is the estimates' mean -/+ z times their population std (the authors' np.var ** 0.5)."""
    attacker = clients[4]
    low, high = attacker.bounds(start, SETTINGS)
    benign = attacker.ctx.benign_updates(start, SETTINGS, attacker.estimates)
    spread = attacker.z * (benign - benign.mean(dim=0)).pow(2).mean(dim=0).sqrt()
    torch.testing.assert_close(high - low, 2 * spread)
    free = flatten(attacker.training.update(start, SETTINGS).delta)
    sent = flatten(attacker.update(start, SETTINGS).delta)
    tol = 1e-6 * float(flatten(start).abs().max())  # (theta_G + d) - theta_G rounds d at theta_G's scale
    assert ((free < low) | (free > high)).any()  # unconstrained training leaves the box
    assert (sent >= low - tol).all() and (sent <= high + tol).all()


def test_alie_z_follows_baruch_et_al():
    assert z_max(3, 1) == pytest.approx(norm.ppf(2 / 3))  # s = 2 - 1 = 1
    assert z_max(10, 2) == pytest.approx(0.2533471)  # s = 6 - 2 = 4: Phi^-1(0.6)
    assert z_max(50, 12) == pytest.approx(norm.ppf(36 / 50))  # s = 26 - 12 = 14
    with pytest.raises(ValueError, match=r"z_max = Phi\^-1\(1/2\) = 0"):
        z_max(10, 1)  # s = 5 = n / 2: the box would be the benign mean itself
    with pytest.raises(ValueError, match="attacks.alie.z"):
        z_max(3, 2)


def test_trigger_split_into_disjoint_parts_that_make_the_whole():
    trigger = make_trigger("patch", (28, 28, 1), size=4)
    parts = trigger.split(4)
    masks = torch.stack([p.mask for p in parts])
    assert torch.equal(masks.sum(0), trigger.mask) and masks.max() == 1
    blank = torch.zeros(1, 28, 28, 1, dtype=torch.uint8)
    for i, part in enumerate(parts):  # a 4x4 patch one pixel from the bottom-right: stripe i is row 23 + i
        changed = part.apply(blank)[0, ..., 0] != 0
        assert changed.sum() == 4 and changed[23 + i, 23:27].all()
    whole = blank
    for part in parts:
        whole = part.apply(whole)
    assert torch.equal(whole, trigger.apply(blank))
    with pytest.raises(ValueError, match="17 parts"):
        trigger.split(17)


def test_the_dba_trigger_splits_into_the_references_four_separated_lines():
    """DBA's reference layout ("gap 3 size 1*6"): four 1 x 6 lines, two per row, 3 pixels apart."""
    trigger = make_trigger("dba", (28, 28, 1), size=6, position="top-left")
    assert trigger.mask.sum() == 24
    blank = torch.zeros(1, 28, 28, 1, dtype=torch.uint8)
    lines = [(1, slice(1, 7)), (1, slice(10, 16)), (5, slice(1, 7)), (5, slice(10, 16))]  # one pixel from the border
    for part, (row, cols) in zip(trigger.split(4), lines, strict=True):
        changed = part.apply(blank)[0, ..., 0] != 0
        assert changed.sum() == 6 and changed[row, cols].all()
    gray = torch.full((1, 28, 28, 1), 100, dtype=torch.uint8)
    assert (trigger.apply(gray)[0, 1:6, 1:16, 0] == 100).sum() == 5 * 15 - 24  # the gaps keep the image
    assert [p.mask.sum().item() for p in trigger.split(2)] == [12, 12]  # a row of two lines each


def test_the_dba_trigger_takes_the_references_mnist_layout():
    """``utils/mnist_params.yaml`` ("gap 2 size 1*4"): pixels (0, 0-3), (0, 6-9), (3, 0-3), (3, 6-9)."""
    trigger = make_trigger("dba", (28, 28, 1), size=4, gap=2, position="top-left", margin=0)
    reference = {(r, c) for r in (0, 3) for c in (*range(4), *range(6, 10))}
    assert {tuple(p) for p in trigger.mask[..., 0].nonzero().tolist()} == reference
    matrix = plan("omniglot-matrix-quick", [], [], None).base.attack.trigger  # every attack keyed alike
    assert (matrix.pattern, matrix.size, matrix.thickness, matrix.gap) == ("dba", 4, 1, 2)


def test_a_fixed_trigger_seed_keys_every_run_seed_alike(omniglot):
    blend = ["attack.trigger.pattern=blend", "attack.trigger.opacity=0.2"]

    def key(seed: int, *extra: str) -> torch.Tensor:
        cfg = load_config("omniglot-exp1a-quick", [*blend, f"seed={seed}", *extra])
        return build_scenario(cfg, "a").trigger.pattern

    assert not torch.equal(key(0), key(1))  # by default each seed draws a key of its own
    assert torch.equal(key(1, "attack.trigger.seed=0"), key(0))
    with pytest.raises(ConfigError, match="seed: pattern 'patch' is not drawn at random"):
        load_config("omniglot-exp1a-quick", ["attack.trigger.seed=0"])


def test_dba_attackers_carry_only_their_part_of_the_trigger(scenario, clients):
    parts = scenario.trigger.split(2)
    assert set(scenario.part_rows) == {5, 6} and clients[5].sample.__self__.backdoor_rows is scenario.part_rows[5]
    own = [scenario.images[scenario.part_rows[u]] for u in (5, 6)]
    whole = scenario.images[scenario.attack_rows]  # what attack-train accuracy is measured on
    # the clean images: user 6's images off its part are clean, and so are user 5's off its part
    clean = torch.where(parts[0].mask.bool(), own[1], own[0])
    for part, keyed in zip(parts, own):
        assert torch.equal(part.apply(clean), keyed)
    assert not torch.equal(parts[0].apply(clean), clean) and not torch.equal(parts[1].apply(clean), clean)
    assert torch.equal(scenario.trigger.apply(clean), whole)  # the union is the whole trigger


def test_attack_option_errors_name_the_key():
    cases = {"attacks.neurotoxin.top=1.5": "neurotoxin.top", "attacks.alie.estimates=1": "alie.estimates",
             "attacks.projected.eps=0": "projected.eps", "attacks.replacement.anomaly='far'": "replacement.anomaly",
             "attacks.replacement.alpha=0": "replacement.alpha", "attacks.dba.boost=-1": "dba.boost",
             "attacks.alie.zz=1": "alie.zz"}
    for override, key in cases.items():
        with pytest.raises(ConfigError, match=key):
            load_config("omniglot-exp1a-quick", [override])


def test_rule_aware_attacks_are_registered_as_such():
    assert {n for n in ATTACKS.names() if ATTACKS.get(n).info.get("knows_rule")} == {"replacement", "projected"}
    assert [n for n in ATTACKS.names() if ATTACKS.get(n).info.get("split_trigger")] == ["dba"]


def test_rule_seen_keys_norm_reading_attacks_by_the_norm_alone():
    """Replacement and projected read only the norm a rule lets through: rules without a cap share
    their cached attack round, a cap's value splits it, and a rule-blind attack sees nothing;
    replacement alone sends another update under plain FedAvg."""
    from fedmeta.attacks.strategies import rule_seen
    from fedmeta.config.sections import AttackerConfig

    norm = [AttackerConfig(strategy="replacement"), AttackerConfig(user=1, strategy="projected")]
    assert rule_seen(norm, "median", {}) == rule_seen(norm, "krum", {"byzantine": 1}) == ["estimated"]
    assert rule_seen(norm, "fedavg", {}) == ["unchecked"]
    assert rule_seen(norm, "clip", {"norm": 0.2, "noise": 0.0}) == ["cap", 0.2] != rule_seen(norm, "clip", {"norm": 0.3})
    assert rule_seen([AttackerConfig()], "clip", {"norm": 0.2}) is None
    assert rule_seen(norm, "clip:tight", {"norm": 0.1}) == ["cap", 0.1]  # a variant: its rule, its own cap
    # projected keeps inside the estimated bound under FedAvg too: its FedAvg round is the others'
    pgd = [AttackerConfig(strategy="projected"), AttackerConfig(user=1, strategy="projected")]
    assert rule_seen(pgd, "fedavg", {}) == rule_seen(pgd, "median", {}) == ["estimated"]
    assert rule_seen(pgd, "clip", {"norm": 0.2}) == ["cap", 0.2]
