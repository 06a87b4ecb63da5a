"""Robust meta-learners: MAML plus a robustness term, the same interface, and the run that compares them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fedmeta.attacks.evasion import LinfAttack, pixels
from fedmeta.config import ConfigError, MetaConfig, load_config
from fedmeta.defenses.robust_maml import ROBUST_METHODS, RobustMaml, make_robust_learner, trades_loss
from fedmeta.experiments import run
from fedmeta.meta.learner import Maml
from fedmeta.plots import plot_runs
from fedmeta.runs import RunDir

CFG = MetaConfig(algorithm="fomaml", shots=1, queries=3, inner_steps=2, inner_lr=0.1, meta_lr=1e-3, meta_batch=2)


def _steps(learner, params, pool, steps=2):
    """``steps`` meta-updates on the same episodes and attack noise, whatever the learner."""
    episodes, attack_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    state = learner.init_state(params)
    for it in range(steps):
        params, state, _ = learner.train_step(params, state, learner.sample(pool, episodes), pool.images, attack_gen, 0.0)
    return params


@pytest.fixture(scope="module")
def pool(omniglot):
    return omniglot.pool(torch.arange(40), rotations=False)


@pytest.mark.parametrize("method", ROBUST_METHODS)
def test_robust_learner_with_a_void_attack_is_maml(pool, tiny, method):
    """With epsilon = 0 every robust meta-loss collapses to MAML's (R-MAML-AT: at weight 0)."""
    params = tiny.init(torch.Generator().manual_seed(0))
    robust = RobustMaml(tiny, CFG, method, LinfAttack.fgsm_rs(0.0), trades_beta=5.0,
                        at_weight=0.0 if method == "rmaml-at" else 1.0)
    ours, maml = _steps(robust, params, pool), _steps(Maml(tiny, CFG), params, pool)
    for k in params:
        assert torch.allclose(ours[k], maml[k], atol=1e-6), k


@pytest.mark.parametrize("method", ROBUST_METHODS)
def test_robust_learner_with_an_attack_is_not_maml(pool, tiny, method):
    params = tiny.init(torch.Generator().manual_seed(0))
    robust = RobustMaml(tiny, CFG, method, LinfAttack.fgsm_rs(pixels(8)), trades_beta=5.0, at_weight=1.0)
    ours, maml = _steps(robust, params, pool), _steps(Maml(tiny, CFG), params, pool)
    assert any(not torch.allclose(ours[k], maml[k], atol=1e-6) for k in params)


def test_second_order_robust_learner_differs_from_first_order(pool, tiny):
    params = tiny.init(torch.Generator().manual_seed(0))
    attack = LinfAttack.fgsm_rs(pixels(8))
    first = _steps(RobustMaml(tiny, CFG, "rmaml-trades", attack, 5.0, 1.0), params, pool, steps=1)
    second_cfg = CFG.model_copy(update={"algorithm": "maml"})
    second = _steps(RobustMaml(tiny, second_cfg, "rmaml-trades", attack, 5.0, 1.0), params, pool, steps=1)
    assert any(not torch.allclose(first[k], second[k]) for k in params)


