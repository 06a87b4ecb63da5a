"""Model replacement with a norm bound: constrain-and-scale (Bagdasaryan et al., "How To Backdoor
Federated Learning", AISTATS 2020, Sec. 4 and Algorithm 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from fedmeta.attacks.steering import Steer, SteeredAttack, Steering, ball, chain
from fedmeta.attacks.strategies import AttackerContext, BoundOptions
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.updates import flatten, unflatten
from fedmeta.meta.learner import outer_rate
from fedmeta.models.conv4 import Params
from fedmeta.registry import ATTACKS


class ReplacementOptions(BoundOptions):
    alpha: float = Field(0.7, gt=0.0, le=1.0)
    """Weight of the class loss against a rule that checks the updates; 1 - alpha weighs the
    anomaly term (1: plain training, then scaling)."""
    alpha_unchecked: float = Field(1.0, gt=0.0, le=1.0)
    """alpha against plain FedAvg, which checks nothing: 1, no anomaly term (both reference
    implementations' default, ``alpha_loss: 1``); the term is there to evade a detector."""
    anomaly: Literal["global", "benign"] = "global"
    """L_ano = ||(theta - theta_G) - r|| with r = 0 ("global": distance to the global model) or r =
    the mean of the estimated benign updates ("benign": distance to a benign-looking update)."""


@dataclass(frozen=True)
class Replacement(SteeredAttack):
    """Constrain-and-scale. Each round, from the global model theta_G:

    1. The bound S: the rule's norm cap (``rules.clip.norm``) if it has one; none against plain
       FedAvg, which checks nothing; otherwise (a rule that filters without a known cap) ``slack``
       times the median norm of ``estimates`` benign updates the attacker computes from theta_G
       on its own (and its colluders') clean classes (``AttackerContext.norm_bound``).
    2. Local training on poisoned episodes minimising L = alpha L_class + (1 - alpha) L_ano
       (against plain FedAvg, ``alpha_unchecked``: by default 1, plain training). The
       meta-learner's outer step is theta' = theta - eps grad L_class (Reptile: eps (phi - theta),
       phi the inner-loop weights; MAML: its outer step), so each outer step becomes
       theta <- theta + alpha (theta' - theta) - (1 - alpha) eps grad L_ano(theta), with
       L_ano = ||v||, v = (theta - theta_G) - r, the plain L2 distance of Bagdasaryan's code
       (``model_dist_norm_var``), so grad L_ano = v / ||v||: a pull of fixed length towards the
       reference, whatever the distance (0 at v = 0), and eps the outer step size (``meta.meta_lr``,
       annealed). (Until 2026-12-07 L_ano was 1/2 ||v||^2, a pull that shrinks near the reference.)
       With a bound, every outer step is also projected back onto the ball ||theta - theta_G|| <= S,
       as Bagdasaryan's code does after each SGD step when the server bounds norms
       (``diff_privacy``, ``s_norm``): the backdoor is learned inside what the rule lets through,
       not trained freely and shrunk afterwards.
    3. Scaling by Bagdasaryan's gamma = n / eta with eta = 1 (the server's rate), shared among the
       f colluders: gamma = n / f, so that together they replace the model. n: the updates the
       server averages (``federation.min_updates``; every one of the round's under secure
       aggregation); f: the malicious users attacking in this round (his
       ``current_number_of_adversaries``; until 2026-12-07, every malicious user of the run and n =
       ``per_round``, the same in every preset). With a bound, the scaled update is then clipped
       to S (the reference's last step), so it is sent with norm min(gamma ||X - theta_G||, S): S
       whenever training reached the ball.
    """

    estimates: int
    slack: float
    alpha: float
    anomaly: str
    alpha_unchecked: float = 1.0

    def steering(self, global_params: Params, settings: RoundSettings) -> Steering:
        ctx = self.ctx
        alpha = self.alpha_unchecked if ctx.unchecked else self.alpha
        anomaly = self.anomaly == "benign" and alpha < 1  # at alpha = 1 the anomaly term has no weight
        # benign estimates (on streams of their own) only where the anomaly term or the bound uses them
        needed = anomaly or not (ctx.knows_norm_bound or ctx.unchecked)
        benign = ctx.benign_updates(global_params, settings, self.estimates) if needed else None
        reference = benign.mean(dim=0) if anomaly else torch.zeros_like(flatten(global_params))
        gamma = ctx.averaged / ctx.attacking(settings.round)
        step = self.constrained(global_params, reference, alpha)
        if ctx.unchecked:
            return Steering(step, lambda delta: gamma * delta)
        bound = ctx.norm_bound(benign, self.slack)
        return Steering(chain(step, ball(global_params, bound)), lambda delta: clipped(gamma * delta, bound))

    def constrained(self, anchor: Params, reference: Tensor, alpha: float | None = None) -> Steer:
        """The outer step on alpha L_class + (1 - alpha) L_ano (step 2; default alpha: ``self.alpha``)."""
        centre, cfg = flatten(anchor), self.training.learner.cfg
        alpha = self.alpha if alpha is None else alpha

        def step(before: Params, after: Params, progress: float) -> Params:
            theta = flatten(before)
            v = theta - centre - reference
            pull = (1.0 - alpha) * outer_rate(cfg, progress) * v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)
            return unflatten(theta + alpha * (flatten(after) - theta) - pull, anchor)

        return step


def clipped(delta: Tensor, norm: float) -> Tensor:
    """``delta`` scaled down to L2 norm ``norm`` if it is longer (a zero update stays zero)."""
    return delta * (norm / delta.norm().clamp_min(torch.finfo(delta.dtype).tiny)).clamp(max=1.0)


@ATTACKS.register("replacement", options=ReplacementOptions, knows_rule="norm", revision=3)  # 3: L2 anomaly term
# (2: per-step projection)
def replacement(ctx: AttackerContext, episodes: int, inner_epochs: float, estimates: int, slack: float, alpha: float,
                anomaly: str, alpha_unchecked: float) -> Replacement:
    """Model replacement with a norm bound (Bagdasaryan et al., AISTATS 2020): training that keeps
    the update close to the global model (or a benign one) and inside the norm the rule lets
    through, then scaled by n / f, at most up to that norm."""
    return Replacement(ctx, ctx.poisoned_client(episodes, inner_epochs), estimates, slack, alpha, anomaly,
                       alpha_unchecked)
