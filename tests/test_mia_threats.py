"""Membership inference: metrics with intervals, threat models, threshold and LiRA attacks, DP-SGD."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fedmeta.attacks.mia_metrics import auc, balanced_accuracy, fit_threshold, fold_thresholds, summarize, tpr_at_fpr
from fedmeta.attacks.mia_scores import likelihood_ratio, lira_statistic, pooled_variances, ratio, threshold_scores
from fedmeta.config import ConfigError, load_config
from fedmeta.defenses.dp import DpSgd, clip_to, epsilon, private_gradient, terms
from fedmeta.experiments.membership import Point, TaskClient, add_global_lira, plan, round_mean
from fedmeta.meta.maml import task_meta_gradient
from fedmeta.models.mlp import Mlp

# --- metrics ------------------------------------------------------------------------------------


def test_auc_and_tpr_on_hand_counted_scores():
    members, nonmembers = np.array([3.0, 4.0, 5.0, 6.0]), np.array([1.0, 2.0, 3.0, 0.0])
    assert auc(members, nonmembers) == pytest.approx(15.5 / 16)  # 15 pairs won, one tie (3 vs 3)
    assert auc(nonmembers, members) == pytest.approx(0.5 / 16)
    assert auc(np.ones(5), np.ones(5)) == 0.5
    assert tpr_at_fpr(members, nonmembers, 0.01) == 0.75  # score >= 4: no false positive
    assert tpr_at_fpr(members, nonmembers, 0.25) == 1.0  # score >= 3: one of 4 non-members passes
    # 1000 non-members 0..999; members 998.5, 999.5, 10: at 0.1% FPR one non-member (999) may pass,
    # so score >= 998.5 qualifies (2 of 3 members); with none allowed only score >= 999.5 (1 of 3)
    many, members = np.arange(1000.0), np.array([998.5, 999.5, 10.0])
    assert tpr_at_fpr(members, many, 0.001) == pytest.approx(2 / 3)
    assert tpr_at_fpr(members, many, 0.0005) == pytest.approx(1 / 3)


def test_balanced_accuracy_uses_thresholds_fitted_on_the_other_trials():
    members, nonmembers = np.array([3.0, 4.0, 5.0, 6.0]), np.array([1.0, 2.0, 3.0, 0.0])
    # odd trials (members 4, 6; non-members 2, 0) separate at >= 4, moved half-way to the next score
    # 2: t = 3; even trials (3, 5 / 1, 3): J = 1/2 at >= 5 and at >= 3, the higher one wins: (5 + 3) / 2
    assert fit_threshold(members[1::2], nonmembers[1::2]) == 3.0
    assert fit_threshold(members[::2], nonmembers[::2]) == 4.0
    assert fold_thresholds(members, nonmembers).tolist() == [3.0, 4.0, 3.0, 4.0]
    # J = 3/5 at >= 4 (TPR 3/5, FPR 0) and at >= 3 (4/5 - 1/5, 0.6000000000000001 in floats): a tie,
    # which the higher threshold wins, half-way to 3
    assert fit_threshold(np.array([5.0, 3, 4, 4, 0]), np.array([3.0, 2, 1, 2, 2])) == 3.5
    # trials 0, 1, 3 right both ways; trial 2: non-member 3 >= 3 called a member
    assert balanced_accuracy(members, nonmembers) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert balanced_accuracy(np.arange(10.0) + 20, np.arange(10.0)) == 1.0  # separable: t = (21 + 9) / 2
    with pytest.raises(ValueError, match="at least 2 trials"):
        balanced_accuracy(np.array([1.0]), np.array([0.0]))


def test_bootstrap_intervals_cover_the_truth_and_shrink_with_trials():
    rng = np.random.default_rng(0)
    true_auc = norm.cdf(1 / np.sqrt(2))  # members N(1, 1), non-members N(0, 1)
    widths = []
    for n in (40, 640):
        found = summarize(rng.normal(1, 1, n), rng.normal(0, 1, n), resamples=150, seed=1)
        a = found["auc"]
        assert a.low <= true_auc <= a.high and a.low <= a.value <= a.high
        assert set(found) == {"auc", "tpr_at_0.1pct_fpr", "tpr_at_1pct_fpr", "balanced_accuracy"}
        widths.append(a.high - a.low)
    assert widths[1] < widths[0] / 2  # about 1 / sqrt(16) as wide
    same = summarize(np.arange(6.0), np.arange(6.0) - 0.5, resamples=50, seed=3)
    assert same == summarize(np.arange(6.0), np.arange(6.0) - 0.5, resamples=50, seed=3)  # seeded


def test_separated_scores_have_degenerate_intervals():
    found = summarize(np.arange(10.0) + 20, np.arange(10.0), resamples=40, seed=0)
    for interval in found.values():
        assert (interval.value, interval.low, interval.high) == (1.0, 1.0, 1.0)


# --- attacks ------------------------------------------------------------------------------------


def test_lira_likelihood_ratio_is_the_gaussian_log_ratio():
    ins, outs = [1.0, 3.0], [-1.0, 1.0]  # fits: N(2, 1) and N(0, 1) (population std)
    expected = norm.logpdf(1.5, 2, 1) - norm.logpdf(1.5, 0, 1)  # = (1.5^2 - 0.5^2) / 2 = 1.0
    assert likelihood_ratio(1.5, ins, outs) == pytest.approx(expected) == pytest.approx(1.0)
    assert likelihood_ratio(3.0, [], outs) == pytest.approx(3.0)  # offline: z-score under N(0, 1)


def test_global_variance_lira_pools_each_sides_variance_over_the_candidates():
    # online: per-candidate fits N(2, 1) / N(0, 1) and N(2, 9) / N(0, 4); pooled variances 5 and 2.5
    first = {"observed": 1.5, "mean_in": 2.0, "var_in": 1.0, "mean_out": 0.0, "var_out": 1.0}
    second = {"observed": 1.5, "mean_in": 2.0, "var_in": 9.0, "mean_out": 0.0, "var_out": 4.0}
    assert pooled_variances([first, second]) == {"var_in": 5.0, "var_out": 2.5}
    assert ratio(first) == pytest.approx(1.0)
    expected = norm.logpdf(1.5, 2, np.sqrt(5)) - norm.logpdf(1.5, 0, np.sqrt(2.5))
    assert ratio(first, var_in=5.0, var_out=2.5) == pytest.approx(expected)
    # offline, through the run's scores: candidates with OUT variances 1 (member) and 9 (non-member)
    scores = {("support", "member", "lira:observed"): [1.0], ("support", "member", "lira:mean_out"): [0.0],
              ("support", "member", "lira:var_out"): [1.0], ("support", "same-class", "lira:observed"): [2.0],
              ("support", "same-class", "lira:mean_out"): [0.0], ("support", "same-class", "lira:var_out"): [9.0]}
    scores |= {("query", kind, f"lira:{m}"): [v] for kind in ("member", "same-class")
               for m, v in (("observed", 3.0), ("mean_out", 0.0), ("var_out", 1.0))}
    add_global_lira(scores)  # per candidate the z-scores are 1 and 2/3; pooled (variance 5): 1/sqrt5, 2/sqrt5
    assert scores[("support", "member", "lira-global")] == pytest.approx([1 / np.sqrt(5)])
    assert scores[("support", "same-class", "lira-global")] == pytest.approx([2 / np.sqrt(5)])
    assert scores[("query", "member", "lira-global")] == pytest.approx([3.0])  # pooled per target: variance 1
    # the logit-scaled confidence of p = 0.8 is log 4
    assert lira_statistic({"loss": float(np.log(0.8))}, "loss") == pytest.approx(np.log(4))
    assert lira_statistic({"alignment": 0.3}, "alignment") == 0.3


def _softmax_regression(dim: int = 4, classes: int = 2):
    model = Mlp(dim, classes, ())
    params = {k: v.double() for k, v in model.init(torch.Generator().manual_seed(0)).items()}
    return model, params


def test_threshold_scores_by_hand_on_softmax_regression():
    """With zero weights every class has p = 1/2 and the gradient of CE at (x, y) is
    (p - onehot(y)) x^T: the three scores follow in closed form."""
    model, params = _softmax_regression()
    params = {k: torch.zeros_like(v) for k, v in params.items()}
    x = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    own = {k: v.clone() for k, v in params.items()}
    weight, bias = (next(k for k in params if params[k].dim() == d) for d in (2, 1))
    own[weight][0, 0], own[weight][1, 0], own[bias][0], own[bias][1] = -0.5, 0.5, -0.5, 0.5  # grad of CE(x, y=0)
    scores = threshold_scores(model, params, own, x, 0, step=1.0)
    # omega' = -own: logits (0.5 + 0.5, -0.5 - 0.5) = (1, -1), p(0) = sigmoid(2)
    p = 1 / (1 + np.exp(-2.0))
    assert scores["loss"] == pytest.approx(np.log(p))
    assert scores["grad-norm"] == pytest.approx(-np.sqrt(4 * (1 - p) ** 2))  # 4 entries of size (1 - p)
    assert scores["alignment"] == pytest.approx(1.0)  # the observation is the candidate's own gradient


# --- DP-SGD -------------------------------------------------------------------------------------


def _task(gen: torch.Generator, ways: int = 2, queries: int = 3):
    support = (torch.rand(ways, 4, generator=gen, dtype=torch.float64), torch.arange(ways))
    query = (torch.rand(ways * queries, 4, generator=gen, dtype=torch.float64),
             torch.arange(ways).repeat_interleave(queries))
    return support, query


def test_dp_sgd_clips_each_term_and_adds_noise_of_sigma_c():
    model, params = _softmax_regression()
    learner = partial(task_meta_gradient, model, params, steps=1, lr=0.5)
    support, query = _task(torch.Generator().manual_seed(1))
    per_example = terms(learner, support, query, "example")
    mean = learner(support, query)
    assert len(per_example) == 6
    for k in mean:  # the terms average to the task's meta-gradient
        assert torch.allclose(torch.stack([g[k] for g in per_example]).mean(0), mean[k])
    assert clip_to({"a": torch.tensor([3.0, 4.0])}, 1.0)["a"].tolist() == pytest.approx([0.6, 0.8])
    assert clip_to({"a": torch.tensor([0.3, 0.4])}, 1.0)["a"].tolist() == pytest.approx([0.3, 0.4])
    # without noise the result is the mean of the clipped terms; a huge bound leaves g unchanged
    silent = private_gradient(learner, support, query, DpSgd(0.0, 1e6), torch.Generator().manual_seed(0))
    assert all(torch.allclose(silent[k], mean[k]) for k in mean)
    tiny = DpSgd(0.0, 1e-3)
    clipped = private_gradient(learner, support, query, tiny, torch.Generator())
    assert float(torch.sqrt(sum(v.pow(2).sum() for v in clipped.values()))) <= 1e-3 + 1e-12
    # the noise: std sigma * C / n per coordinate, n = 6 terms
    noisy = [private_gradient(learner, support, query, DpSgd(2.0, 1e-3), torch.Generator().manual_seed(s))
             for s in range(40)]  # 40 draws x 10 coordinates
    spread = torch.cat([torch.cat([(g[k] - clipped[k]).reshape(-1) for k in g]) for g in noisy]).std()
    assert float(spread) == pytest.approx(2.0 * 1e-3 / 6, rel=0.15)
    task_level = private_gradient(learner, support, query, DpSgd(0.0, 1e6, "task"), torch.Generator())
    assert all(torch.allclose(task_level[k], mean[k]) for k in mean)


def test_epsilon_from_opacus_matches_the_gaussian_rdp_bound():
    """One release at sample rate 1 is the Gaussian mechanism: RDP alpha / (2 sigma^2), converted
    by Opacus's rule eps = min over its alphas of rdp + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1)."""
    from opacus.accountants import RDPAccountant

    sigma, delta = 2.0, 1e-5
    alphas = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = alphas / (2 * sigma**2)
    by_hand = np.min(rdp + np.log1p(-1 / alphas) - (np.log(delta) + np.log(alphas)) / (alphas - 1))
    assert epsilon(sigma, releases=1, delta=delta) == pytest.approx(by_hand, rel=1e-6)
    assert epsilon(sigma, releases=4, delta=delta) > epsilon(sigma, releases=1, delta=delta)
    assert epsilon(4.0, releases=1, delta=delta) < epsilon(sigma, releases=1, delta=delta)


