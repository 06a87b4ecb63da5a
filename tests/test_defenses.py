"""The matching-network defense (paper 000, Sec. 4) and the defense comparison."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_federation import _run

from fedmeta.data.episodes import gather
from fedmeta.defenses import matching
from fedmeta.models.conv4 import trunk_params


def test_head_probabilities_sum_to_one_and_match_hand_computed_attention():
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # classes 0, 1, 1
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[2.0, 1.0]])
    head = {matching.GATES: torch.tensor([[1.0, 0.5], [0.0, 1.0]]), matching.SCALE: torch.tensor([2.0, 3.0])}
    probs = matching.attention_log_probs(head, query, support, labels, ways=2).exp()

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    # gated query per support example's class: class 0 -> (2, 0.5), class 1 -> (0, 1)
    scores = [2.0 * cos((2, 0.5), (1, 0)), 3.0 * cos((0, 1), (0, 1)), 3.0 * cos((0, 1), (1, 1))]
    attention = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert probs[0].tolist() == pytest.approx([attention[0], attention[1] + attention[2]], abs=1e-6)


def test_a_query_scored_alone_sees_only_the_support_set(tiny, omniglot):
    """Non-transductive scores: a query's log-probabilities do not depend on the other queries
    (BatchNorm's batch holds the support set and that query alone), unlike transductive ones."""
    gen = torch.Generator().manual_seed(0)
    weights = {**trunk_params(tiny.init(gen)), **matching.init_head(5, tiny.feature_dim, 10.0)}
    flat = omniglot.images[:5].flatten(0, 1)  # 5 classes x 20 examples
    support = gather(flat, torch.arange(0, 100, 20).repeat_interleave(2) + torch.tensor([0, 1] * 5))
    labels, queries = torch.arange(5).repeat_interleave(2), gather(flat, torch.arange(2, 100, 20))

    def scores(inputs: torch.Tensor, transductive: bool) -> torch.Tensor:
        return matching.log_probs(tiny, weights, support, labels, inputs, 5, transductive)

    together = scores(queries, False)
    for i in range(5):
        torch.testing.assert_close(together[i], scores(queries[i : i + 1], False)[0], rtol=0, atol=1e-5)
    assert not torch.allclose(scores(queries, True)[0], scores(queries[:1], True)[0], atol=1e-3)


def test_delta_mix_is_exact(tiny):
    params = tiny.init(torch.Generator().manual_seed(0))
    delta = 0.3
    mixed = matching.mix_with_glorot(params, delta, torch.Generator().manual_seed(1))
    fresh = matching.mix_with_glorot(params, 0.0, torch.Generator().manual_seed(1))  # the Glorot draw alone
    assert set(mixed) == set(trunk_params(params))  # the head is dropped
    for name, value in mixed.items():
        torch.testing.assert_close(value, delta * params[name] + (1 - delta) * fresh[name], rtol=0, atol=1e-7)
    assert torch.equal(fresh["trunk.0.bn.weight"], torch.ones(8)) and torch.equal(fresh["trunk.0.bn.bias"], torch.zeros(8))
    assert all(torch.equal(v, params[k]) for k, v in matching.mix_with_glorot(params, 1.0, torch.Generator()).items())


def test_training_keeps_gates_in_the_unit_interval_and_lowers_the_loss(tiny, omniglot):
    gen = torch.Generator().manual_seed(0)
    images = omniglot.images[:5]  # 5 classes x 20 examples
    ways, shots, steps, episodes = 5, 3, 30, 2
    rows = torch.arange(100).view(5, 20)
    pick = torch.stack([torch.randperm(20, generator=gen)[: shots + 1] for _ in range(steps * episodes * ways)])
    chosen = rows.repeat(steps * episodes, 1).gather(1, pick.view(-1, ways, shots + 1).flatten(0, 1)).view(-1, ways, shots + 1)
    support = chosen[..., :shots].flatten(1).view(steps, episodes, -1)
    query = chosen[..., shots:].flatten(1).view(steps, episodes, -1)
    labels = (torch.arange(ways).repeat_interleave(shots), torch.arange(ways))
    weights = {**trunk_params(tiny.init(gen)), **matching.init_head(ways, tiny.feature_dim, 10.0)}
    flat = images.flatten(0, 1)
    losses, gates = [], []
    for w in matching.finetune(tiny, weights, flat, support, query, labels, ways=ways, head_steps=5, train_head=True, lr=0.05):
        logp = matching.episode_log_probs(tiny, w, flat, support[0, 0], query[0, 0], labels[0], ways)
        losses.append(torch.nn.functional.nll_loss(logp, labels[1]).item())
        gates.append(w[matching.GATES].clone())
    assert all(0.0 <= float(g.min()) and float(g.max()) <= 1.0 for g in gates)
    assert float(gates[-1].min()) < 1.0  # the gates did move (and were clamped from above)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_first_phase_trains_only_gates_and_scales(tiny, omniglot):
    gen = torch.Generator().manual_seed(0)
    flat = omniglot.images[:5].flatten(0, 1)
    support = torch.arange(0, 100, 20).repeat_interleave(2).view(1, 1, 10).repeat(4, 1, 1) + torch.tensor([0, 1] * 5)
    query = (torch.arange(0, 100, 20) + 5).view(1, 1, 5).repeat(4, 1, 1)
    labels = (torch.arange(5).repeat_interleave(2), torch.arange(5))
    start = {**trunk_params(tiny.init(gen)), **matching.init_head(5, tiny.feature_dim, 10.0)}
    path = [{k: v.clone() for k, v in w.items()} for w in
            matching.finetune(tiny, start, flat, support, query, labels, ways=5, head_steps=2, train_head=True, lr=0.01)]
    assert all(torch.equal(path[1][k], start[k]) for k in trunk_params(start))  # trunk fixed in phase 1
    assert not torch.equal(path[1][matching.SCALE], start[matching.SCALE])
    assert not torch.equal(path[3]["trunk.0.conv.weight"], start["trunk.0.conv.weight"])  # phase 2 trains it


def test_defense_run_writes_curves_per_case_and_user(tmp_path, omniglot):
    records = _run(tmp_path / "d", "omniglot-exp3-quick", ["attack.cases=['c']", "defense.head_steps=1"]).records()
    assert {(r["case"], r["user"]) for r in records} == {("c", u) for u in (1, 2, 3)}
    assert sorted({r["step"] for r in records}) == [0, 2, 4]


def test_comparison_has_one_row_per_defense(tmp_path, omniglot):
    rows = ["fedavg", "median", "krum"]
    folder = _run(tmp_path / "c", "omniglot-compare-quick", [f"compare.rules={rows}", "finetune.users=1",
                                                              "compare.after_rounds=1"])
    records = folder.records()
    for r in records[:3]:  # server rows follow the backdoor for one benign round; the others have no count
        assert r["rounds_followed"] == 1 and r["rounds_survived"] in (0, 1)
    assert all("rounds_survived" not in r for r in records[3:])
    assert [r["defense"] for r in records] == [*rows, "local matching (FedAvg)", "local matching, secure aggregation",
                                               "before the attack"]
    before = records[-1]  # the pre-trained model: its meta-test accuracy is its clean one
    assert before["meta_test_accuracy"] == before["clean_meta_test_accuracy"]
    records = records[:-1]
    for r in records:
        assert all(0.0 <= r[m] <= 1.0 for m in ("clean_meta_test_accuracy", "meta_test_accuracy", "attack_val_accuracy"))
    # what each rule let through: FedAvg all of it, Krum one whole (benign) update, never the outlier
    fedavg, krum = records[0], records[2]
    assert fedavg["attacker_weight"] + fedavg["benign_weight"] == pytest.approx(1.0, abs=1e-4)
    assert fedavg["attacker_weight"] > 0.2
    assert (krum["attacker_weight"], krum["benign_weight"]) == pytest.approx((0.0, 1.0), abs=1e-4)
    # the local defense reads nothing of the individual updates: the sum alone gives the same numbers
    local, secure = records[-2], records[-1]
    assert all(0.0 <= r["clean_attack_val_accuracy"] <= 1.0 for r in (local, secure))  # the local rows' reference
    assert all("clean_attack_val_accuracy" not in r for r in records[:3])
    assert local["attack_val_accuracy"] == pytest.approx(secure["attack_val_accuracy"], abs=0.05)


def test_a_variant_of_a_rule_is_a_row_of_its_own_with_its_settings(tmp_path, omniglot, monkeypatch):
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache"))  # clean costs computed here, not read
    rows = ["clip", "clip:tight"]  # clip with a cap no update reaches (FedAvg's model), and one that stops all
    records = _run(tmp_path / "v", "omniglot-compare-quick", [
        f"compare.rules={rows}", "compare.local_defenses=[]", "rules.clip.norm=1000.0",
        "rules.clip:tight.norm=1e-9"]).records()
    loose, tight, before = records
    assert [r["defense"] for r in records] == [*rows, "before the attack"]
    assert loose["attacker_weight"] > 0.2 and tight["attacker_weight"] == pytest.approx(0.0, abs=1e-6)
    # a cap of 1e-9 leaves the pre-trained model: its scores, and a clean cost of its own (not clip's entry)
    assert tight["meta_test_accuracy"] == tight["clean_meta_test_accuracy"] == before["meta_test_accuracy"]
    assert len(list((tmp_path / "cache").glob("clean-*.safetensors"))) == 2


def _trained_users(monkeypatch) -> list[list[int]]:
    """The users that train in each main round from now on (``Server.compute``'s calls)."""
    from fedmeta.federation.server import Server

    trained, compute = [], Server.compute

    def count(self, users, params, settings):
        if settings.phase == "main":
            trained.append(users)
        return compute(self, users, params, settings)

    monkeypatch.setattr(Server, "compute", count)
    return trained


def test_comparison_cells_of_two_attacks_evaluate_each_rules_clean_cost_once(tmp_path, omniglot, monkeypatch):
    from fedmeta.experiments import comparison

    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache"))  # entries of this test alone
    calls = []
    evaluate = comparison._meta_test
    monkeypatch.setattr(comparison, "_meta_test", lambda *args: calls.append(1) or evaluate(*args))
    scored = []  # the models scored on all four metrics (the server rows' and the pre-trained one)
    curves = comparison.curves
    monkeypatch.setattr(comparison, "curves", lambda *args, **kw: scored.append(1) or curves(*args, **kw))
    local = []  # the models a local defense ran on
    registry = comparison.LOCAL_DEFENSES
    monkeypatch.setattr(comparison, "LOCAL_DEFENSES", SimpleNamespace(get=lambda name: SimpleNamespace(
        factory=lambda *args: local.append(name) or registry.get(name).factory(*args))))
    trained = _trained_users(monkeypatch)
    cell = lambda strategy: _run(tmp_path / strategy, "omniglot-compare-quick", [
        "compare.rules=['fedavg', 'median']", "compare.local_defenses=['finetune']", "finetune.steps=2",
        "finetune.every=1", "finetune.episodes=2", "finetune.users=1",
        "attacks.alie.episodes=4", "attacks.alie.inner_epochs=1",
        f"attack.attackers=[{{user=0,rounds=[1],strategy='{strategy}'}}]"]).records()
    boosted = cell("boosted")
    assert len(calls) == 2 and len(local) == 4  # two local rows (FedAvg, secure aggregation): attacked and clean
    assert len(scored) == 3  # two rules' attacked models and the pre-trained one
    # round 1's benign users train once (``cache.shared_benign``): the attack round trains the attacker
    # and 2 of them, the same round without it (3 benign users) only the one the attack round lacked
    (attacked, clean), trained[:] = trained, []
    assert 0 in attacked and len(attacked) == 3 and len(clean) == 1 and clean[0] not in attacked
    alie = cell("alie")  # another attack: the same round without it, the same clean costs, not evaluated again
    assert len(calls) == 2 and len(local) == 6 and len(scored) == 5  # the pre-trained model's scores are shared
    assert trained and all(users == [0] for users in trained)  # only its attacker trains (once per kind of rule)
    assert alie[-1] == {**boosted[-1], "seconds": alie[-1]["seconds"]}
    assert [r["clean_meta_test_accuracy"] for r in alie] == [r["clean_meta_test_accuracy"] for r in boosted]


def test_round_1_benign_updates_shared_between_attacked_and_clean_rounds_change_nothing(tmp_path, omniglot,
                                                                                         monkeypatch):
    from fedmeta.scenario import cache

    def cell(name: str) -> list[dict]:
        monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / name))
        records = _run(tmp_path / name, "omniglot-compare-quick", ["compare.rules=['fedavg']",
                                                                  "compare.local_defenses=[]"]).records()
        return [{**r, "seconds": 0} for r in records]

    shared = cell("shared")
    monkeypatch.setattr(cache, "shared_benign", lambda *args: {})
    assert cell("alone") == shared  # every benign user trained in both rounds: the same numbers


