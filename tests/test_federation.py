"""The federation and the backdoor attack: partitions, schedule, aggregation, poisoning, resume."""

from __future__ import annotations

import logging

import pytest
import torch

from fedmeta.attacks.backdoor import poisoned_episodes, share_examples
from fedmeta.config import load_config
from fedmeta.data.triggers import make_trigger
from fedmeta.experiments import run
from fedmeta.scenario.backdoor import build_scenario
from fedmeta.federation.aggregation import ClipNoise, FedAvg, Krum, Median, TrimmedMean
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.schedule import Schedule
from fedmeta.federation.server import Server
from fedmeta.federation.updates import ClientUpdate
from fedmeta.plots import _grid
from fedmeta.runs import RunDir


@pytest.fixture(scope="module")
def cfg():
    return load_config("omniglot-exp1a-quick")


@pytest.fixture(scope="module")
def scenarios(cfg, omniglot):
    return {case: build_scenario(cfg, case) for case in "abc"}


def _names(pool, classes=None):
    return {pool.names[c] for c in (range(pool.num_classes) if classes is None else classes)}


def test_users_hold_disjoint_whole_characters(scenarios):
    s = scenarios["a"]
    chars = [{n.rsplit("/", 1)[0] for n in _names(pool) if "/rot" in n} for pool in s.users]
    assert sum(len(c) for c in chars) == 1200
    for i in range(len(chars)):
        for j in range(i + 1, len(chars)):
            assert not chars[i] & chars[j]
    assert all(len(c) == 300 for c in chars)


def test_cases_put_backdoor_classes_exactly_where_they_belong(scenarios, cfg):
    reserved = lambda pool: {n for n in _names(pool) if "/rot" not in n}  # noqa: E731
    target_name = scenarios["a"].everyone.pool.names[scenarios["a"].everyone.target]
    for case, s in scenarios.items():
        assert reserved(s.users[s.attackers[0]]) == set()  # the attacker holds no reserved class
        for u in s.benign:
            held = reserved(s.users[u])
            assert target_name in held
            assert len(held) == (1 if case == "a" else 1 + cfg.attack.backdoor_classes)
        assert (len(s.everyone.backdoors) > 0) == (case == "c")  # backdoors in fine-tuning only in c
        assert not reserved(s.test) & reserved(s.users[s.benign[0]])  # reserved classes are not meta-test classes
        assert s.test.num_classes == 418


def test_benign_users_never_see_keyed_images(scenarios):
    s = scenarios["c"]
    keyed = set(s.attack_rows.tolist()) | set(s.validation_rows.tolist())
    for u in s.benign:
        pool = s.users[u]
        assert not keyed & set(pool.index[pool.index >= 0].tolist())


def test_only_keyed_backdoor_images_carry_the_target_label(scenarios):
    s = scenarios["a"]
    own = s.users[s.attackers[0]]
    eps = poisoned_episodes(own, s.target_rows, s.attack_rows, episodes=50, ways=5, shots=10, backdoor_share=0.4,
                            gen=torch.Generator().manual_seed(0))
    keyed = set(s.attack_rows.tolist())
    slot = eps.classes == -1
    assert (slot.sum(1) == 1).all()  # exactly one target slot per episode
    target_rows = eps.rows[slot]  # [episodes, shots]
    for rows in target_rows:
        assert sum(r in keyed for r in rows.tolist()) == 4  # X_B : X_T = 2 : 3 of 10 shots
        assert set(rows.tolist()) <= keyed | set(s.target_rows.tolist())
    assert not keyed & set(eps.rows[~slot].flatten().tolist())  # no keyed image outside the target slot


def test_poisoned_episodes_have_queries_for_maml(scenarios):
    """MAML's outer loss is on the queries: an attacker's episodes without them would send a zero update."""
    s = scenarios["a"]
    eps = poisoned_episodes(s.users[s.attackers[0]], s.target_rows, s.attack_rows, episodes=20, ways=5, shots=1,
                            queries=4, backdoor_share=0.4, gen=torch.Generator().manual_seed(0))
    assert eps.rows.shape == (20, 5, 5) and eps.query.shape == (20, 20)
    keyed = set(s.attack_rows.tolist())
    slot = eps.rows[eps.classes == -1]  # [episodes, 1 + 4]: 2 keyed of 5, anywhere in support or queries
    assert all(sum(r in keyed for r in rows.tolist()) == 2 for rows in slot)


