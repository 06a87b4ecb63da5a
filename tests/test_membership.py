"""Membership inference on MAML: exact gradients, inversion, scores, defenses, the experiment."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from fedmeta.attacks.membership import (
    expected_observation,
    gradient_distance,
    invert,
    place,
    zero_scores,
)
from fedmeta.attacks.mia_metrics import auc
from fedmeta.attacks.task_inversion import joint_residual, matched_fill
from fedmeta.config import load_config
from fedmeta.defenses.noise import DEFENSES, Noise, rms, shared_gradient
from fedmeta.experiments import run
from fedmeta.meta.maml import task_meta_gradient, task_meta_loss
from fedmeta.models.mlp import Mlp
from fedmeta.models.smallconv import SmallConv
from fedmeta.runs import RunDir


def _task(gen: torch.Generator, ways: int = 2, size: int = 8, dtype=torch.float64):
    """A random 1-shot task with 2 queries per way on ``size`` x ``size`` images."""
    support = (torch.rand(ways, 1, size, size, generator=gen, dtype=dtype), torch.arange(ways))
    query = (torch.rand(2 * ways, 1, size, size, generator=gen, dtype=dtype), torch.arange(ways).repeat_interleave(2))
    return support, query


def _learner(model, seed=0, first_order=False, steps=1, lr=0.5):
    params = {k: v.double() for k, v in model.init(torch.Generator().manual_seed(seed)).items()}
    return partial(task_meta_gradient, model, params, steps=steps, lr=lr, first_order=first_order), params


def _directional(f, x, v, h=1e-6):
    return (f(x + h * v) - f(x - h * v)) / (2 * h)


def test_meta_gradient_matches_finite_differences_for_the_attacked_models():
    gen = torch.Generator().manual_seed(0)
    for model, size in ((SmallConv(1, 16, 2, filters=3), 16), (Mlp(64, 2, (8,)), 8)):
        support, query = _task(gen, size=size)
        learner, params = _learner(model, steps=2)
        grads = learner(support, query)
        direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}

        def loss_at(t: float) -> float:
            shifted = {k: (v + t * direction[k]).requires_grad_() for k, v in params.items()}
            return float(task_meta_loss(model, shifted, support, query, steps=2, lr=0.5, first_order=False).detach())

        numeric = _directional(loss_at, 0.0, 1.0)
        analytic = sum(float((grads[k] * direction[k]).sum()) for k in params)
        assert abs(numeric - analytic) < 1e-6 * max(1.0, abs(numeric)), type(model).__name__


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("target", ["support", "query"])
def test_matching_loss_is_differentiable_in_the_attacked_image(first_order, target):
    """The attacker's d D(g(x), g) / dx equals finite differences, first order included (where the
    shared gradient depends on the support only through the adapted weights)."""
    gen = torch.Generator().manual_seed(1)
    support, query = _task(gen)
    learner, _ = _learner(Mlp(64, 2, (8,)), first_order=first_order)
    observed = learner(*_task(gen))
    predict = expected_observation(learner, support, query, target, 1)
    x = torch.rand(1, 8, 8, generator=gen, dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(gradient_distance(predict(x, True), observed, "cos"), [x])
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    numeric = _directional(lambda z: float(gradient_distance(predict(z, False), observed, "cos")), x.detach(), v)
    assert float(grad.abs().sum()) > 0
    assert abs(numeric - float((grad * v).sum())) < 1e-6 * max(1.0, abs(numeric))


def test_place_replaces_exactly_one_slot():
    support, query = _task(torch.Generator().manual_seed(2))
    x = torch.full((1, 8, 8), 7.0, dtype=torch.float64)
    (s, sy), q = place(support, query, "support", 1, x)
    assert torch.equal(s[1], x) and torch.equal(s[0], support[0][0]) and torch.equal(sy, support[1]) and q is query
    s2, (q2, _) = place(support, query, "query", 3, x)
    assert s2 is support and torch.equal(q2[3], x) and torch.equal(q2[:3], query[0][:3])


def test_inversion_of_an_exact_gradient_recovers_the_example():
    """On a tiny model (softmax regression, where the matching loss is smooth in the image),
    gradient matching on the exact shared gradient, started from a perturbed copy of one query
    example, finds that example."""
    gen = torch.Generator().manual_seed(3)
    support, query = _task(gen, size=6)
    learner, _ = _learner(Mlp(36, 2, ()), seed=3)
    observed = learner(support, query)
    predict = expected_observation(learner, support, query, "query", 0)
    truth = query[0][0]
    prior = (truth + 0.1 * torch.randn(truth.shape, generator=gen, dtype=truth.dtype)).clamp(0, 1)
    result = invert(predict, observed, prior, iterations=200, lr=0.01, distance="l2")
    assert float((result.end - truth).norm()) < 0.1 * float((prior - truth).norm())
    assert result.loss_end < 1e-3 * result.loss_start


def test_a_member_reproduces_the_shared_gradient_and_a_non_member_does_not():
    gen = torch.Generator().manual_seed(4)
    learner, _ = _learner(Mlp(64, 2, (8,)), seed=4)
    members, nonmembers = [], []
    for _ in range(10):
        support, query = _task(gen)
        observed = learner(support, query)
        predict = expected_observation(learner, support, query, "query", 2)
        member = zero_scores(predict, observed, query[0][2])
        assert member["l0-cos"] > -1e-9 and member["l0-l2"] > -1e-20
        members.append(member["l0-cos"])
        nonmembers.append(zero_scores(predict, observed, torch.rand(1, 8, 8, generator=gen, dtype=torch.float64))["l0-cos"])
    assert max(nonmembers) < -1e-6
    assert auc(torch.tensor(members).numpy(), torch.tensor(nonmembers).numpy()) == 1.0


def test_joint_inversion_scores_a_member_zero_and_reconstructs_a_perturbed_task():
    """If the fill is the true task a member's residual is 0 and a non-member's is not; from a
    perturbed fill the Adam steps bring a member's residual down."""
    gen = torch.Generator().manual_seed(5)
    learner, _ = _learner(Mlp(64, 2, (8,)), seed=5)
    support, query = _task(gen)
    observed = learner(support, query)
    stranger = torch.rand(1, 8, 8, generator=gen, dtype=torch.float64)
    assert joint_residual(learner, (support, query), "support", 1, support[0][1], observed, 0, 0.05) < 1e-12
    assert joint_residual(learner, (support, query), "support", 1, stranger, observed, 0, 0.05) > 1e-4

    def perturbed(images: torch.Tensor) -> torch.Tensor:
        return (images + 0.2 * torch.rand(images.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)

    noisy = (perturbed(support[0]), support[1]), (perturbed(query[0]), query[1])
    start = joint_residual(learner, noisy, "support", 1, support[0][1], observed, 0, 0.01)
    assert joint_residual(learner, noisy, "support", 1, support[0][1], observed, 60, 0.01) < 0.5 * start


def test_random_independent_gradients_give_chance_level_scores():
    """An observation independent of the task carries no membership signal: AUC about 0.5."""
    gen = torch.Generator().manual_seed(5)
    learner, params = _learner(Mlp(64, 2, (8,)), seed=5)
    scores: dict[str, dict[str, list[float]]] = {}
    for t in range(150):
        support, query = _task(gen)
        observed = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
        predict = expected_observation(learner, support, query, "support", 0)
        priors = {"member": support[0][0], "nonmember": torch.rand(1, 8, 8, generator=gen, dtype=torch.float64)}
        for who, prior in priors.items():
            found = zero_scores(predict, observed, prior)
            if t < 40:  # a short inversion too: how far it moves says nothing either
                run = invert(predict, observed, prior, iterations=5, lr=0.01, distance="cos")
                found["distance"] = -float((run.end - run.start).norm())
            for name, value in found.items():
                scores.setdefault(name, {"member": [], "nonmember": []})[who].append(value)
    assert set(scores) == {"l0-cos", "l0-l2", "distance"}
    for name, by in scores.items():
        found = auc(torch.tensor(by["member"]).numpy(), torch.tensor(by["nonmember"]).numpy())
        assert abs(found - 0.5) < 0.15, (name, found)


def test_defenses_are_reproducible_and_noise_what_they_say():
    gen = torch.Generator().manual_seed(6)
    support, query = _task(gen)
    learner, _ = _learner(Mlp(64, 2, (8,)), seed=6)
    clean = learner(support, query)
    assert all(torch.equal(clean[k], v) for k, v in shared_gradient(learner, support, query, None, gen).items())
    for kind in DEFENSES:
        noisy = [shared_gradient(learner, support, query, Noise(kind, 0.5), torch.Generator().manual_seed(9)) for _ in range(2)]
        assert all(torch.equal(noisy[0][k], noisy[1][k]) for k in clean), kind  # same generator, same noise
        assert any(not torch.allclose(noisy[0][k], clean[k]) for k in clean), kind
    # gradient noise of scale 2 puts twice the RMS coordinate of g into every coordinate
    wide, _ = _learner(Mlp(64, 2, (512,)), seed=6)
    g = wide(support, query)
    noisy = shared_gradient(wide, support, query, Noise("gradient", 2.0), torch.Generator().manual_seed(1))
    assert float(rms([noisy[k] - g[k] for k in g]) / rms(list(g.values()))) == pytest.approx(2.0, rel=0.05)


def test_gradient_noise_hides_membership():
    gen = torch.Generator().manual_seed(7)
    learner, _ = _learner(Mlp(64, 2, (8,)), seed=7)
    members, nonmembers = [], []
    for _ in range(60):
        support, query = _task(gen)
        observed = shared_gradient(learner, support, query, Noise("gradient", 1e3), gen)
        predict = expected_observation(learner, support, query, "support", 1)
        members.append(zero_scores(predict, observed, support[0][1])["l0-l2"])
        nonmembers.append(zero_scores(predict, observed, torch.rand(1, 8, 8, generator=gen, dtype=torch.float64))["l0-l2"])
    assert abs(auc(torch.tensor(members).numpy(), torch.tensor(nonmembers).numpy()) - 0.5) < 0.15


TINY = [
    "meta.iterations=3", "meta.meta_batch=2", "eval.episodes=4", "mia.trials=2", "mia.iterations=2",
    "mia.sweep_trials=2", "mia.users_per_round=[2]", "mia.ways=[2]", "mia.classifier_steps=2", "mia.shadow_tasks=2",
    "mia.reconstructions=2", "mia.defenses.gradient=[1.0]", "mia.defenses.support=[0.1]",
    "mia.defenses.query=[0.1]", "mia.defenses.inner=[1.0]", "mia.dp.noise_multipliers=[1.0]", "mia.sweep_iterations=0",
    "mia.lira.shadows=2", "mia.bootstrap=10", "mia.attacks=['inversion', 'threshold', 'lira', 'joint']",
    "mia.joint.iterations=1", "mia.joint.trials=2", "mia.joint.pool=2",
]


def _run(path, overrides=()):
    cfg = load_config("mnist-mia-quick", TINY + list(overrides))
    folder = RunDir.open(path, cfg)
    run(cfg, folder)
    return folder


def test_membership_run_writes_every_point(tmp_path, data_root):
    whole = _run(tmp_path / "whole", ["mia.joint.fill=public"])  # the matched fill: the resume test below
    lines = whole.records()
    stages = {(r["stage"], r["threat"], r["defense"], r["users"], r["ways"]) for r in lines}
    assert {("threat", "informed", "none", 1, 5), ("threat", "realistic", "none", 1, 5),
            ("threat", "secagg", "none", 2, 5), ("ways", "realistic", "none", 1, 2)} <= stages
    assert {d for s, _, d, _, _ in stages if s == "defense"} == {"none", "dp", *DEFENSES}
    assert {r["score"] for r in lines if r["threat"] == "informed"} == {
        "l0-cos", "l0-l2", "lt", "distance", "class", "loss", "grad-norm", "alignment"}  # no LiRA: nothing to calibrate
    assert {"lira", "lira-global"} <= {r["score"] for r in lines if r["threat"] == "secagg"}
    joint = [r for r in lines if r["attack"] == "joint"]
    assert {r["threat"] for r in joint} == {"realistic"} and {r["score"] for r in joint} == {"joint", "joint-cal"}
    assert {(r["trials"], r["iterations"]) for r in joint} == {(2, 1)}
    # the inversion steps each point ran: mia.iterations (2) for the informed server, the only one in
    # mia.invert_threats; 0 for the others, which get the zero-iteration scores
    ran = {(r["stage"], r["threat"], r["iterations"]) for r in lines if r["attack"] != "joint"}
    assert {t: {i for _, u, i in ran if u == t} for t in ("informed", "realistic", "secagg")} == {
        "informed": {2}, "realistic": {0}, "secagg": {0}}
    assert {i for s, t, i in ran if t == "secagg"} == {0}
    assert all(r["upper_bound"] == (r["threat"] == "informed") for r in lines)
    assert all(r["epsilon_substitution"] > r["epsilon"] > 0 for r in lines if r["defense"] == "dp")
    for r in lines:
        for m in ("attack_auc", "attack_accuracy", "tpr_at_0.1pct_fpr", "tpr_at_1pct_fpr"):
            assert 0 <= r[m] <= 1 and 0 <= r[f"{m}_low"] <= r[f"{m}_high"] <= 1, (m, r)
        assert 0 <= r["meta_test_accuracy"] <= 1
    summary = json.loads((whole.path / "summary.json").read_text())
    assert summary["points"] and "meta_test_accuracy" in summary
    dp = [p for name, p in summary["points"].items() if "defense=dp" in name]
    assert dp and all(p["epsilon_substitution"] > p["epsilon"] > 0 and p["delta"] > 0 for p in dp)
    assert (whole.path / "reconstructions.safetensors").is_file()

    from fedmeta.plots import _membership, plot_runs

    assert plot_runs([whole.path], tmp_path / "figure.png").stat().st_size > 10_000
    threat_only = [r for r in lines if r["stage"] == "threat" and r["nonmember"] == "same-class"]
    (panel,) = _membership(threat_only, tmp_path / "none.safetensors").axes  # a run without sweeps: its scores
    assert len(panel.get_xticklabels()) == len(threat_only)


THREATS_ONLY = ["mia.defenses.gradient=[]", "mia.defenses.support=[]", "mia.defenses.query=[]",
                "mia.defenses.inner=[]", "mia.dp.noise_multipliers=[]", "mia.ways=[]", "mia.joint.fill=matched"]


def test_membership_run_resumes_to_the_same_metrics(tmp_path, monkeypatch, data_root):
    """Killed in its second point (the realistic server's, with the joint inversion from a matched
    fill), a run resumed in the same folder ends with the records of one that ran through."""
    lines = _run(tmp_path / "whole", THREATS_ONLY).records()
    assert {r["threat"] for r in lines} == {"informed", "realistic", "secagg"}

    import fedmeta.experiments.membership as experiment

    real, calls = experiment.attack, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "attack", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "resumed", THREATS_ONLY)
    monkeypatch.setattr(experiment, "attack", real)
    resumed = _run(tmp_path / "resumed", THREATS_ONLY).records()
    # the same numbers up to round-off: the reloaded weights may differ in memory layout, and a
    # member's inversion steps on round-off (see ``invert``)
    assert len(resumed) == len(lines)
    for again, first in zip(resumed, lines):
        assert again == pytest.approx(first, abs=1e-4)