@pytest.mark.parametrize("strategy, main_rounds", [("replacement", 3), ("projected", 2)])
def test_an_adaptive_attacker_trains_once_per_kind_of_rule_not_per_row(tmp_path, omniglot, monkeypatch, strategy,
                                                                       main_rounds):
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache"))
    trained = _trained_users(monkeypatch)
    _run(tmp_path / "r", "omniglot-compare-quick", [
        "compare.rules=['fedavg', 'median', 'trimmed-mean', 'krum']", "compare.local_defenses=[]",
        f"attacks.{strategy}.episodes=4", f"attacks.{strategy}.inner_epochs=1", f"attacks.{strategy}.estimates=1",
        f"attack.attackers=[{{user=0,rounds=[1],strategy='{strategy}'}}]"])
    # the clean round, then one attack round against the rules without a known cap (whatever their
    # options), each computed once; replacement sends another update against FedAvg (no cap), the
    # projected attacker keeps inside the estimated bound there too, so shares that round. The clean
    # round trains its 3 benign users; an attack round only the attacker, its 2 benign users' updates
    # being the clean round's (``shared_benign``)
    assert len(trained) == main_rounds and len(trained[0]) == 3 and trained[1:] == [[0]] * (main_rounds - 1)


def test_an_attack_over_two_rounds_plays_both_under_each_rule_and_fedavg_is_experiment_1(tmp_path, omniglot,
                                                                                         monkeypatch):
    from fedmeta.experiments import comparison
    from fedmeta.federation.server import Server
    from fedmeta.storage import read_tensors

    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache"))
    trained = []  # (round, whether the attacker sent) of each main round whose users trained
    updates = Server.updates

    def train(self, params, settings, known=None):
        sent = updates(self, params, settings, known)
        if settings.phase == "main":
            trained.append((settings.round, any(u.user == 0 for u in sent)))
        return sent

    monkeypatch.setattr(Server, "updates", train)
    scored = []  # the models each row's four metrics were computed on
    curves = comparison.curves
    monkeypatch.setattr(comparison, "curves", lambda cfg, case, params, *a, **kw: scored.append(params) or curves(
        cfg, case, params, *a, **kw))
    attackers = "attack.attackers=[{user=0,rounds=[1,2],strategy='boosted'}]"
    fedavg, median, local, _ = _run(tmp_path / "c", "omniglot-compare-quick", [
        "compare.rules=['fedavg', 'median']", "compare.local_defenses=['finetune']", "compare.secure_rows=false",
        "finetune.users=1", attackers]).records()
    # round 1 once for every row, with and without the attacker; round 2 per rule, attacked and clean:
    # the local row defends FedAvg's model, whose rounds it shares (``Plays``)
    assert sorted(trained) == [(1, False), (1, True), (2, False), (2, False), (2, True), (2, True)]
    assert local["defense"] == "local finetune (FedAvg)"
    assert fedavg["attacker_weight"] == pytest.approx(1 / 3, abs=1e-4)  # 1/M_min in each of the two rounds
    assert 0 < median["attacker_weight"] < fedavg["attacker_weight"]
    # FedAvg's row scores Experiment 1's global model after its second attack round: the same rounds
    _run(tmp_path / "e", "omniglot-exp1a-quick", [attackers, "federation.rounds=0"])
    reference, _ = read_tensors(tmp_path / "e" / "weights-case-a.safetensors")
    for name, value in scored[1].items():  # scored[0]: the pre-trained model, the "before the attack" row
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6)