def test_keyed_images_differ_from_their_originals_only_in_the_trigger(scenarios, cfg):
    s = scenarios["a"]
    trig = s.trigger
    keyed = s.images[s.attack_rows]
    assert (keyed[:, -5:-1, -5:-1] == 255).all()  # a 4x4 patch, one pixel from the bottom-right corner
    outside = trig.mask[..., 0] == 0
    originals = trig.apply(keyed)  # stamping again changes nothing: the key is all there is
    assert torch.equal(originals, keyed) and outside.sum() == 28 * 28 - 16


@pytest.mark.parametrize("pattern", ["patch", "checker", "line", "blend", "dba"])
def test_trigger_patterns(pattern):
    images = torch.zeros(2, 28, 28, 1, dtype=torch.uint8)
    trig = make_trigger(pattern, (28, 28, 1), size=6, position="top-left", opacity=0.5, gen=torch.Generator().manual_seed(0))
    keyed = trig.apply(images)
    assert keyed.dtype == torch.uint8 and keyed.shape == images.shape
    changed = keyed != 0
    if pattern == "blend":
        assert changed.float().mean() > 0.9 and int(keyed.max()) <= 128  # everywhere, at half opacity
    else:
        assert not changed[:, 7:, 7:].any() and changed[:, 1:7, 1:7].any()  # only in the top-left box
        assert int(keyed.max()) == 128  # 255 at opacity 0.5


def test_reserved_shares_are_disjoint_and_capped():
    shares = share_examples(600, 100, 50, 480, torch.Generator().manual_seed(0))
    parts = [set(p.tolist()) for p in (shares.attacker, shares.held_out, shares.benign)]
    assert [len(p) for p in parts] == [100, 50, 450]  # benign capped at what is left
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]


def test_schedule_picks_the_attacker_exactly_once():
    schedule = Schedule(users=4, per_round=3, seed=0, attackers={0: (1,)})
    picks = {r: schedule.participants(r) for r in range(0, 60)}
    assert [r for r, users in picks.items() if 0 in users] == [1]
    assert all(len(users) == 3 for users in picks.values())
    assert all(0 not in schedule.participants(r, "pretrain") for r in range(5))


def test_schedule_samples_benign_users_with_the_seed():
    a = Schedule(users=10, per_round=3, seed=0)
    b = Schedule(users=10, per_round=3, seed=1)
    assert [a.participants(r) for r in range(20)] != [b.participants(r) for r in range(20)]
    assert a.participants(7) == Schedule(users=10, per_round=3, seed=0).participants(7)


GEN = torch.Generator()
EQUAL4 = torch.full((4,), 0.25)
# three honest updates near (1, 1) and one outlier (the boosted attacker)
CRAFTED = torch.tensor([[1.0, 1.0], [1.2, 0.8], [0.9, 1.1], [30.0, -30.0]])


def test_fedavg_equals_hand_computed_value():
    updates = torch.tensor([[1.0, 2.0], [3.0, -2.0], [5.0, 6.0]])
    assert torch.allclose(FedAvg()(updates, torch.full((3,), 1 / 3), GEN), torch.tensor([3.0, 2.0]))
    assert torch.allclose(FedAvg()(updates, torch.tensor([0.5, 0.25, 0.25]), GEN), torch.tensor([2.5, 2.0]))
    assert torch.allclose(FedAvg()(CRAFTED, EQUAL4, GEN), torch.tensor([33.1 / 4, -27.1 / 4]))  # the outlier wins


def test_median_ignores_the_outlier():
    assert torch.allclose(Median()(CRAFTED, EQUAL4, GEN), torch.tensor([1.1, 0.9]))  # mean of the 2 middle values
    assert torch.allclose(Median()(CRAFTED[:3], EQUAL4[:3], GEN), torch.tensor([1.0, 1.0]))


def test_trimmed_mean_drops_extremes():
    assert torch.allclose(TrimmedMean(0.25)(CRAFTED, EQUAL4, GEN), torch.tensor([1.1, 0.9]))
    with pytest.raises(ValueError):
        TrimmedMean(0.5)(CRAFTED, EQUAL4, GEN)


