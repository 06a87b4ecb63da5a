"""Fine-pruning (the pruning on crafted activations, pruned channels silent before and after
fine-tuning, the registered local defense) and the fleet: 30 users, their classes split disjointly
(uniformly or by Dirichlet over alphabets), several malicious users; refused configs."""

from __future__ import annotations

import pytest
import torch

from fedmeta.config import ConfigError, load_config
from fedmeta.data.episodes import gather, way_labels
from fedmeta.data.noniid import dirichlet_partition, group_kinds
from fedmeta.defenses.pruning import channel_activations, dormant_channels, prune
from fedmeta.experiments import fine_pruning as fp
from fedmeta.experiments.backdoor import Case, backdoor_episodes
from fedmeta.meta.learner import build_learner
from fedmeta.meta.reptile import adam_finetune
from fedmeta.registry import LOCAL_DEFENSES
from fedmeta.rng import stream
from fedmeta.scenario.backdoor import build_scenario
from fedmeta.scenario.builder import Phase, build_schedule

ATTACKERS = "attack.attackers=[{user=0, rounds=[1]}, {user=7, rounds=[1]}, {user=12, rounds=[1]}]"


def test_dormant_channels_are_the_least_active_fraction():
    acts = torch.tensor([0.5, 0.0, 2.0, 0.1, 0.1, 3.0, 0.05, 1.0])
    assert dormant_channels(acts, 0.5).tolist() == [1, 3, 4, 6]  # 4 of 8: 0.0, 0.05, 0.1, 0.1
    assert dormant_channels(acts, 0.3).tolist() == [1, 6]  # floor(2.4) = 2
    assert dormant_channels(acts, 0.375).tolist() == [1, 3, 6]  # the tie 0.1 / 0.1 goes to the lower index
    assert dormant_channels(acts, 0.1).tolist() == []  # floor(0.8) = 0: nothing pruned
    assert len(dormant_channels(torch.arange(100.0), 0.29)) == 29  # 0.29 * 100 = 28.999... in floats


def test_channel_activations_on_a_crafted_last_block(tiny):
    """With BatchNorm's scale 0, the last block outputs relu(shift) everywhere, whatever the input."""
    params = tiny.init(torch.Generator().manual_seed(0))
    shift = torch.tensor([0.3, -1.0, 0.0, 2.0, 0.7, -0.2, 1.5, 0.1])
    params |= {"trunk.3.bn.weight": torch.zeros(8), "trunk.3.bn.bias": shift}
    batches = [torch.rand(6, 1, 28, 28), torch.rand(10, 1, 28, 28)]
    torch.testing.assert_close(channel_activations(tiny, params, batches), shift.clamp_min(0))
    assert dormant_channels(channel_activations(tiny, params, batches), 0.5).tolist() == [1, 2, 5, 7]


def test_pruned_channels_output_zero_before_and_after_fine_tuning(tiny):
    gen = torch.Generator().manual_seed(1)
    params = tiny.init(gen)
    params |= {"trunk.3.bn.bias": torch.rand(8, generator=gen)}  # every channel active on its own
    pruned = prune(params, torch.tensor([0, 3, 5]))
    for k, v in params.items():  # a copy: the attacked model is untouched; only trunk.3 changes
        assert not torch.equal(pruned[k], v) if k.startswith("trunk.3.") else torch.equal(pruned[k], v), k
    assert pruned["trunk.3.conv.weight"][[0, 3, 5]].abs().sum() == 0
    assert pruned["trunk.3.bn.weight"][[0, 3, 5]].abs().sum() == pruned["trunk.3.bn.bias"][[0, 3, 5]].abs().sum() == 0
    x, y = torch.rand(25, 1, 28, 28, generator=gen), way_labels(5, 5)
    order = torch.randint(25, (10, 10), generator=gen)
    *_, tuned = adam_finetune(tiny, pruned, x, y, order, lr=1e-2, beta2=0.999)
    for weights in (pruned, tuned):
        out = tiny.trunk(weights, x).view(25, 8, -1)
        assert torch.all(out[:, [0, 3, 5]] == 0)
        assert torch.all(out[:, [1, 2, 4, 6, 7]].amax(dim=(0, 2)) > 0)
    assert not torch.equal(tuned["trunk.3.conv.weight"], pruned["trunk.3.conv.weight"])  # the others did train
    assert torch.all(tuned["trunk.3.conv.weight"][[0, 3, 5]] == 0)


@pytest.fixture(scope="module")
def fleet(omniglot):
    cfg = load_config("omniglot-fleet-quick", [ATTACKERS, "attacks.boosted.boost=3.5", "model.filters=8"])
    return cfg, build_scenario(cfg, "a")


def test_fleet_splits_classes_disjointly_with_the_configured_attackers(fleet):
    cfg, s = fleet
    assert len(s.users) == cfg.federation.users == 30 and s.attackers == (0, 7, 12)
    assert s.benign == [u for u in range(30) if u not in (0, 7, 12)]
    chars = [{n.rsplit("/", 1)[0] for n in pool.names if "/rot" in n} for pool in s.users]
    assert sum(map(len, chars)) == len(set().union(*chars)) == 1200  # disjoint, and all of them
    assert {len(c) for c in chars} == {40}
    target = s.everyone.pool.names[s.everyone.target]
    for u, pool in enumerate(s.users):
        reserved = {n for n in pool.names if "/rot" not in n}
        assert reserved == (set() if u in s.attackers else {target})
    schedule = build_schedule(cfg, Phase("main", "a"), s)
    first, second = schedule.participants(1), schedule.participants(2)
    assert len(first) == len(second) == 10
    assert set(s.attackers) <= set(first) and not set(s.attackers) & set(second)
    pretraining = build_schedule(cfg, Phase("pretrain", "a"), s)
    assert not set(s.attackers) & set(pretraining.participants(1, "pretrain"))


