"""Why the realistic membership server scores at chance: the last layer's meta-gradient, measured.

A linear head's gradient on a batch is sum_i (p_i - e_{y_i}) h_i^T, so its rows span the features
h_i of the examples it was computed on (Phong et al. 2018; Zhu & Blaschko, R-GAP, 2021). A server
that knows only the candidate x* can therefore ask, without reconstructing the task's 9 unknown
images: does h(x*) lie in the row space of the observed head gradient? The score is
-||h - P h|| / ||h||, P the projection onto that row space (``head-span``).

On the run's own model, trials and observations (``experiments/membership.py``: ``model_for``,
``draw_trial``, ``observe``; the realistic server, one user, no defense), this prints, member
against same-class non-member, with 95% bootstrap intervals:

- ``observed``: head-span against the observed head gradient, h at omega (what the server can do);
- ``oracle first order``: head-span against the first-order head gradient dL_q/dW' at the
  adapted weights omega', h at omega' (both need the unknown support set: an upper reference);
- the size of the second-order part: ||observed - first order|| / ||first order||.

    python benchmarks/mia_head_diagnostic.py mnist-mia-quick --trials 200 --set seed=1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedmeta.attacks.mia_metrics import summarize
from fedmeta.config import load_config
from fedmeta.experiments.membership import Context, Point, draw_trial, model_for, observe
from fedmeta.meta.maml import sgd_adapt
from fedmeta.models.build import build_model
from fedmeta.models.conv4 import Params
from fedmeta.rng import stream

HEAD = "head.weight"


def head_span(gradient: Tensor, features: Tensor) -> float:
    """-||h - P h|| / ||h||, P the projection onto the row space of the head gradient [ways, d]."""
    _, s, vt = torch.linalg.svd(gradient, full_matrices=False)
    basis = vt[: int((s > s[0] * 1e-6).sum())]
    return -float((features - basis.T @ (basis @ features)).norm() / features.norm())


def features(model, params: Params, x: Tensor) -> Tensor:
    """h(x), the head's input, for any model with a linear head: d logit_0 / d head.weight[0]."""
    head = params[HEAD].detach().requires_grad_()
    return torch.autograd.grad(model({**params, HEAD: head}, x[None])[0, 0], head)[0][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    cfg = load_config(args.preset, args.overrides)
    ctx = Context.build(cfg)
    point = Point("threat", "realistic", cfg.meta.ways)
    params, accuracy = model_for(ctx, point)
    model = build_model(cfg.model, ctx.train.image_shape, cfg.meta.ways)
    scores: dict[tuple[str, str, str], list[float]] = {}
    ratios = []
    for t in range(args.trials):
        trial = draw_trial(cfg, ctx.test, point.ways, stream(cfg.seed, "mia-trial", point.ways, t))
        observed = observe(ctx, point, params, trial, t)[HEAD]
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        inner = sgd_adapt(model, leaves, *trial.support, steps=cfg.meta.inner_steps, lr=cfg.meta.inner_lr,
                          create_graph=False)  # the task learner's inner loop
        query_loss = F.cross_entropy(model(inner, trial.query[0]), trial.query[1])
        first_order = torch.autograd.grad(query_loss, inner[HEAD])[0]
        ratios.append(float((observed - first_order).norm() / first_order.norm()))
        for target in cfg.mia.targets:
            for kind in ("member", "same-class"):
                x = trial.candidates[target][kind]
                for name, value in (("observed", head_span(observed, features(model, params, x))),
                                    ("oracle first order", head_span(first_order, features(model, inner, x)))):
                    scores.setdefault((target, kind, name), []).append(value)
    result = {"preset": args.preset, "overrides": args.overrides, "trials": args.trials,
              "meta_test_accuracy": accuracy.mean, "second_order_ratio_median": float(np.median(ratios)), "auc": {}}
    print(f"meta-test accuracy {100 * accuracy.mean:.2f}%; ||observed - first order|| / ||first order|| "
          f"(head, median over trials): {result['second_order_ratio_median']:.2f}")
    for target in cfg.mia.targets:
        for name in ("observed", "oracle first order"):
            members, nonmembers = scores[(target, "member", name)], scores[(target, "same-class", name)]
            found = summarize(np.array(members), np.array(nonmembers), resamples=1000, seed=0)["auc"]
            result["auc"][f"{target}/{name}"] = [found.value, found.low, found.high]
            print(f"{target:8} head-span, {name:19} AUC {found.value:.3f} [{found.low:.3f}, {found.high:.3f}]")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