def test_trades_term_is_a_nonnegative_addition_to_the_query_loss(tiny):
    params = tiny.init(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    support = (torch.rand(5, 1, 28, 28, generator=gen), torch.arange(5))
    query = (torch.rand(15, 1, 28, 28, generator=gen), torch.arange(5).repeat_interleave(3))
    clean = F.cross_entropy(tiny(params, query[0]), query[1])
    attack = LinfAttack.fgsm_rs(pixels(8))
    with_kl = trades_loss(tiny, params, support, query, attack, gen, beta=5.0)
    assert float(with_kl) > float(clean)
    assert float(trades_loss(tiny, params, support, query, attack, gen, beta=0.0)) == pytest.approx(float(clean))


def test_factory_returns_the_core_maml_for_the_baseline(tiny):
    cfg = load_config("omniglot-rmaml-quick")
    assert type(make_robust_learner(tiny, cfg.meta, cfg.robust, "maml")) is Maml
    trades = make_robust_learner(tiny, cfg.meta, cfg.robust, "rmaml-trades")
    assert trades.attack == LinfAttack.fgsm_rs(pixels(cfg.robust.epsilon), 1.25)
    with pytest.raises(ValueError, match="method"):
        RobustMaml(tiny, cfg.meta, "maml", trades.attack, 1.0, 1.0)


def test_robustness_needs_a_maml_algorithm():
    with pytest.raises(ConfigError, match="meta.algorithm must be 'maml' or 'fomaml'"):
        load_config("omniglot-rmaml-quick", ["meta.algorithm=reptile"])


TINY = [
    "model.filters=8", "meta.iterations=4", "meta.meta_batch=2", "meta.inner_steps=1", "meta.queries=2",
    "eval.every=2", "eval.episodes_during=2", "eval.episodes=3", "eval.steps=2", "eval.queries=2",
    "robust.pgd_steps=2", "robust.strong_steps=2", "robust.strong_restarts=2",
]


def _run(path, overrides=()):
    cfg = load_config("omniglot-rmaml-quick", TINY + list(overrides))
    folder = RunDir.open(path, cfg)
    run(cfg, folder)
    return folder


def test_run_compares_the_learners_with_metrics_and_a_table(tmp_path, omniglot):
    folder = _run(tmp_path / "a")
    records = folder.records()
    learners = ["maml", "adml", "rmaml-at", "rmaml-trades"]
    assert [(r["learner"], r["step"], r.get("final", False)) for r in records] == [
        (name, step, final) for name in learners for step, final in ((2, False), (4, False), (4, True))
    ]
    for r in records:
        assert 0.0 <= r["robust_accuracy"] <= r["standard_accuracy"] <= 1.0 and r["mode"] == "transductive"
        # the stronger attack runs on the final evaluation only
        assert ("strong_robust_accuracy" in r) == r.get("final", False)
        assert r.get("strong_robust_accuracy", 0.0) <= r["standard_accuracy"]
    summary = json.loads((folder.path / "summary.json").read_text())
    assert set(summary["learners"]) == set(learners) and summary["eval_mode"] == "transductive"
    row = summary["learners"]["rmaml-trades"]
    assert {"standard_accuracy", "standard_accuracy_ci95", "robust_accuracy", "robust_accuracy_ci95",
            "strong_robust_accuracy", "seconds_per_iteration"} <= set(row)
    assert {f"weights-{name}.safetensors" for name in learners} <= {p.name for p in folder.path.iterdir()}
    assert plot_runs([folder.path], tmp_path / "figure.png").stat().st_size > 10_000


def test_robustness_run_resumes_after_a_kill_with_identical_metrics(tmp_path, omniglot, killed_at_checkpoint):
    overrides = ["robust.learners=['maml', 'rmaml-trades']"]
    reference = _run(tmp_path / "ref", overrides)
    with killed_at_checkpoint(5):  # killed in the middle of the second learner
        _run(tmp_path / "killed", overrides)
    assert _run(tmp_path / "killed", overrides).records() == reference.records()


FEDERATED = TINY + ["federation.rounds=2", "federation.episodes=2", "federation.eval_every=1", "robust.maml_clients=[0, 4]"]


def _run_federated(path, overrides=()):
    cfg = load_config("omniglot-rmaml-federated-quick", FEDERATED + list(overrides))
    folder = RunDir.open(path, cfg)
    return folder, run(cfg, folder)


def test_federated_run_evaluates_each_case_of_plain_maml_clients(tmp_path, omniglot):
    folder, summary = _run_federated(tmp_path / "fed")
    records = folder.records()
    assert [(r["case"], r["round"], r.get("final", False)) for r in records] == [
        (case, rnd, final) for case in ("0 MAML of 4", "4 MAML of 4") for rnd, final in ((1, False), (2, True))
    ]
    for r in records:
        assert 0.0 <= r["robust_accuracy"] <= r["standard_accuracy"] <= 1.0
    assert set(summary["cases"]) == {"0 MAML of 4", "4 MAML of 4"} and summary["client_learner"] == "rmaml-trades"
    assert summary["cases"]["0 MAML of 4"]["seconds_per_round"] > 0
    assert plot_runs([folder.path], tmp_path / "figure.png").stat().st_size > 10_000


def test_federated_cases_cannot_have_more_plain_clients_than_users():
    with pytest.raises(ConfigError, match="maml_clients"):
        load_config("omniglot-rmaml-federated-quick", ["robust.maml_clients=[5]"])


def test_federated_run_resumes_after_a_kill_with_identical_metrics(tmp_path, omniglot, killed_at_checkpoint):
    reference, _ = _run_federated(tmp_path / "ref")
    with killed_at_checkpoint(4):  # killed after the first round of the second case
        _run_federated(tmp_path / "killed")
    assert _run_federated(tmp_path / "killed")[0].records() == reference.records()


def test_a_learner_scores_the_same_alone_or_beside_others(tmp_path, omniglot):
    """Runs of single learners (e.g. in parallel) make the same table as one run of all of them."""
    both = _run(tmp_path / "both", ["robust.learners=['maml', 'rmaml-at']"]).records()
    alone = _run(tmp_path / "alone", ["robust.learners=['rmaml-at']"]).records()
    assert [r for r in both if r["learner"] == "rmaml-at"] == alone