def test_a_run_killed_inside_a_points_attack_goes_on_from_its_last_task(tmp_path, monkeypatch, data_root):
    """Killed while attacking the realistic server's second task, a rerun attacks that task and
    the later ones only, and ends with the records of a run that went through."""
    import fedmeta.experiments.membership as experiment

    realistic = [*THREATS_ONLY, "mia.threats=['realistic']", "mia.trials=3", "mia.joint.trials=3",
                 "mia.joint.fill=public"]
    lines = _run(tmp_path / "whole", realistic).records()
    real, observed = experiment.observe, []

    def observe(ctx, point, params, trial, t):
        observed.append((point.threat, t))
        if observed[-1] == ("realistic", 1) and kill:
            raise KeyboardInterrupt
        return real(ctx, point, params, trial, t)

    monkeypatch.setattr(experiment, "observe", observe)
    monkeypatch.setattr(experiment, "SAVE_EVERY", 0.0)  # a save after every task
    kill = True
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "resumed", realistic)
    assert list((tmp_path / "resumed").glob("attack-point-*.partial.safetensors"))  # task 0's scores, saved
    kill, observed[:] = False, []
    resumed = _run(tmp_path / "resumed", realistic).records()
    assert [t for threat, t in observed if threat == "realistic"] == [1, 2]  # not task 0 again
    assert not list((tmp_path / "resumed").glob("*.partial.safetensors"))
    assert len(resumed) == len(lines)
    for again, first in zip(resumed, lines):  # up to round-off, as in the test above
        assert again == pytest.approx(first, abs=1e-4)


