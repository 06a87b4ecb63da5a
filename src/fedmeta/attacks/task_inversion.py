"""Membership by reconstructing the rest of the task: the realistic server's joint inversion.

A realistic server knows the candidate x* but none of the task's other images; filling them with
public data, it predicts an observation dominated by those unknown images, and its one-gradient
scores sit at chance (docs/privacy.md). Here it solves for them instead: with x* held in the
attacked slot, every other support and query image starts from the public fill and follows Adam
on the cosine gradient-matching loss (Inverting Gradients' distance, Geiping et al., NeurIPS 2020;
DLG's joint reconstruction, Zhu et al., NeurIPS 2019), kept in [0, 1]. If x* is a member the true
task is an exact solution (loss 0); if not, no task with x* in that slot need reproduce the
observation, so the loss left after the iterations is the score.

Scores (higher means "member"):

- ``joint``: minus the matching loss left after ``iterations`` steps;
- ``joint-cal``: the loss left for a reference (the fill's own image in the slot, a public image
  of the slot's class, so a non-member by construction), reconstructed the same way from the same
  fill, minus the candidate's. It removes how hard the trial's task is to match, which varies
  between trials far more than between candidates (the idea of LiRA's per-example calibration,
  Carlini et al., S&P 2022).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedmeta.attacks.membership import Target, gradient_distance, place
from fedmeta.meta.maml import MetaGradient
from fedmeta.models.conv4 import Params

Task = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]
JOINT_SCORES = ("joint", "joint-cal")


def joint_residual(learner: MetaGradient, fill: Task, target: Target, slot: int, x: Tensor, observed: Params,
                   iterations: int, lr: float) -> float:
    """The cosine matching loss left after ``iterations`` Adam steps (step ``lr`` in pixel units)
    on every image of ``fill`` but slot ``slot`` of ``target``, which holds ``x``."""
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
