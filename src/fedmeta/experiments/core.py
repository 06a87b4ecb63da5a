"""The paper's core in one run (``experiment = "backdoor-core"``): the README's first command.

One case of the backdoor paper, end to end, so that a new user sees the attack succeed and the
defense remove it: the cached benign pre-training; the attack round(s) and ``federation.rounds``
benign rounds after them, evaluated after each (Experiment 1); then, on the model right after the
attack, each of the paper's local defenses at the first ``finetune.users`` benign users, scored
after ``finetune.steps`` steps: fine-tuning alone (Experiment 2) and the matching network
(Experiment 3). Every stage reuses the functions of Experiments 1-3, so its numbers are theirs
(the same episodes, the same cache entries).

Metrics lines: ``{"case", "round", ...}`` for the rounds, ``{"case", "defense", "user", "step",
...}`` for the local defenses. The summary's ``table`` (printed at the end of ``fedmeta run``) has
one row per stage: before the attack, right after it, after the benign rounds, under each local
defense (averaged over its users).
"""

from __future__ import annotations

from typing import Any

from fedmeta import runtime
from fedmeta.config import Backdoor
from fedmeta.experiments.backdoor import METRICS, Case, curves, fields, main_server, play_round, prepare
from fedmeta.federation.engine import Engine
from fedmeta.federation.server import Server
from fedmeta.models.conv4 import Params
from fedmeta.registry import LOCAL_DEFENSES
from fedmeta.runs import RunDir, Session

DEFENSES = {"finetune": "fine-tuning alone (Exp 2)", "matching": "matching network (Exp 3)"}
"""The local defenses of the paper, by registered name, in the order they run."""


def run(cfg: Backdoor, out: RunDir, engine: Engine) -> dict[str, Any]:
    """The stages one after another, checkpointed after each: rounds 0 to the last, then each defense."""
    device = runtime.setup(cfg.runtime)
    session = Session(out, METRICS)
    case = prepare(cfg, cfg.attack.cases[0], device, engine, session)
    server = main_server(cfg, case, engine)
    attack_round, last = cfg.attack.last_round, cfg.attack.last_round + cfg.federation.rounds
    plan: list[int | str] = [*range(last + 1), *DEFENSES]
    resumed = session.resumed()
    params = server.restore(resumed.tensors, case.pretrained) if resumed else case.pretrained
    attacked = resumed.take("attacked.", case.pretrained) if resumed and resumed.group("attacked.") else params
    for index in session.steps(resumed.step if resumed else 0, len(plan), desc="paper core", unit="stage"):
        stage = plan[index]
        if isinstance(stage, int):
            params = _round(cfg, case, server, params, stage, engine, session)
            if stage == attack_round:
                attacked = params
        else:
            _defend(cfg, case, attacked, stage, session)
        # the attacked model is kept apart once later rounds have moved the global model on
        kept = {} if attacked is params else {f"attacked.{k}": v for k, v in attacked.items()}
        session.checkpoint({**server.snapshot(params), **kept}, step=index + 1)
    out.save_weights(params)
    stages = _stages(cfg, out.records())
    return session.summary(experiment=cfg.experiment, case=case.name, stages=dict(stages), table=_table(stages),
                           eval_mode=cfg.eval.mode, eval_episodes=cfg.eval.episodes)


def _round(cfg: Backdoor, case: Case, server: Server, params: Params, r: int, engine: Engine, session: Session) -> Params:
    """Round ``r`` (0: the pre-trained model as it is), evaluated as Experiment 1 evaluates it."""
    report: dict[str, Any] = {}
    if r > 0:
        params, played = play_round(cfg, server, case.name, params, r, engine, session)
        report = played.fields()
    scores = curves(cfg, case, params, case.scenario.everyone, [cfg.eval.steps], cfg.eval.episodes)[cfg.eval.steps]
    session.log({"case": case.name, "round": r, **report, **fields(scores)},
                "attack round" if server.schedule.attacking(r) else "")
    return params


def _defend(cfg: Backdoor, case: Case, attacked: Params, name: str, session: Session) -> None:
    """The local defense ``name`` at each of the first ``finetune.users`` benign users."""
    defend, steps = LOCAL_DEFENSES.get(name).factory, cfg.finetune.steps
    for user in case.scenario.benign[: cfg.finetune.users]:
        scores = defend(cfg, case, attacked, user, [steps])[steps]
        session.log({"case": case.name, "defense": name, "user": user, "step": steps, **fields(scores)}, DEFENSES[name])


def _stages(cfg: Backdoor, records: list[dict[str, Any]]) -> list[tuple[str, dict[str, float]]]:
    """The table's rows: before the attack, right after it, after the benign rounds, then each
    local defense (averaged over its users)."""
    attack_round, last = cfg.attack.last_round, cfg.attack.last_round + cfg.federation.rounds
    rounds = {r["round"]: r for r in records if "round" in r}
    rows = [("before the attack (round 0)", rounds[0]), (f"right after the attack (round {attack_round})", rounds[attack_round])]
    if last > attack_round:
        rows.append((f"after {cfg.federation.rounds} benign rounds (round {last})", rounds[last]))
    for name, label in DEFENSES.items():
        mine = [r for r in records if r.get("defense") == name]
        rows.append((f"{label}, {cfg.finetune.steps} steps", {m: sum(r[m] for r in mine) / len(mine) for m in METRICS}))
    return [(label, {m: round(row[m], 6) for m in METRICS}) for label, row in rows]


def _table(stages: list[tuple[str, dict[str, float]]]) -> str:
    head = f"{'':44} {'meta-test':>10} {'main task':>10} {'attack-train':>12} {'attack-val':>10}"
    lines = [head, "-" * len(head)]
    for label, row in stages:
        cells = [f"{100 * row[m]:.1f}%" for m in METRICS]
        lines.append(f"{label:44} {cells[0]:>10} {cells[1]:>10} {cells[2]:>12} {cells[3]:>10}")
    return "\n".join(lines)
