"""Membership by reconstructing the rest of the task: the realistic server's joint inversion.

A realistic server knows the candidate x* but none of the task's other images; filling them with
public data, it predicts an observation dominated by those unknown images, and its one-gradient
scores sit at chance (docs/privacy.md). Here it solves for them instead: with x* held in the
attacked slot, every other support and query image starts from a public fill and follows Adam
on the cosine gradient-matching loss (Inverting Gradients' distance and step decay, Geiping et
al., NeurIPS 2020; DLG's joint reconstruction, Zhu et al., NeurIPS 2019), kept in [0, 1]. If x*
is a member the true task is an exact solution (loss 0); if not, no task with x* in that slot
need reproduce the observation, so the loss left after the iterations is the score.

The start matters: a random public task has the wrong class in most of its other ways (on MNIST
each is right with probability 1/9), and 300 Adam steps do not turn a "3" into a "7".
``matched_fill`` chooses the fill among public images by the same matching loss first: each
unknown way's class, then each unknown image (the idea of iDLG's label restoration, Zhao et al.
2020, for the way's class, and of a nearest-neighbour search in gradient space for the images).

Scores (higher means "member"):

- ``joint``: minus the matching loss left after ``iterations`` steps;
- ``joint-cal``: the loss left for a reference (the fill's own image in the slot, a public image
  of the slot's class, so a non-member by construction), reconstructed the same way from the same
  fill, minus the candidate's. It removes how hard the trial's task is to match, which varies
  between trials far more than between candidates (the idea of LiRA's per-example calibration,
  Carlini et al., S&P 2022).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedmeta.attacks.membership import Target, gradient_distance, place, step_decay
from fedmeta.meta.maml import MetaGradient
from fedmeta.models.conv4 import Params

Task = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]
Draw = Callable[[int, int], Tensor]
"""``(public class, n) -> n random public images of that class``, ``[n, C, H, W]``."""
JOINT_SCORES = ("joint", "joint-cal")
CLASS_DRAWS = 3
"""Draws of a class's images over which the class search averages the loss of trying that class
for a way: one draw's exemplars move the loss about as much as the class does."""
CLASS_SWEEPS = 2
"""Passes of the class search over the unknown ways (the first pass chooses each way's class
while the ways after it still hold the public fill's random classes)."""


def joint_residual(learner: MetaGradient, fill: Task, target: Target, slot: int, x: Tensor, observed: Params,
                   iterations: int, lr: float) -> float:
    """The cosine matching loss left after ``iterations`` Adam steps (step ``lr`` in pixel units,
    decayed as ``invert``'s) on every image of ``fill`` but slot ``slot`` of ``target``, which
    holds ``x``. Without the decay Adam keeps taking steps of size ``lr`` on 9 images near a
    minimiser, a noise floor of the same order as a member's residual."""
    (support, support_labels), (query, query_labels) = fill
    support, query = support.clone().requires_grad_(), query.clone().requires_grad_()
    optimiser = torch.optim.Adam([support, query], lr=lr)
    decay = step_decay(optimiser, iterations)
    for _ in range(iterations):
        task = place((support, support_labels), (query, query_labels), target, slot, x)
        loss = gradient_distance(learner(*task, create_graph=True), observed, "cos")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        decay.step()
        with torch.no_grad():
            support.clamp_(0, 1)
            query.clamp_(0, 1)
    task = place((support.detach(), support_labels), (query.detach(), query_labels), target, slot, x)
    return float(gradient_distance(learner(*task), observed, "cos"))


def matched_fill(learner: MetaGradient, fill: Task, target: Target, slot: int, observed: Params,
                 classes: Sequence[int], own: int | None, draw: Draw, pool: int, gen: torch.Generator) -> Task:
    """``fill`` with its unknown images replaced by the public ones that best explain ``observed``.

    First each unknown way's class: every way but the attacked slot's when the public data has
    the candidate's class (``own``), all of them otherwise; tried among ``classes`` (``pool`` of
    them at random where there are more), distinct from the classes already chosen for other
    ways, by the matching loss averaged over ``CLASS_DRAWS`` draws of the way's images; the best
    draw of the chosen class stays. Then each unknown image, once, by the lowest matching loss
    among ``pool`` public images of its way's class. The attacked slot keeps the fill's own
    image throughout, so the fill does not depend on the candidate: a member and its non-members
    start from the same one.
    """
    search = _Search(learner, observed, [fill[0][0].clone(), fill[1][0].clone()], (fill[0][1], fill[1][1]),
                     (0 if target == "support" else 1, slot))
    label = int(search.labels[search.fixed[0]][slot])
    chosen = {} if own is None else {label: own}
    for _ in range(CLASS_SWEEPS):
        for way in [w for w in range(int(search.labels[0].max()) + 1) if own is None or w != label]:
            free = [c for c in classes if c not in {chosen[w] for w in chosen if w != way}]
            if len(free) > pool:
                free = [free[i] for i in torch.randperm(len(free), generator=gen)[:pool].tolist()]
            chosen[way] = search.choose_class(way, free, draw)
    for way, c in sorted(chosen.items()):
        for position in search.positions(way):
            search.choose_image(position, draw(c, pool))
    return (search.images[0], search.labels[0]), (search.images[1], search.labels[1])


@dataclass
class _Search:
    """A fill being matched: its images, and the matching loss of the task they make."""

    learner: MetaGradient
    observed: Params
    images: list[Tensor]  # [support, query], changed in place
    labels: tuple[Tensor, Tensor]
    fixed: tuple[int, int]  # (0 support | 1 query, index): the attacked slot, never changed

    def loss(self) -> float:
        task = (self.images[0], self.labels[0]), (self.images[1], self.labels[1])
        return float(gradient_distance(self.learner(*task), self.observed, "cos"))

    def positions(self, way: int) -> list[tuple[int, int]]:
        """(0 support | 1 query, index) of the way's images, the attacked slot excepted."""
        every = [(s, int(i)) for s in (0, 1) for i in (self.labels[s] == way).nonzero().flatten()]
        return [p for p in every if p != self.fixed]

    def put(self, way: int, batch: Tensor) -> None:
        for (s, i), x in zip(self.positions(way), batch, strict=True):
            self.images[s][i] = x

    def choose_class(self, way: int, classes: list[int], draw: Draw) -> int:
        """The class of ``classes`` with the lowest mean loss over ``CLASS_DRAWS`` draws of the
        way's images; its best draw is left in place."""
        n = len(self.positions(way))
        best: tuple[float, int, Tensor] = (float("inf"), classes[0], self.images[0][:0])
        for c in classes:
            draws = [draw(c, n) for _ in range(CLASS_DRAWS)]
            losses = []
            for batch in draws:
                self.put(way, batch)
                losses.append(self.loss())
            if (mean := sum(losses) / len(losses)) < best[0]:
                best = (mean, c, draws[losses.index(min(losses))])
        self.put(way, best[2])
        return best[1]

    def choose_image(self, position: tuple[int, int], candidates: Tensor) -> None:
        """Leave at ``position`` the image of ``candidates`` (or the one there) with the lowest loss."""
        s, i = position
        best, lowest = self.images[s][i].clone(), self.loss()
        for x in candidates:
            self.images[s][i] = x
            if (value := self.loss()) < lowest:
                best, lowest = x.clone(), value
        self.images[s][i] = best