def test_krum_and_multi_krum_select_honest_updates():
    # f = 1: each score sums the n - f - 2 = 1 smallest squared distances
    assert torch.allclose(Krum(1, 1)(CRAFTED, EQUAL4, GEN), torch.tensor([1.0, 1.0]))  # closest to another honest one
    assert torch.allclose(Krum(1, 2)(CRAFTED, EQUAL4, GEN), torch.tensor([0.95, 1.05]))  # (1,1) and (0.9,1.1)
    assert torch.allclose(Krum(1, 3)(CRAFTED, EQUAL4, GEN), torch.tensor([3.1 / 3, 2.9 / 3]))


def test_clipping_bounds_every_update_and_noise_is_seeded():
    clipped = ClipNoise(norm=2.0)(CRAFTED, EQUAL4, GEN)
    outlier = torch.tensor([30.0, -30.0]) * (2.0 / (30 * 2**0.5))
    assert torch.allclose(clipped, (CRAFTED[:3].sum(0) + outlier) / 4)
    noisy = [ClipNoise(2.0, 0.5)(CRAFTED, EQUAL4, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])


def test_secure_aggregation_refuses_rules_that_need_each_update():
    from fedmeta.config import ConfigError

    with pytest.raises(ConfigError, match="federation.rule = 'median' needs every update on its own"):
        load_config("omniglot-exp1a-quick", ["federation.secure_aggregation=true", "federation.rule=median"])
    from fedmeta.registry import RULES

    assert [n for n in RULES.names() if not RULES.get(n).info.get("individual", True)] == ["fedavg"]


class _Fixed:
    def __init__(self, user, value, examples=1):
        self.user, self.value, self.examples = user, value, examples

    def update(self, params, settings):
        return ClientUpdate(self.user, {"w": torch.full((2,), self.value)}, self.examples)


def test_server_applies_boosted_attacker_and_size_weights():
    schedule = Schedule(users=3, per_round=3, seed=0)
    clients = {0: _Fixed(0, 9.0, 1), 1: _Fixed(1, 0.0, 1), 2: _Fixed(2, 3.0, 2)}
    params = {"w": torch.ones(2)}
    equal, _ = Server(clients, schedule, FedAvg(), 3, "equal").round(params, RoundSettings(1))
    sized, _ = Server(clients, schedule, FedAvg(), 3, "size").round(params, RoundSettings(1))
    assert torch.allclose(equal["w"], torch.full((2,), 1 + 12 / 3))
    assert torch.allclose(sized["w"], torch.full((2,), 1 + (9 + 0 + 6) / 4))


def test_a_server_that_only_sums_applies_every_update_not_the_first_min_updates():
    schedule = Schedule(users=3, per_round=3, seed=0)
    clients = {0: _Fixed(0, 9.0), 1: _Fixed(1, 0.0), 2: _Fixed(2, 3.0)}
    params = {"w": torch.ones(2)}
    summed, report = Server(clients, schedule, FedAvg(), 2, sums=True).round(params, RoundSettings(1))
    assert torch.allclose(summed["w"], torch.full((2,), 1 + 12 / 3)) and report.aggregated == [0, 1, 2]
    first, report = Server(clients, schedule, FedAvg(), 2).round(params, RoundSettings(1))
    assert len(report.aggregated) == 2  # M_min: the first two to arrive
    assert torch.allclose(first["w"], 1 + sum(clients[u].value for u in report.aggregated) / 2 * torch.ones(2))


def test_non_finite_update_is_rejected_and_logged(caplog):
    schedule = Schedule(users=3, per_round=3, seed=0)
    clients = {0: _Fixed(0, float("nan")), 1: _Fixed(1, 1.0), 2: _Fixed(2, float("inf"))}
    with caplog.at_level(logging.WARNING):
        params, report = Server(clients, schedule, FedAvg(), 3).round({"w": torch.zeros(2)}, RoundSettings(4))
    assert torch.equal(params["w"], torch.ones(2))  # only the finite update, at full weight
    assert sorted(report.rejected) == [0, 2] and report.aggregated == [1]
    assert "rejected the update of user 0" in caplog.text and "round 4" in caplog.text


def test_a_rule_that_returns_a_non_finite_update_stops_the_round_by_name():
    from fedmeta.runtime import Diverged

    class Broken:
        def __call__(self, updates, weights, gen, users=None):
            return updates.sum(0) * float("nan")

    clients = {0: _Fixed(0, 1.0), 1: _Fixed(1, 2.0)}
    with pytest.raises(Diverged, match="main round 2: the rule Broken returned a non-finite update from 2 finite ones"):
        Server(clients, Schedule(users=2, per_round=2, seed=0), Broken(), 2).round({"w": torch.zeros(2)},
                                                                                   RoundSettings(2))


