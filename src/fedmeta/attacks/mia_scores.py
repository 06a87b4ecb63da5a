"""Membership scores that need no reconstruction: a threshold baseline and a calibrated LiRA.

Both read the server's observation ``g`` (one task learner's shared meta-gradient, or the mean of
a round's under secure aggregation) and a candidate (x*, y*), higher meaning "member".

**Threshold baseline** (Yeom et al., CSF 2018: loss threshold; gradient-norm and gradient
alignment as in the FL membership literature, e.g. Nasr et al., S&P 2019). The server takes the
step the observation implies, omega' = omega - alpha g (alpha: the protocol's inner learning rate),
and scores

- ``loss``: -CE(f(omega'; x*), y*): a member's loss drops along a gradient that contains it;
- ``grad-norm``: -||d CE(f(omega'; x*), y*) / d omega'||;
- ``alignment``: cos(d CE(f(omega; x*), y*) / d omega, g).

**LiRA** (Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022, online
attack with per-example variances). The server simulates the protocol on shadow tasks it builds
from public data: each shadow task once with x* in the attacked slot (IN) and once without (OUT),
observed as the real one would be (same defense, same number of users summed). It fits a Gaussian
to a statistic of the IN observations and one to the OUT ones, per candidate, and scores the real
observation by the log likelihood ratio log N(s; mu_in, sd_in^2) - log N(s; mu_out, sd_out^2).
The OUT shadows depend on the candidate only through its class and label, so they can be shared;
the offline variant (no IN shadows) scores by the z-score under the OUT fit. With few shadows, the
global-variance variant (``pooled_variances``) fits each candidate's means but one variance per
side shared by every candidate of the point.
For ``loss`` the statistic is the logit-scaled confidence log p - log(1 - p) of y* under omega',
Carlini et al.'s transform that makes it close to Gaussian.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import Tensor

from fedmeta.models.conv4 import Params
from fedmeta.models.protocol import Model

Statistic = Literal["loss", "grad-norm", "alignment"]
THRESHOLD_SCORES: tuple[Statistic, ...] = ("loss", "grad-norm", "alignment")
MIN_SD = 1e-12
"""Floor of a fitted standard deviation (identical shadow statistics would give an infinite ratio)."""


def _flat(grads: Params | tuple[Tensor, ...]) -> Tensor:
    return torch.cat([g.reshape(-1) for g in (grads.values() if isinstance(grads, dict) else grads)])


def threshold_scores(model: Model, params: Params, observed: Params, x: Tensor, y: int, step: float) -> dict[str, float]:
    """The three baseline scores of candidate (``x``, ``y``) against ``observed`` (higher: member)."""
    label = torch.tensor([y], device=x.device)
    implied = {k: (v - step * observed[k]).detach().requires_grad_() for k, v in params.items()}
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    loss_after = F.cross_entropy(model(implied, x[None]), label)
    grad_after = torch.autograd.grad(loss_after, list(implied.values()))
    grad_before = torch.autograd.grad(F.cross_entropy(model(leaves, x[None]), label), list(leaves.values()))
    alignment = F.cosine_similarity(_flat(grad_before), _flat(observed), dim=0)
    return {"loss": -float(loss_after.detach()), "grad-norm": -float(_flat(grad_after).norm()),
            "alignment": float(alignment)}


def lira_statistic(scores: dict[str, float], statistic: Statistic) -> float:
    """The statistic LiRA fits, from ``threshold_scores``: ``loss`` as logit-scaled confidence."""
    if statistic != "loss":
        return scores[statistic]
    log_p = scores["loss"]  # -CE = log p(y* | x*)
    return log_p - float(np.log(-np.expm1(min(log_p, -1e-12))))  # log p - log(1 - p)


def likelihood_ratio(observed: float, ins: list[float], outs: list[float]) -> float:
    """log N(observed; IN fit) - log N(observed; OUT fit), Gaussians fitted by their moments.

    Without IN statistics this is offline LiRA: the z-score of ``observed`` under the OUT fit,
    a monotone transform of Carlini et al.'s one-sided test 1 - Pr[Z > observed]."""
    return ratio(shadow_fit(observed, ins, outs))


def shadow_fit(observed: float, ins: list[float], outs: list[float]) -> dict[str, float]:
    """What LiRA keeps of one candidate: its observed statistic and the mean and population
    variance of each side's shadow statistics (``mean_in`` and ``var_in`` only online)."""
    fit = {"observed": observed, "mean_out": float(np.mean(outs)), "var_out": float(np.var(outs))}
    if ins:
        fit |= {"mean_in": float(np.mean(ins)), "var_in": float(np.var(ins))}
    return fit


def ratio(fit: Mapping[str, float], var_in: float | None = None, var_out: float | None = None) -> float:
    """The likelihood ratio (offline: z-score) of a ``shadow_fit``, with its own variances or the
    given ones (``pooled_variances``)."""
    sd_out = max(math.sqrt(fit["var_out"] if var_out is None else var_out), MIN_SD)
    if "mean_in" not in fit:
        return (fit["observed"] - fit["mean_out"]) / sd_out
    sd_in = max(math.sqrt(fit["var_in"] if var_in is None else var_in), MIN_SD)
    return float(norm.logpdf(fit["observed"], fit["mean_in"], sd_in)
                 - norm.logpdf(fit["observed"], fit["mean_out"], sd_out))


def pooled_variances(fits: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each side's variance pooled over ``fits`` (the mean of the per-candidate variances, every
    candidate fitted on as many shadows): Carlini et al.'s global variance, which they advise
    when shadow models are few (per-example variances need tens of them), since a variance
    estimated from a handful of statistics is itself mostly noise. Pooling uses no membership
    label: the server pools every candidate it scores. The authors' plotting code
    (tensorflow/privacy ``mi_lira_2021/plot.py``, ``fix_variance``) takes instead one standard
    deviation of all statistics together, the per-example means' spread included: the IN ones for
    both sides online, the OUT ones offline; the within-candidate pooling here is the variance the
    Gaussian model has."""
    pooled = {"var_out": float(np.mean([f["var_out"] for f in fits]))}
    if all("var_in" in f for f in fits):
        pooled["var_in"] = float(np.mean([f["var_in"] for f in fits]))
    return pooled
