"""Where the realistic server's joint inversion starts, and what that is worth: measured on the same tasks.

The joint inversion (``fedmeta.attacks.task_inversion``) scores a candidate by the matching loss
left after reconstructing the task's other images around it. Its start decides how far 300 Adam
steps get. On the run's own model, trials and observations (``experiments/membership.py``; the
realistic server, one user, no defense, the support slot), this runs the inversion from three
starts on each task, for the member, the same-class non-member and the reference (the fill's own
public image in the slot):

- ``public``: the server's random public task (``mia.joint.fill = "public"``);
- ``matched``: that task with its classes and images matched to the observation (``"matched"``);
- ``truth``: the true task, the non-member in the slot (an oracle, not an attack): the loss a
  non-member keeps even from the member's exact task, i.e. how far apart the two hypotheses are
  for an optimiser that found the task.

It prints, per start, the mean residuals, the non-member's minus the member's (paired, 95%
t-interval over tasks) and the AUC of ``joint`` and ``joint-cal`` with 95% bootstrap intervals.

    python benchmarks/mia_joint_start.py mnist-mia-joint-quick --trials 40 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats

from fedmeta.attacks.mia_metrics import summarize
from fedmeta.attacks.task_inversion import joint_residual
from fedmeta.config import load_config
from fedmeta.experiments.membership import Context, Point, adversary, draw_trial, matched, model_for, observe, slot_of
from fedmeta.rng import stream

KINDS = ("member", "same-class", "reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    cfg = load_config(args.preset, [*args.overrides, "mia.attacks=['joint']"])
    ctx = Context.build(cfg)
    point = Point("threat", "realistic", cfg.meta.ways)
    params, accuracy = model_for(ctx, point)
    server = adversary(ctx, point, params)
    joint = cfg.mia.joint
    rows = []
    for t in range(args.trials):
        clock = time.perf_counter()
        trial = draw_trial(cfg, ctx.test, point.ways, stream(cfg.seed, "mia-trial", point.ways, t))
        observed = observe(ctx, point, params, trial, t)
        y, test_class = trial.label("support"), trial.classes["support"]["member"]
        public = ctx.public_task(point.ways, y, test_class, stream(cfg.seed, "mia-server", point.key, t, "support"))
        slot = slot_of(public, "support", y)
        fitted = matched(ctx, server, public, "support", slot, observed, (t, "support", test_class))
        starts = {"public": (public, slot), "matched": (fitted, slot),
                  "truth": ((trial.support, trial.query), trial.slots["support"])}
        row = {}
        for start, (task, at) in starts.items():
            candidates = {"member": trial.candidates["support"]["member"],
                          "same-class": trial.candidates["support"]["same-class"], "reference": task[0][0][at]}
            for kind in ("same-class",) if start == "truth" else KINDS:
                row[f"{start}/{kind}"] = joint_residual(server.learner, task, "support", at, candidates[kind], observed,
                                                        joint.iterations, joint.lr)
        rows.append(row)
        print(f"task {t}: {time.perf_counter() - clock:.0f} s " + " ".join(f"{k} {v:.3f}" for k, v in row.items()),
              flush=True)
    result = {"preset": args.preset, "overrides": args.overrides, "trials": args.trials,
              "meta_test_accuracy": accuracy.mean, "rows": rows, "starts": {}}
    print(f"meta-test accuracy {100 * accuracy.mean:.2f}%, {args.trials} tasks, {joint.iterations} steps")
    for start in ("public", "matched"):
        member, nonmember, reference = (np.array([r[f"{start}/{k}"] for r in rows]) for k in KINDS)
        gap = nonmember - member
        half = stats.t.ppf(0.975, len(gap) - 1) * gap.std(ddof=1) / np.sqrt(len(gap))
        aucs = {name: summarize(m, n, resamples=1000, seed=0)["auc"]
                for name, m, n in (("joint", -member, -nonmember), ("joint-cal", reference - member,
                                                                      reference - nonmember))}
        result["starts"][start] = {"member": member.mean(), "nonmember": nonmember.mean(), "gap": [gap.mean(), half],
                                   **{k: [a.value, a.low, a.high] for k, a in aucs.items()}}
        print(f"{start:8} residual member {member.mean():.3f}, non-member {nonmember.mean():.3f}, "
              f"gap {gap.mean():.4f} ± {half:.4f}; " + ", ".join(
                  f"AUC {k} {a.value:.3f} [{a.low:.3f}, {a.high:.3f}]" for k, a in aucs.items()))
    truth = np.array([r["truth/same-class"] for r in rows])
    result["starts"]["truth"] = {"nonmember": truth.mean()}
    print(f"truth    residual non-member {truth.mean():.3f} (the member's is 0 there)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