# --- threat models and the federation round -----------------------------------------------------


def test_secure_aggregation_observes_the_mean_of_the_same_client_updates():
    model, params = _softmax_regression()
    params = {k: v.float() for k, v in params.items()}  # the federation's server weights in float32
    gen = torch.Generator().manual_seed(2)
    tasks = [tuple((x.float(), y) for x, y in _task(gen)) for _ in range(3)]

    def learner(global_params):
        return partial(task_meta_gradient, model, global_params, steps=1, lr=0.5)

    clients = [TaskClient(u, learner, lambda user, _round: tasks[user], None, 0) for u in range(3)]
    mean = round_mean(clients, params, 0, "test", 0)
    single = [learner(params)(*t) for t in tasks]
    for k in params:
        assert torch.allclose(mean[k], torch.stack([g[k] for g in single]).mean(0), atol=1e-7)
    alone = round_mean(clients[:1], params, 0, "test", 0)
    assert all(torch.equal(alone[k], single[0][k]) for k in params)  # one user: the server sees its update exactly


def test_threat_models_are_separate_points_and_validated():
    cfg = load_config("mnist-mia-quick", ["mia.users_per_round=[2, 8]", "mia.sweep_threats=['realistic', 'secagg']",
                                          "mia.ways=[3]"])
    points = plan(cfg)
    threat_stage = [(p.threat, p.users) for p in points if p.stage == "threat"]
    assert threat_stage == [("informed", 1), ("realistic", 1), ("secagg", 2), ("secagg", 8)]
    defended = {(p.threat, p.users, p.defense.kind if p.defense else "none") for p in points if p.stage == "defense"}
    assert ("secagg", 2, "dp") in defended and ("realistic", 1, "gradient") in defended
    assert Point("threat", "informed", 5).fields()["upper_bound"] is True
    assert Point("threat", "secagg", 5, None, 4).fields()["upper_bound"] is False
    for bad, message in (("mia.threats=['curious']", "mia.threats"), ("mia.users_per_round=[1]", "mia.users_per_round"),
                         ("mia.attacks=['shadow']", "mia.attacks"), ("mia.lira.shadows=1", "mia.lira.shadows"),
                         ("mia.dp.unit='batch'", "mia.dp.unit"), ("mia.dp.delta=1.5", "mia.dp.delta"),
                         ("mia.aggregate=[2]", "mia.aggregate")):
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            load_config("mnist-mia-quick", [bad])
    with pytest.raises(ConfigError, match="secagg"):
        load_config("mnist-mia-quick", ["mia.users_per_round=[]"])
    with pytest.raises(ConfigError, match="joint.*realistic"):
        load_config("mnist-mia-quick", ["mia.attacks=['joint']", "mia.threats=['informed']", "mia.sweep_threats=[]"])


def test_a_defense_only_run_attacks_the_defended_models_on_the_threat_stages_tasks():
    """``mia.threats = []`` with ``mia.sweep_undefended = false``: only the defended points, on the
    tasks a threat stage with the same seed attacks (tasks are drawn by seed and trial, not by point)."""
    cfg = load_config("mnist-mia-joint-defense-quick")
    assert [(p.stage, p.threat, p.defense and p.defense.kind) for p in plan(cfg)] == [("defense", "realistic", "inner")]
    assert plan(load_config("mnist-mia-joint-defense-quick", ["mia.sweep_undefended=true"]))[0].defense is None
    with pytest.raises(ConfigError, match=r"mia\.threats is empty and the sweeps attack nothing"):
        load_config("mnist-mia-joint-defense-quick", ["mia.defenses.inner=[]"])