def test_a_point_whose_scores_overflow_is_not_scored_and_the_others_are(tmp_path, monkeypatch, data_root):
    """A defense whose noise makes the attacked user's adaptation diverge sends a finite but huge
    update (1e23 at 30 x RMS inner-loop noise): that point stops at its first task, naming it, the
    task and the scores, and keeps its model's accuracy; the other points are scored, the summary
    written, and the run ends with an error that names the point."""
    import fedmeta.experiments.membership as experiment
    from fedmeta.runs import RunError

    real, observed = experiment.observe, []

    def diverged(ctx, point, params, trial, t):
        update = real(ctx, point, params, trial, t)
        if point.threat == "realistic":
            observed.append(t)
            return {k: v * 1e30 for k, v in update.items()}
        return update

    monkeypatch.setattr(experiment, "observe", diverged)
    with pytest.raises(RunError, match=r"1 point\(s\) not scored.*threat/realistic/ways-5/none/users-1, task 0: the "
                                       r"member candidate's scores .*l0-l2.* are not finite"):
        _run(tmp_path / "run", [*THREATS_ONLY, "mia.threats=['informed', 'realistic']", "mia.trials=3",
                                "mia.joint.trials=2"])
    assert observed == [0]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (unscored,) = [r for r in lines if r["threat"] == "realistic"]
    assert "task 0" in unscored["not_scored"] and 0 <= unscored["meta_test_accuracy"] <= 1
    assert unscored["score"] == "not-scored"
    assert {r["score"] for r in lines if r["threat"] == "informed"} >= {"l0-cos", "loss"}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["not_scored"]) == ["threat threat=realistic users=1 ways=5 defense=none scale=0"]
    from fedmeta.plots import plot_runs
    from fedmeta.reports import write_report

    assert plot_runs([tmp_path / "run"], tmp_path / "figure.png").is_file()  # the figures read past the line
    assert write_report([tmp_path / "run"], tmp_path / "report")


