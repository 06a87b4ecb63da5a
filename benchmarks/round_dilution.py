"""Where an attack round's backdoor goes under FedAvg: each attacker's own model, the attackers'
share of the aggregate, the aggregate.

    python benchmarks/round_dilution.py runs/matrix/<cell> [--episodes 40] [--json out.json]

Why: on the fleet (10 users a round, 2 colluders) the boosted pair leaves attack-val far below
what one boosted attacker leaves on the paper's 4-user federation. With lambda = M_r / f the
aggregate is theta + mean_a(theta_a - theta) + (8/10) mean_b(benign delta), so the loss is one
of three: each attacker's own model theta_a carries little (too short a training), averaging two
independently trained attackers loses it, or the benign updates erase it. This script reads the
cell's cached attack round under the cell's rule (the run must have computed it, under the same
``FEDMETA_CACHE``) and scores, on the run's own evaluation episodes:

- ``before``: the pre-trained model;
- ``attacker U alone``: theta + delta_U / boost (the attacker's trained model, for strategies with
  a ``boost`` option; the update as sent otherwise);
- ``attackers' share``: the rule applied to the round with every benign delta set to zero (same
  weights): what the attackers alone move the model by;
- ``aggregate``: the rule applied to the round as it was (the cell's row for that rule).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from fedmeta import runtime
from fedmeta.config import Backdoor, load_config
from fedmeta.experiments.backdoor import METRICS, Case, curves, main_server, prepare
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.engine import IN_PROCESS
from fedmeta.federation.updates import ClientUpdate
from fedmeta.models.conv4 import Params
from fedmeta.runs import RunDir, Session
from fedmeta.scenario.cache import attack_round_updates


def models(cfg: Backdoor, case: Case) -> dict[str, Params]:
    """The models to score, by label (the attack round comes from the cache)."""
    settings = RoundSettings(1, "main")
    server = main_server(cfg, case, IN_PROCESS)
    theta = case.pretrained
    updates = attack_round_updates(cfg, server, case.name, theta, settings, IN_PROCESS)
    attackers = set(cfg.attack.users)
    out = {"before": theta}
    for a in cfg.attack.attackers:
        boost = float(cfg.attack_options(a.strategy).get("boost", 1.0))
        update = next(u for u in updates if u.user == a.user)
        out[f"attacker {a.user} alone (update / {boost:g})"] = {k: theta[k] + update.delta[k] / boost for k in theta}
    zeroed = [u if u.user in attackers else ClientUpdate(u.user, {k: torch.zeros_like(v) for k, v in u.delta.items()},
                                                          u.examples) for u in updates]
    start = server.snapshot(theta)
    out["attackers' share"], _ = server.aggregate(theta, zeroed, settings)
    server.restore(start, theta)
    out["aggregate"], _ = server.aggregate(theta, updates, settings)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cell", type=Path)
    parser.add_argument("--episodes", type=int, default=None, help="evaluation episodes (default: eval.episodes)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    cfg = load_config(str(args.cell / "config.toml"))
    device = runtime.setup(cfg.runtime)
    with tempfile.TemporaryDirectory() as tmp:
        case = prepare(cfg, cfg.attack.cases[0], device, IN_PROCESS, Session(RunDir(Path(tmp)), METRICS))
    episodes = args.episodes or cfg.eval.episodes
    points = {}
    for label, params in models(cfg, case).items():
        scores = curves(cfg, case, params, case.scenario.everyone, [cfg.eval.steps], episodes)[cfg.eval.steps]
        points[label] = {m: [round(100 * scores[m].mean, 2), round(100 * scores[m].ci95, 2)] for m in METRICS}
        print(f"{label:36}", "  ".join(f"{m.removesuffix('_accuracy')} {v[0]:.2f} ± {v[1]:.2f}"
                                        for m, v in points[label].items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cell": str(args.cell), "rule": cfg.federation.rule, "episodes": episodes,
                                         "points": points}, indent=1))


if __name__ == "__main__":
    main()