def test_case_c_puts_one_or_all_fitting_backdoor_classes_in_each_episode():
    from types import SimpleNamespace

    from fedmeta.experiments.backdoor import always_included
    from fedmeta.scenario.backdoor import EvalPool

    ev = EvalPool(pool=None, split=torch.zeros(0), target=7, backdoors=torch.tensor([1, 2, 3, 4, 5, 6]))
    settings = lambda k: SimpleNamespace(attack=SimpleNamespace(case_c_backdoor_ways=k), eval=SimpleNamespace(ways=5))
    one = always_included(settings(1), ev, 50, torch.Generator().manual_seed(0))
    every = always_included(settings("all"), ev, 50, torch.Generator().manual_seed(0))
    assert one.shape == (50, 2) and every.shape == (50, 5)  # 5 ways: the target and 4 of the 6 backdoor classes
    for rows in (one, every):
        assert (rows[:, 0] == 7).all() and set(rows[:, 1:].flatten().tolist()) <= {1, 2, 3, 4, 5, 6}
        assert all(len(set(r.tolist())) == len(r) for r in rows)  # distinct classes within an episode
    no_backdoors = EvalPool(pool=None, split=torch.zeros(0), target=7, backdoors=torch.zeros(0, dtype=torch.long))
    assert always_included(settings("all"), no_backdoors, 50, torch.Generator()).tolist() == [7]