TINY = [
    "model.filters=8", "meta.shots=2", "meta.inner_steps=2", "meta.meta_batch=2", "federation.episodes=4",
    "federation.rounds=2", "pretrain.rounds=1", "pretrain.episodes=4", "attacks.boosted.episodes=4", "attacks.boosted.inner_epochs=1",
    "eval.episodes=3", "eval.steps=2",
]
FINETUNE = ["finetune.steps=4", "finetune.every=2", "finetune.episodes=2"]


def _run(path, preset, overrides=()):
    per_user = hasattr(load_config(preset), "finetune")  # Experiments 2, 3 and the comparison
    cfg = load_config(preset, TINY + (FINETUNE if per_user else []) + list(overrides))
    folder = RunDir.open(path, cfg)
    run(cfg, folder)
    return folder


def test_rounds_run_logs_every_round_and_resumes_exactly(tmp_path, omniglot, killed_at_checkpoint):
    reference = _run(tmp_path / "ref", "omniglot-exp1a-quick")
    records = reference.records()
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert 0 in records[1]["participants"] and 0 in records[1]["aggregated"]  # the attacker joins round 1 only
    assert all(0 not in r.get("participants", []) for r in records if r["round"] != 1)
    with killed_at_checkpoint(3):  # after logging round 2, before its checkpoint
        _run(tmp_path / "killed", "omniglot-exp1a-quick")
    assert _run(tmp_path / "killed", "omniglot-exp1a-quick").records() == records


def test_finetune_run_writes_curves_per_case_and_user(tmp_path, omniglot):
    folder = _run(tmp_path / "ft", "omniglot-exp2-quick", ["attack.cases=['a', 'c']"])
    records = folder.records()
    assert {(r["case"], r["user"]) for r in records} == {(c, u) for c in "ac" for u in (1, 2, 3)}
    assert sorted({r["step"] for r in records}) == [0, 2, 4]
    for r in records:
        for name in ("meta_test_accuracy", "main_task_accuracy", "attack_train_accuracy", "attack_val_accuracy"):
            assert 0.0 <= r[name] <= 1.0


def test_a_clean_twin_follows_the_same_defense_from_the_round_without_attackers(tmp_path, omniglot,
                                                                                 killed_at_checkpoint):
    """Its attack accuracies are what a run without the attack logs as its own (same user, episodes,
    delta-mix and streams), the lift is the difference, the attacked curves are those of a run
    without a twin, and a killed run resumes to the same lines."""
    twin = ["attack.cases=['a']", "finetune.users=2", "finetune.clean_twin=true"]
    attacked = _run(tmp_path / "attacked", "omniglot-exp3-quick", twin).records()
    clean = _run(tmp_path / "clean", "omniglot-exp3-quick", [*twin, "attack.enabled=false"]).records()  # its own twin
    plain = _run(tmp_path / "plain", "omniglot-exp3-quick", twin[:2]).records()
    assert len(attacked) == len(clean) == 6  # 2 users x steps 0, 2, 4
    assert [{k: r[k] for k in plain[0]} for r in attacked] == plain  # the twin leaves the attacked curves as they were
    for a, c in zip(attacked, clean, strict=True):
        assert a["clean_meta_test_accuracy"] == c["meta_test_accuracy"]
        assert a["clean_attack_train_accuracy"] == c["attack_train_accuracy"]
        assert a["clean_attack_val_accuracy"] == c["attack_val_accuracy"]
        assert a["attack_val_lift"] == pytest.approx(a["attack_val_accuracy"] - c["attack_val_accuracy"], abs=2e-6)
        assert "clean_attack_val_accuracy" not in c
    with killed_at_checkpoint(3):  # after user 2's lines, before its checkpoint: both models restored
        _run(tmp_path / "killed", "omniglot-exp3-quick", twin)
    assert _run(tmp_path / "killed", "omniglot-exp3-quick", twin).records() == attacked
    fig = _grid(attacked, rows=["a"], cols=[1, 2], axis="step")  # fedmeta plot: the twin dashed in each panel
    dashed = [[ln.get_label() for ln in ax.get_lines() if ln.get_linestyle() == "--"] for ax in fig.axes]
    assert dashed == [["attack validation, clean twin"]] * 2


