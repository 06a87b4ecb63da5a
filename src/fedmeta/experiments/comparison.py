"""One attack, every defense, one table (``experiment = "defense-comparison"``).

The attack round's client updates are computed once (and cached, see
``federated.attack_round_updates``); every server rule aggregates exactly those updates, so rows
differ by the defense alone. For each row:

- ``clean_meta_test_accuracy``: the same round without the attacker (the benign users that round
  1 would pick without it), aggregated by the row's rule: what the defense costs when nobody attacks;
- ``meta_test_accuracy``, ``main_task_accuracy``, ``attack_train_accuracy``,
  ``attack_val_accuracy``: right after the attack round (Experiment 1's round 1);
- ``seconds``: the wall time of the row (aggregation, plus local training for the local defense,
  plus its evaluation).

The local defense (the matching network of Experiment 3, ``finetune.users`` benign users, scored
after ``finetune.steps`` steps) runs on FedAvg's model. It never looks at what the server
received, so it runs unchanged when the server only learns the sum of the updates (secure
aggregation): its second row says so by running with ``federation.secure_aggregation = true``,
which refuses every rule that needs updates one by one, and by handing the server nothing but
the mean of the updates, one vector, which is all secure aggregation lets it compute.
"""

from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

from fedmeta import runtime
from fedmeta.config import Config
from fedmeta.experiments.backdoor import METRICS, Case, curves, eval_sets, fields, prepare
from fedmeta.experiments.common import accuracy_fields, format_duration
from fedmeta.experiments.defense import defense_curves
from fedmeta.experiments.federated import attack_round_updates, main_server
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.updates import ClientUpdate
from fedmeta.meta.evaluation import Accuracy, evaluate_curve, query_accuracy
from fedmeta.models.conv4 import Params
from fedmeta.rng import stream
from fedmeta.runs import RunDir

LOCAL = ("local defense (FedAvg)", "local defense, secure aggregation")


def run(cfg: Config, out: RunDir) -> dict[str, Any]:
    device = runtime.setup(cfg.runtime)
    clock = time.perf_counter()
    resumed = out.resume()
    done = resumed[1]["rows"] if resumed else 0
    name = cfg.attack.cases[0]
    case = prepare(cfg, name, device)
    settings = RoundSettings(1, "main")
    attacked = attack_round_updates(cfg, main_server(cfg, case.scenario), name, case.pretrained, settings)
    no_attack = cfg.model_copy(update={"attack": cfg.attack.model_copy(update={"enabled": False})})
    clean = main_server(no_attack, case.scenario).updates(case.pretrained, settings)
    rows = [*cfg.compare.rules, *(LOCAL if cfg.compare.local_defense else ())]
    for index, row in enumerate(tqdm(rows, desc="defenses", unit="row")):
        if index < done:
            continue
        start = time.perf_counter()
        record = {"defense": row, **_row(cfg, case, row, attacked, clean, settings)}
        record["seconds"] = round(time.perf_counter() - start, 1)
        out.log(record)
        tqdm.write(_line(record))
        out.save_checkpoint(case.pretrained, {"rows": index + 1})
    table = out.records()
    tqdm.write(_table(table))
    wall = time.perf_counter() - clock
    return {"experiment": cfg.experiment, "case": name, "rows": table, "eval_mode": cfg.eval.mode,
            "wall_time_s": round(wall, 1), "wall_time": format_duration(wall)}


def _row(cfg: Config, case: Case, row: str, attacked: list[ClientUpdate], clean: list[ClientUpdate],
         settings: RoundSettings) -> dict[str, Any]:
    rule = "fedavg" if row in LOCAL else row
    fed = cfg.federation.model_copy(update={"rule": rule, "secure_aggregation": row == LOCAL[1]})
    row_cfg = cfg.model_copy(update={"federation": fed})
    server = main_server(row_cfg, case.scenario)
    if fed.secure_aggregation:
        attacked, clean = [_sum_only(attacked)], [_sum_only(clean)]
    after_attack, _ = server.aggregate(case.pretrained, attacked, settings)
    after_clean, _ = server.aggregate(case.pretrained, clean, settings)
    if row in LOCAL:
        users = case.scenario.benign[: cfg.finetune.users]
        steps = [cfg.finetune.steps]
        attack = _mean([defense_curves(row_cfg, case, after_attack, u, steps)[steps[0]] for u in users])
        clean_test = _mean([defense_curves(row_cfg, case, after_clean, u, steps)[steps[0]] for u in users])
        return {**accuracy_fields("clean_meta_test_accuracy", clean_test["meta_test_accuracy"]), **fields(attack)}
    scores = curves(cfg, case, after_attack, case.scenario.everyone, [cfg.eval.steps], cfg.eval.episodes)[cfg.eval.steps]
    return {**accuracy_fields("clean_meta_test_accuracy", _meta_test(cfg, case, after_clean)), **fields(scores)}


def _sum_only(updates: list[ClientUpdate]) -> ClientUpdate:
    """What the server can compute under secure aggregation: the mean update, one vector."""
    delta = {k: sum(u.delta[k] for u in updates) / len(updates) for k in updates[0].delta}
    return ClientUpdate(-1, delta, sum(u.examples for u in updates))


def _meta_test(cfg: Config, case: Case, params: Params) -> Accuracy:
    """Meta-test accuracy on the same episodes as ``curves`` uses."""
    e = cfg.eval
    test = eval_sets(cfg, case, case.scenario.everyone, e.episodes).test
    images = case.scenario.images
    return evaluate_curve(case.learner, params, images, test, at=[e.steps], batch=e.batch, lr=e.lr or cfg.meta.inner_lr,
                          gen=stream(cfg.seed, "eval-meta-test-ft"),
                          score=query_accuracy(case.learner, images, test, e.transductive))[e.steps]["accuracy"]


def _mean(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracies averaged over users (the CI: the largest of the users')."""
    return {m: Accuracy(sum(p[m].mean for p in points) / len(points), max(p[m].ci95 for p in points),
                        sum(p[m].episodes for p in points)) for m in points[0]}


def _line(r: dict[str, Any]) -> str:
    cells = " | ".join(f"{m} {100 * r[m]:.2f}%" for m in ["clean_meta_test_accuracy", *METRICS])
    return f"[{r['defense']}] {cells} | {r['seconds']:.0f}s"


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'defense':36} {'clean meta-test':>15} {'meta-test':>10} {'main task':>10} {'attack-train':>12} {'attack-val':>10} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [f"{100 * r[m]:.1f}%" for m in ["clean_meta_test_accuracy", *METRICS]]
        lines.append(f"{r['defense']:36} {cells[0]:>15} {cells[1]:>10} {cells[2]:>10} {cells[3]:>12} {cells[4]:>10} {r['seconds']:>8.0f}")
    return "\n".join(lines)