@pytest.mark.slow
def test_quick_preset_meets_the_bar(tmp_path):
    """Without a defense the informed server's support or query attack reaches AUC >= 0.8 (MNIST 5-way 1-shot)."""
    cfg = load_config("mnist-mia-quick")
    folder = RunDir.open(tmp_path / "quick", cfg)
    run(cfg, folder)
    main = [r for r in folder.records() if r["stage"] == "threat" and r["threat"] == "informed" and r["score"] == "distance"]
    assert max(r["attack_auc"] for r in main) >= 0.8


def test_epsilon_for_replacing_one_term_is_the_accountants_at_half_the_noise():
    """Two clipped terms differ by up to 2C: replacing one is the add/remove mechanism at sigma / 2."""
    from fedmeta.defenses.dp import epsilon

    add_remove = epsilon(1.0, releases=1, delta=1e-5)
    assert add_remove == pytest.approx(4.7285, abs=1e-3)  # Opacus's RDP accountant, as privacy.md quotes it
    replace_one = epsilon(1.0, releases=1, delta=1e-5, sensitivity=2.0)
    assert replace_one == pytest.approx(epsilon(0.5, releases=1, delta=1e-5), rel=1e-12)
    assert replace_one == pytest.approx(10.7255, abs=1e-3)


def test_matched_fill_finds_the_classes_of_the_unknown_ways():
    """Public data of 5 classes, each a prototype with small noise, holds the task's own images;
    the task has classes (0, 3, 1) at its ways and the candidate's slot is support 0 (class 0
    known). From a fill of wrong classes, the search puts class 3 at way 1 and class 1 at way 2,
    and the retrieved images match the observation better than the fill did."""
    gen = torch.Generator().manual_seed(6)
    prototypes = torch.rand(5, 1, 8, 8, generator=gen, dtype=torch.float64)
    public = (prototypes[:, None] + 0.1 * torch.rand(5, 4, 1, 8, 8, generator=gen, dtype=torch.float64)).clamp(0, 1)
    classes, labels = (0, 3, 1), torch.arange(3)
    rows = list(classes)
    truth = ((public[rows, 0], labels), (public[rows, 1:3].flatten(0, 1), labels.repeat_interleave(2)))
    learner, _ = _learner(Mlp(64, 3, (8,)), seed=6)
    observed = learner(*truth)
    fill = ((torch.stack([truth[0][0][0], public[2, 0], public[4, 0]]), labels),
            (torch.cat([public[0, 2:4], public[2, 1:3], public[4, 1:3]]), truth[1][1]))

    def draw(c: int, n: int) -> torch.Tensor:
        return public[c][torch.randint(4, (n,), generator=gen)]

    matched = matched_fill(learner, fill, "support", 0, observed, range(5), 0, draw, 16, gen)
    assert torch.equal(matched[0][0][0], truth[0][0][0])  # the attacked slot is left alone
    for way, c in enumerate(classes):  # every image of way `way` is one of class c's
        for image in (matched[0][0][way], *matched[1][0][2 * way : 2 * way + 2]):
            assert min(float((image - p).abs().max()) for p in public[c]) == 0.0
    before, after = (float(gradient_distance(learner(*task), observed, "cos")) for task in (fill, matched))
    assert after < 0.5 * before