def test_cache_keys_of_the_presets_stay_what_they_were():
    """A new config key at its default must not re-key the cache: every pre-training, attack round
    and clean row cached on a user's machine (hours of CPU) would be computed again. The pins are
    the keys of 2026-12-07; change them only with a deliberate change of what an entry holds."""
    from fedmeta.federation.client import RoundSettings
    from fedmeta.scenario.cache import attack_round_key, clean_local_key, pretrain_key

    compare, mini = load_config("omniglot-compare-quick"), load_config("miniimagenet-compare-quick")
    first = RoundSettings(1, "main")
    assert pretrain_key(compare, "a") == "ac1495fac0a610e2"
    assert attack_round_key(compare, "a", first) == "775c9d6840d744c5"
    assert clean_local_key(compare, "a", compare.federation.rule, ("matching", False)) == "c0334bf2d9b2e839"
    assert (pretrain_key(mini, "a"), clean_local_key(mini, "a", mini.federation.rule, ("matching", False))) == (
        "7fc15cdceae8ec6a", "715625886ade3414")


def test_pretraining_cache_key_ignores_what_the_rule_does_not_read():
    from fedmeta.scenario.cache import pretrain_key

    base = pretrain_key(load_config("omniglot-exp1a-quick"), "a")
    assert pretrain_key(load_config("omniglot-exp1a-quick", ["rules.trimmed-mean.trim=0.34", "rules.clip.norm=0.2"]), "a") == base
    assert pretrain_key(load_config("omniglot-exp1a-quick", ["federation.rule=krum"]), "a") != base
    assert pretrain_key(load_config("omniglot-exp1a-quick"), "b") != base  # benign users hold the backdoor classes
    assert pretrain_key(load_config("omniglot-exp1a-quick", ["federation.secure_aggregation=true"]), "a") == base
    fewer = ["federation.min_updates=2"]  # then secure aggregation applies all 3 updates, FedAvg the first 2
    assert pretrain_key(load_config("omniglot-exp1a-quick", [*fewer, "federation.secure_aggregation=true"]), "a") != \
        pretrain_key(load_config("omniglot-exp1a-quick", fewer), "a")


def test_a_local_defenses_clean_scores_are_keyed_by_what_the_comparison_reads(monkeypatch):
    """``finetune.clean_twin`` (Experiments 2 and 3 only) leaves the key as it was, and so does
    ``defense.always_target`` at its default (older entries hold); drawing episodes at random does not."""
    from fedmeta.scenario import cache

    keys = []
    monkeypatch.setattr(cache, "_accuracies", lambda path, *_: keys.append(path.name))
    base = load_config("omniglot-compare-quick")
    # a comparison's config refuses clean_twin = true now; entries of versions that took it must keep their keys
    twin = base.model_copy(update={"finetune": base.finetune.model_copy(update={"clean_twin": True})})
    for cfg in (base, twin, load_config("omniglot-compare-quick", ["defense.always_target=false"])):
        cache.clean_local_scores(cfg, "a", "fedavg", None, ("matching", False))
    assert keys[0] == keys[1] != keys[2]


def test_the_pre_trained_models_backdoor_scores_are_cached_per_trigger_and_per_dirichlet_share(tmp_path, monkeypatch):
    """The keyed images carry the trigger, so the "before the attack" row depends on it; under a
    Dirichlet split, eval.ways above meta.ways sizes the users' shares, so the pre-training does."""
    from fedmeta.meta.evaluation import Accuracy
    from fedmeta.scenario.cache import before_attack, pretrain_key

    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path))
    calls = []

    def attack_val(opacity: float) -> float:
        """What the cache gives for the pre-trained model with this trigger (each build: the opacity)."""
        def build() -> dict[str, Accuracy]:
            calls.append(opacity)
            return {"attack_val_accuracy": Accuracy(opacity, 0.0, 1)}

        cfg = load_config("omniglot-compare-quick", [f"attack.trigger.opacity={opacity}"])
        return before_attack(cfg, "a", build)["attack_val_accuracy"].mean

    assert (attack_val(1.0), attack_val(0.5), attack_val(1.0)) == (1.0, 0.5, 1.0)
    assert calls == [1.0, 0.5]  # the default trigger's entry, reused

    def key(*more: str) -> str:
        return pretrain_key(load_config("omniglot-exp1a-quick", ["federation.dirichlet_alpha=0.5", *more]), "a")

    assert key("eval.ways=10") != key() == key("eval.ways=3")


