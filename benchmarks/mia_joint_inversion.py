"""A realistic membership server that reconstructs the task's unknown images, measured.

The realistic server of ``experiments/membership.py`` fills the 9 slots of the task it does not
know with public images and compares the observed meta-gradient with the one it predicts; the
unknown images dominate the gradient, and it scores at chance (docs/privacy.md). This probe lets
the server solve for them instead: with the candidate x* held in the attacked slot, the other
support and query images start from the same public fill and follow Adam on the cosine
gradient-matching loss (Inverting Gradients' distance, Geiping et al. 2020; DLG's joint
reconstruction, Zhu et al. 2019), kept in [0, 1]. If x* is a member, the true task is an exact
solution (loss 0); if not, no task with x* in that slot need reproduce the observation.

Scores (higher means "member"), member against same-class non-member, AUC with a 95% bootstrap
interval:

- ``residual``: minus the matching loss after the iterations;
- ``calibrated``: the loss of a reference (a public image of the slot's class, a non-member by
  construction, reconstructed the same way from the same fill) minus the candidate's: it removes
  how hard the trial's task is to match, which varies between trials far more than between
  candidates (the idea of LiRA's per-example calibration, Carlini et al. 2022).

On the run's own model, trials and observations (the realistic server, one user, no defense):

    python benchmarks/mia_joint_inversion.py mnist-mia-quick --trials 30 --iterations 300 --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedmeta.attacks.membership import Target, gradient_distance, place
from fedmeta.attacks.mia_metrics import summarize
from fedmeta.config import load_config
from fedmeta.experiments.membership import Context, Point, draw_trial, model_for, observe, slot_of
from fedmeta.meta.maml import MetaGradient
from fedmeta.models.conv4 import Params
from fedmeta.rng import stream

Task = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]


def residual(learner: MetaGradient, fill: Task, target: Target, slot: int, x: Tensor, observed: Params,
             iterations: int, lr: float) -> float:
    """The cosine matching loss after ``iterations`` Adam steps on every image of ``fill`` but the
    slot, which holds ``x``."""
    (support, support_labels), (query, query_labels) = fill
    support, query = support.clone().requires_grad_(), query.clone().requires_grad_()
    optimiser = torch.optim.Adam([support, query], lr=lr)
    for _ in range(iterations):
        task = place((support, support_labels), (query, query_labels), target, slot, x)
        loss = gradient_distance(learner(*task, create_graph=True), observed, "cos")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            support.clamp_(0, 1)
            query.clamp_(0, 1)
    task = place((support.detach(), support_labels), (query.detach(), query_labels), target, slot, x)
    return float(gradient_distance(learner(*task), observed, "cos"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05, help="Adam step on the images, in pixel units")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    cfg = load_config(args.preset, args.overrides)
    ctx = Context.build(cfg)
    point = Point("threat", "realistic", cfg.meta.ways)
    params, accuracy = model_for(ctx, point)
    learner = ctx.learner(point.ways, params)
    losses: dict[tuple[str, str], list[float]] = {}
    for t in range(args.trials):
        trial = draw_trial(cfg, ctx.test, point.ways, stream(cfg.seed, "mia-trial", point.ways, t))
        observed = observe(ctx, point, params, trial, t)
        for target in cfg.mia.targets:
            y, test_class = trial.label(target), trial.classes[target]["member"]
            # One public fill per trial and target, shared by every candidate (common random numbers);
            # its own image in the slot is the reference, of the slot's class where public data has it.
            fill = ctx.public_task(point.ways, y, test_class, stream(cfg.seed, "mia-server", point.key, t, target))
            slot = slot_of(fill, target, y)
            reference = (fill[0] if target == "support" else fill[1])[0][slot]
            for kind, x in (("member", trial.candidates[target]["member"]),
                            ("same-class", trial.candidates[target]["same-class"]), ("reference", reference)):
                losses.setdefault((target, kind), []).append(
                    residual(learner, fill, target, slot, x, observed, args.iterations, args.lr))
        print(f"trial {t + 1}/{args.trials}: " + ", ".join(f"{k[0]} {k[1]} {v[-1]:.4f}" for k, v in losses.items()),
              flush=True)
    result = {"preset": args.preset, "overrides": args.overrides, "trials": args.trials,
              "iterations": args.iterations, "lr": args.lr, "meta_test_accuracy": accuracy.mean, "auc": {},
              "losses": {f"{k[0]}/{k[1]}": v for k, v in losses.items()}}
    print(f"meta-test accuracy {100 * accuracy.mean:.2f}%")
    for target in cfg.mia.targets:
        member, nonmember, reference = (np.array(losses[(target, k)]) for k in ("member", "same-class", "reference"))
        for name, m, n in (("residual", -member, -nonmember),
                           ("calibrated", reference - member, reference - nonmember)):
            found = summarize(m, n, resamples=1000, seed=0)["auc"]
            result["auc"][f"{target}/{name}"] = [found.value, found.low, found.high]
            print(f"{target:8} {name:10} AUC {found.value:.3f} [{found.low:.3f}, {found.high:.3f}]")
        result[f"{target}/member_below_nonmember"] = float((member < nonmember).mean())
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
