"""The backdoor accuracy of the attacker's own model along its local training: one run, many lengths.

Why: on mini-ImageNet the quick attacker implants nothing (docs/results.md, "mini-ImageNet"), and
asking whether a longer or deeper attacker would means one `fedmeta run` per length, each training
the attacker from the start. This script trains the paper's boosted attacker once, exactly as its
client does in the attack round (the same poisoned episodes, random streams and learner), and
evaluates its model theta_a at each length in ``--at`` (episodes) on the run's own evaluation sets
(the same episodes at every point). In the attack round the server's new model is
theta_a + (the two benign updates) / 3 (lambda = M_r = 3, equal weights), so theta_a carries
the backdoor or nothing does.

    python benchmarks/attacker_curve.py miniimagenet-exp1a-quick --at 0,250,500,1000 \
        --set attacks.boosted.inner_epochs=10 --json curve.json

``--pretrained-seed S`` starts the attacker from seed S's (cached) pre-trained model instead of
its own seed's, everything else its seed's; with ``--set attack.trigger.seed=S`` (the key of seed
S) and ``--set seed=S`` (its data and streams), one part of a seed at a time is swapped for
another seed's: which of them makes one seed's attacker learn the key and another's not.

``--batched`` runs the attacker's meta-batch through ``torch.func.vmap`` (GPU; Adam moments per
episode, ``meta.adam_carry = 'parallel'``), the pre-training staying the cached sequential one.

``--probe`` adds, at each point, how the model's embedding sees the key (``key_probe``): on clean
meta-test images x and their keyed copies k(x), batched together, the relative change
||f(k(x)) - f(x)|| / ||f(x)||, the share of that change's energy in the most-changed spatial cell
of the trunk's output and the number of cells holding 90% of it (one cell: Omniglot's 1 x 1;
25: mini-ImageNet's 5 x 5), and how consistent its direction is over images (the mean cosine
of each change with their mean): what a head has to read the key from.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from fedmeta import runtime
from fedmeta.config import load_config
from fedmeta.experiments.backdoor import METRICS, curves, prepare
from fedmeta.federation.client import MetaClient, RoundSettings
from fedmeta.federation.engine import IN_PROCESS
from fedmeta.rng import stream
from fedmeta.runs import RunDir, Session
from fedmeta.scenario.builder import Phase, build_server


def attacker_client(cfg, case) -> MetaClient:
    """The first malicious user's client, built as the attack round builds it."""
    server = build_server(cfg, Phase("main", case.name), case.scenario, IN_PROCESS)
    client = server.clients[cfg.attack.attackers[0].user]
    if not isinstance(client, MetaClient):
        raise SystemExit(f"strategy '{cfg.attack.attackers[0].strategy}' is not a training attacker")
    return client


def prepared(cfg, device):
    """The run's first case with its (cached) pre-trained model."""
    with tempfile.TemporaryDirectory() as tmp:
        return prepare(cfg, cfg.attack.cases[0], device, IN_PROCESS, Session(RunDir(Path(tmp)), METRICS))


def key_probe(case, params, images: int = 50) -> dict[str, float]:
    """How the trunk's embedding responds to the key on ``images`` clean meta-test images."""
    model, scenario = case.learner.model, case.scenario
    test = scenario.test.index[scenario.test.index >= 0]  # the meta-test classes' rows: clean images
    rows = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:images]]
    clean = scenario.images[rows.to(scenario.images.device)]
    batch = torch.cat([clean, scenario.trigger.apply(clean.cpu()).to(clean.device)]).float().div(255).movedim(-1, -3)
    with torch.no_grad():
        features = model.trunk(params, batch).double()
    f, change = features[:images], features[images:] - features[:images]
    cells = change.view(images, model.filters, -1).pow(2).sum(1)  # [images, spatial cells]
    share = (cells / cells.sum(1, keepdim=True)).sort(dim=1, descending=True).values
    direction = torch.nn.functional.cosine_similarity(change, change.mean(0, keepdim=True))
    return {"key_relative_change": round(float((change.norm(dim=1) / f.norm(dim=1)).mean()), 4),
            "key_top_cell_share": round(float(share[:, 0].mean()), 4),
            "key_cells_for_90pct": round(float((share.cumsum(1) < 0.9).sum(1).add(1).float().mean()), 2),
            "key_direction_consistency": round(float(direction.mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset")
    parser.add_argument("--at", required=True, help="attacker lengths in episodes, comma-separated (0: pre-trained)")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--episodes", type=int, default=None, help="evaluation episodes per point (eval.episodes)")
    parser.add_argument("--batched", action="store_true")
    parser.add_argument("--probe", action="store_true", help="also print how the embedding responds to the key")
    parser.add_argument("--pretrained-seed", type=int, default=None,
                        help="start from this seed's pre-trained model (cached), the rest the run's seed's")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    cfg = load_config(args.preset, args.overrides)
    device = runtime.setup(cfg.runtime)
    case = prepared(cfg, device)
    if args.pretrained_seed is not None:
        other = prepared(load_config(args.preset, [*args.overrides, f"seed={args.pretrained_seed}"]), device)
        case = replace(case, pretrained=other.pretrained, pretrain_log=other.pretrain_log)
    attack_cfg = cfg
    if args.batched:
        attack_cfg = load_config(args.preset, [*args.overrides, "meta.adam_carry=parallel", "runtime.batched=true"])
        runtime.setup(attack_cfg.runtime)
    client = attacker_client(attack_cfg, case)
    at = sorted({int(x) for x in args.at.split(",")})
    meta_batch = cfg.meta.meta_batch
    eval_episodes = args.episodes or cfg.eval.episodes

    settings = RoundSettings(cfg.attack.attackers[0].rounds[0], "main")
    gen = stream(client.seed, "client", settings.phase, client.user, settings.round)
    params = {k: v.detach() for k, v in case.pretrained.items()}
    state = client.learner.init_state(params)
    points, step, clock = [], 0, 0.0
    for length in at:
        t0 = runtime.synchronized_time(device)
        while step < length // meta_batch:
            drawn = client.sample(gen)
            params, state, _ = client.learner.train_step(params, state, drawn, client.images, gen, step / client.steps)
            step += 1
        clock += runtime.synchronized_time(device) - t0
        scores = curves(cfg, case, params, case.scenario.everyone, [cfg.eval.steps], eval_episodes)[cfg.eval.steps]
        point = {"episodes": step * meta_batch, "train_seconds": round(clock, 1)}
        point |= {m: round(100 * scores[m].mean, 2) for m in METRICS}
        point |= {f"{m}_ci95": round(100 * scores[m].ci95, 2) for m in METRICS}
        if args.probe:
            point |= key_probe(case, params)
        points.append(point)
        print(json.dumps(point), flush=True)
    if args.json:
        kept = {"preset": args.preset, "overrides": args.overrides, "pretrained_seed": args.pretrained_seed,
                "batched": args.batched,
                "eval_episodes": eval_episodes, "device": str(device), "points": points}
        args.json.write_text(json.dumps(kept, indent=1))


if __name__ == "__main__":
    main()