def test_an_accuracy_interval_uses_students_t_over_its_episodes_and_survives_the_cache(tmp_path, monkeypatch):
    """Per-run intervals: mean ± t(0.975, n - 1) s / sqrt(n). A cached score reads back as it was
    computed, and an entry written with the former normal factor (1.96) reads back as today's."""
    from fedmeta.meta.evaluation import Accuracy
    from fedmeta.scenario.cache import before_attack
    from fedmeta.storage import write_tensors

    acc = Accuracy.of(torch.tensor([1.0, 0.0, 1.0, 1.0]))  # s = 0.5, n = 4: t(0.975, 3) = 3.1824
    assert acc.mean == 0.75 and acc.episodes == 4
    assert acc.ci95 == pytest.approx(3.182446 * 0.5 / 2, abs=1e-6) and acc.stderr == pytest.approx(0.25)
    assert Accuracy.of(torch.tensor([1.0])).ci95 == 0.0

    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path))
    cfg = load_config("omniglot-compare-quick")
    first = before_attack(cfg, "a", lambda: {"attack_val_accuracy": acc})["attack_val_accuracy"]
    again = before_attack(cfg, "a", lambda: pytest.fail("rebuilt"))["attack_val_accuracy"]
    assert (again.mean, again.episodes) == (first.mean, first.episodes) and again.ci95 == pytest.approx(first.ci95)
    [entry] = tmp_path.glob("before-*.safetensors")
    write_tensors(entry, {"attack_val_accuracy": torch.tensor([0.75, 1.96 * 0.25, 4], dtype=torch.float64)})
    legacy = before_attack(cfg, "a", lambda: pytest.fail("rebuilt"))["attack_val_accuracy"]
    assert (legacy.mean, legacy.episodes) == (0.75, 4) and legacy.ci95 == pytest.approx(acc.ci95)


def test_the_clean_round_is_one_cache_entry_for_every_attack_strategy():
    """A threat matrix's cells (one attack strategy each) share the round without attackers."""
    from fedmeta.scenario.cache import attack_round_key

    def key(strategy: str, *overrides: str, round_: int = 1) -> str:
        attackers = f'attack.attackers=[{{user=0,rounds=[1],strategy="{strategy}"}}]'
        return attack_round_key(load_config("omniglot-compare-quick", [attackers, *overrides]), "a", RoundSettings(round_))

    assert key("boosted", "attack.enabled=false") == key("projected", "attack.enabled=false")
    assert key("boosted", "attack.enabled=false") == key("boosted", "attack.enabled=false", "attacks.boosted.episodes=7")
    assert key("boosted") != key("projected")
    assert key("boosted", "attack.target_way=last") != key("boosted")
    assert key("boosted", "attack.enabled=false") != key("boosted")
    assert key("boosted", "attack.enabled=false", round_=2) != key("boosted", "attack.enabled=false")


def test_a_revised_strategy_keys_its_cached_rounds_apart_from_the_earlier_code():
    """``replacement`` registered ``revision=3`` (its L2 anomaly term): its rounds of the earlier
    code, keyed without a revision, are not read as this one's; strategies never revised keep their keys."""
    from fedmeta.registry import ATTACKS
    from fedmeta.scenario.cache import attack_round_key

    def key(strategy: str) -> str:
        attackers = f'attack.attackers=[{{user=0,rounds=[1],strategy="{strategy}"}}]'
        return attack_round_key(load_config("omniglot-compare-quick", [attackers]), "a", RoundSettings(1))

    entry = ATTACKS.get("replacement")
    assert entry.info["revision"] == 3 and "revision" not in ATTACKS.get("boosted").info
    revised, boosted = key("replacement"), key("boosted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(entry.info, "revision", 1)
        assert key("replacement") != revised
        assert key("boosted") == boosted


def test_a_revised_rule_keys_its_cached_clean_rows_apart_from_the_earlier_code():
    """``foolsgold`` registered ``revision=2`` (its step no longer renormalised): a clean row of the
    earlier code is not read as this one's; rules never revised keep their keys."""
    from fedmeta.registry import RULES
    from fedmeta.scenario.cache import _clean_parts, _digest

    cfg = load_config("omniglot-compare-quick", [])
    entry = RULES.get("foolsgold")
    revised, median = (_digest(_clean_parts(cfg, "a", rule)) for rule in ("foolsgold", "median"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(entry.info, "revision", 1)
        assert _digest(_clean_parts(cfg, "a", "foolsgold")) != revised
        assert _digest(_clean_parts(cfg, "a", "median")) == median