def test_fine_pruning_prunes_the_fraction_then_fine_tunes(fleet, monkeypatch):
    cfg, s = fleet
    cfg = load_config("omniglot-fineprune-quick", ["model.filters=8", "local_defenses.fine-pruning.episodes=3",
                                                   "local_defenses.fine-pruning.fraction=0.4"])
    learner = build_learner(cfg, s.images.shape[1:])
    attacked = learner.model.init(torch.Generator().manual_seed(2))
    seen = {}
    monkeypatch.setattr(fp, "finetune", lambda cfg, case, params, user, at: seen.setdefault("params", params))
    assert LOCAL_DEFENSES.get("fine-pruning").factory is fp.fine_pruning
    fp.fine_pruning(cfg, Case("a", s, learner, attacked, []), attacked, s.benign[0], [0, 10])
    zeroed = (seen["params"]["trunk.3.conv.weight"].flatten(1).abs().sum(1) == 0).nonzero().flatten()
    assert len(zeroed) == 3  # floor(0.4 * 8)
    assert all(torch.equal(seen["params"][k], v) for k, v in attacked.items() if not k.startswith("trunk.3."))
    clean = backdoor_episodes(cfg, s.evaluation[s.benign[0]], 3, stream(cfg.seed, "fine-pruning", "a", s.benign[0]))
    acts = channel_activations(learner.model, attacked, [gather(s.images, r) for r in clean.support])
    assert zeroed.tolist() == dormant_channels(acts, 0.4).tolist()


def test_dirichlet_partition_on_crafted_kinds():
    items, kinds = torch.arange(100, 160), torch.arange(60) // 10  # 6 kinds of 10 items
    for alpha in (1e-3, 0.5, 1e4):
        parts = dirichlet_partition(items, kinds, 4, alpha, 2, torch.Generator().manual_seed(0))
        assert sorted(torch.cat(parts).tolist()) == items.tolist() and min(map(len, parts)) >= 2
        again = dirichlet_partition(items, kinds, 4, alpha, 2, torch.Generator().manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
        holders = [sum(bool(torch.isin(items[kinds == k], p).any()) for p in parts) for k in range(6)]
        if alpha == 1e-3:
            assert holders == [1] * 6  # each kind goes whole to one user
        if alpha == 1e4:
            assert holders == [4] * 6 and all(12 <= len(p) <= 18 for p in parts)  # near the uniform 15 each
    with pytest.raises(ValueError, match="federation.dirichlet_alpha: no Dirichlet.0.5. split of 60 class groups"):
        dirichlet_partition(items, kinds, 4, 0.5, 16, torch.Generator().manual_seed(0))


def test_dirichlet_over_alphabets_skews_omniglot_users(omniglot):
    names = [f"{omniglot.names[c]}/rot{d}" for c in range(1200) for d in (0, 90, 180, 270)]
    groups = torch.arange(4800) // 4
    assert group_kinds(["A/c1/rot0", "A/c1/rot90", "B/c2/rot0", "B/c2/rot90", "A/c3/rot0"],
                       torch.tensor([0, 0, 1, 1, 2])).tolist() == [0, 1, 0]
    kinds = group_kinds(names, groups)

    def alphabets(parts: list[torch.Tensor]) -> float:  # per user, on average
        return sum(len(kinds[p].unique()) for p in parts) / len(parts)

    skewed = dirichlet_partition(torch.arange(1200), kinds, 30, 0.1, 2, torch.Generator().manual_seed(0))
    uniform = dirichlet_partition(torch.arange(1200), kinds, 30, 1e4, 2, torch.Generator().manual_seed(0))
    assert alphabets(skewed) < 0.5 * alphabets(uniform)


def test_fleet_and_fine_pruning_configs_are_refused_by_key():
    for override, message in [
        ("federation.dirichlet_alpha=0", r"federation\.dirichlet_alpha: Input should be greater than 0"),
        ("federation.users=2000", r"federation\.users: 2000 users, but omniglot has 1200 class groups"),
        ("federation.per_round=29", r"federation\.per_round = 29 is more than the 28 benign users"),
        ("attack.attackers=[" + ", ".join(f"{{user={u}}}" for u in range(11)) + "]",
         r"more attackers than federation\.per_round = 10 in rounds \[1\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("omniglot-fleet-quick", [override])
    for override, message in [
        ("local_defenses.fine-pruning.fraction=1", r"local_defenses: fine-pruning\.fraction: Input should be less than 1"),
        ("local_defenses.fine-pruning.fraction=0", r"local_defenses: fine-pruning\.fraction: Input should be greater than 0"),
        ("local_defenses.fine-pruning.episodes=0", r"fine-pruning\.episodes: Input should be greater than 0"),
        ("local_defenses.fine-prunin.fraction=0.5", r"local_defenses: unknown local defense 'fine-prunin'; registered: .*fine-pruning"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("omniglot-fineprune-quick", [override])
    assert load_config("omniglot-fleet-quick", [ATTACKERS]).federation.users == 30
    assert load_config("omniglot-fineprune-quick").local_defenses["fine-pruning"] == {"fraction": 0.5, "episodes": 20}