def test_the_defenses_training_episodes_hold_the_target_always_or_at_random():
    from fedmeta.config import load_config
    from fedmeta.data.pool import ClassPool
    from fedmeta.experiments.local_defenses import training_episodes
    from fedmeta.scenario.backdoor import EvalPool

    pool = ClassPool.from_class_major(torch.zeros(20, 10, 1, 1, 1, dtype=torch.uint8), [str(c) for c in range(20)])
    ev = EvalPool(pool=pool, split=torch.full((20,), 8), target=7, backdoors=torch.zeros(0, dtype=torch.long))

    def held(always: bool) -> float:
        """The share of 400 training episodes that hold the target."""
        cfg = load_config("omniglot-exp3-quick", [f"defense.always_target={always}"])
        classes = training_episodes(cfg, ev, 400, torch.Generator().manual_seed(0)).classes
        return float((classes == 7).any(dim=1).float().mean())

    assert held(True) == 1.0  # the target in every episode, as in evaluation
    assert abs(held(False) - 5 / 20) < 0.07  # 5 ways of the user's 20 classes: a quarter of the episodes


def test_a_matrix_may_leave_out_the_secure_aggregation_twins_of_local_rows():
    from fedmeta.config import load_config
    from fedmeta.experiments.comparison import rows

    cfg = load_config("omniglot-compare-quick", ["compare.secure_rows=false", "compare.local_defenses=['finetune']"])
    assert [label for label, *_ in rows(cfg)][-2:] == ["clip", "local finetune (FedAvg)"]


def test_a_backdoor_is_followed_round_by_round_until_it_is_no_longer_above_the_pre_trained_level(monkeypatch):
    from fedmeta.experiments import comparison
    from fedmeta.meta.evaluation import Accuracy

    before = Accuracy(0.10, 0.04, 40)
    assert comparison.present(Accuracy(0.50, 0.05, 40), before)
    # standard error of the difference: hypot(0.07, 0.04) / t(0.975, 39) = 0.08062 / 2.0227 = 0.03986;
    # one-sided 5%: 1.645 of it, 0.0656
    assert comparison.present(Accuracy(0.17, 0.07, 40), before)  # 0.07 above: z = 1.76 (the intervals overlap)
    assert not comparison.present(Accuracy(0.16, 0.07, 40), before)  # 0.06 above: z = 1.51
    assert not comparison.present(Accuracy(0.10, 0.0, 40), Accuracy(0.10, 0.0, 40))  # no spread, no difference

    def follow(levels: list[float], after_rounds: int, right_after: float = 0.6) -> tuple[dict, list[int]]:
        played, queue = [], list(levels)
        server = SimpleNamespace(round=lambda params, settings: played.append(settings.round) or (params, None))
        monkeypatch.setattr(comparison, "curves", lambda *a, **kw: {0: {"attack_val_accuracy": Accuracy(queue.pop(0), 0.05, 40)}})
        cfg = SimpleNamespace(compare=SimpleNamespace(after_rounds=after_rounds), attack=SimpleNamespace(last_round=1),
                              eval=SimpleNamespace(steps=0, episodes=40), seed=0)
        case = SimpleNamespace(scenario=SimpleNamespace(everyone=None))
        return comparison._survival(cfg, case, server, {}, Accuracy(right_after, 0.05, 40), before), played

    assert follow([0.5, 0.3, 0.1, 0.9], 5) == ({"rounds_survived": 2, "rounds_followed": 5}, [2, 3, 4])
    assert follow([0.5, 0.5], 2) == ({"rounds_survived": 2, "rounds_followed": 2}, [2, 3])  # still there: ">= 2"
    assert follow([], 5, right_after=0.12) == ({"rounds_survived": 0, "rounds_followed": 5}, [])  # removed at once
