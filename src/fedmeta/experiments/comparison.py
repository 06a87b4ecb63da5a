"""One attack, every defense, one table (``experiment = "defense-comparison"``).

Round 1's client updates are computed once (and cached, see
``scenario.cache.attack_round_updates``); every server rule aggregates exactly those updates, so
rows differ by the defense alone (an attacker that adapts to the rule sends once per kind of
rule). The same round without the attackers, and each server rule's clean meta-test accuracy, are
cached too, under keys without the attack's settings, so the cells of a threat matrix (one per
attack strategy) compute them once; round 1's benign users train once for both rounds and every
attack (``scenario.cache.shared_benign``). An attack over several
rounds (``attack.attackers[*].rounds``, e.g. ``[1, 2, 3]``, or a late ``[5]``) plays every round
up to the last attack round under each row's rule: from round 2 on, each row's users (attackers
included, knowing the row's rule) train on that row's model, so those rounds cost per rule
(``Plays``: FedAvg's row and the local rows, which defend FedAvg's model, share them). For
each row:

- ``clean_meta_test_accuracy``: the same rounds without the attackers (the benign users that
  each round would pick without them), aggregated by the row's rule (and for a local defense,
  that defense run on the result): what the defense costs when nobody attacks; cached, so the
  cells of a threat matrix compute it once per seed;
- ``clean_attack_val_accuracy`` (local rows): attack-val of that same clean model after the local
  defense: the level its row's attack-val is read against (the pre-trained model's is not it,
  since fine-tuning on a user's own classes moves attack-val too); ``fedmeta report`` takes each
  row from its reference, seed by seed, as ``attack_val_lift`` (a server row's reference: the
  ``before the attack`` row below);
- ``meta_test_accuracy``, ``main_task_accuracy``, ``attack_train_accuracy``,
  ``attack_val_accuracy``: right after the last attack round (Experiment 1's round 1 for the
  paper's one-shot attack);
- ``attacker_weight``, ``benign_weight``: for a server rule, the summed effective weights
  (``federation.updates.effective_weights``) of the attackers' and the benign users' updates in
  what the rule applied (FedAvg over 10 users, 2 of them attackers: 0.2 and 0.8; a rule that
  excludes the attackers: 0), averaged over the rounds an attacker sent in; how much of the
  attack a defense let through;
- ``rounds_survived`` (server rows, with ``compare.after_rounds`` > 0): how many benign rounds
  after the attack, under the row's rule, the backdoor stays present (attack-val above the
  before-the-attack level by a one-sided test at 5%, ``present``), at most ``rounds_followed``; 0
  where the rule removed it in the attack's rounds (then no round is run). A local defense acts on
  whatever model reaches its user, so its row has none: the rounds in the federation are FedAvg's;
- ``seconds``: the wall time of the row (aggregation, plus local training for the local defense,
  plus its evaluation, plus the rounds followed).

The last row, ``before the attack``, scores the pre-trained model itself (cached per seed): the
backdoor accuracy a defense that removes the attack brings the model back to.

Each local defense of ``compare.local_defenses`` (the matching network of Experiment 3 by default,
``finetune.users`` benign users, scored after ``finetune.steps`` steps) runs on FedAvg's model. It
never looks at what the server received, so it runs unchanged when the server only learns the sum
of the updates (secure aggregation): its second row hands the server nothing but the mean of the
updates, one vector, which is all secure aggregation lets it compute (``compare.secure_rows``).

A server row is scored on ``eval.episodes`` episodes with ``eval.steps`` fine-tuning steps each; a
local row on ``finetune.episodes`` episodes per user, of that user's classes, after
``finetune.steps`` steps of its defense (each row's ``episodes`` says how many).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from scipy.stats import norm

from torch import Tensor

from fedmeta import runtime
from fedmeta.attacks.strategies import adapts_to_rule
from fedmeta.config import Backdoor
from fedmeta.experiments.backdoor import METRICS, Case, curves, eval_sets, fields, main_server, prepare
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.engine import Engine
from fedmeta.federation.server import Server
from fedmeta.federation.updates import ClientUpdate, effective_weights, flatten
from fedmeta.meta.evaluation import Accuracy, evaluate_curve, query_accuracy
from fedmeta.models.conv4 import Params
from fedmeta.registry import LOCAL_DEFENSES, RULES
from fedmeta.rng import stream
from fedmeta.runs import RunDir, Session, accuracy_fields
from fedmeta.scenario.cache import (
    attack_round_updates,
    before_attack,
    clean_accuracy,
    clean_local_scores,
    without_attack,
)

BEFORE = "before the attack"
"""The label of the table's last row: the pre-trained model, no attack round."""


def is_local(label: str) -> bool:
    """Whether a row's label names a local defense (``rows`` labels them "local <name> ..."): read
    against its own clean reference, not the pre-trained model, and run whatever the server sees."""
    return str(label).startswith("local ")


def rows(cfg: Backdoor) -> list[tuple[str, str, str | None, bool]]:
    """``(label, rule, local defense, secure aggregation)`` of each row of the table."""
    server = [(rule, rule, None, False) for rule in cfg.compare.rules]
    secure = [True] if cfg.compare.secure_rows else []
    local = [(f"local {name}, secure aggregation" if on_sum else f"local {name} (FedAvg)", "fedavg", name, on_sum)
             for name in cfg.compare.local_defenses for on_sum in [False, *secure]]
    return server + local


def secure_aggregation_ok(defense: str) -> bool:
    """Whether the row labelled ``defense`` runs when the server learns only the sum of the
    updates: a rule that does not need them one by one (FedAvg), or a local defense, which never
    looks at them."""
    rule = RULES.get(defense) if defense in RULES else None
    return is_local(defense) or (rule is not None and not rule.info.get("individual", True))


def run(cfg: Backdoor, out: RunDir, engine: Engine) -> dict[str, Any]:
    device = runtime.setup(cfg.runtime)
    session = Session(out, ["clean_meta_test_accuracy", *METRICS])
    resumed = session.resumed()
    name = cfg.attack.cases[0]
    case = prepare(cfg, name, device, engine, session)
    settings = RoundSettings(1, "main")
    adaptive = adapts_to_rule(cfg.attack.attackers)  # then each row's rule is attacked anew: a fair comparison
    shared = None if adaptive else _attack_round(cfg, case, cfg.federation.rule, settings, engine)
    no_attack = without_attack(cfg)
    clean_server = main_server(no_attack, case, engine)
    clean = attack_round_updates(no_attack, clean_server, name, case.pretrained, settings, engine)
    clock = session.elapsed
    before = _before_scores(cfg, case, engine)
    before_seconds = round(session.elapsed - clock, 1)
    table, plays = rows(cfg), Plays(cfg, case, engine, clean)
    for index in session.steps(resumed.step if resumed else 0, len(table), desc="defenses", unit="row"):
        label, rule, local, secure = table[index]
        start = session.elapsed
        attacked = _attack_round(cfg, case, rule, settings, engine) if adaptive else shared
        record = {"defense": label, **_row(plays, rule, local, secure, attacked, before)}
        record["seconds"] = round(session.elapsed - start, 1)
        session.log(record, f"{record['seconds']:.0f}s")
        session.checkpoint({}, step=index + 1)
    if not any(r["defense"] == BEFORE for r in out.records()):
        _log_before(before, before_seconds, session)
    results = out.records()
    return session.summary(experiment=cfg.experiment, case=name, rows=results, table=_table(results), eval_mode=cfg.eval.mode)


def _before_scores(cfg: Backdoor, case: Case, engine: Engine) -> dict[str, Accuracy]:
    """The pre-trained model's four metrics (cached per seed where the engine is local)."""
    def evaluate() -> dict[str, Accuracy]:
        steps = cfg.eval.steps
        return curves(cfg, case, case.pretrained, case.scenario.everyone, [steps], cfg.eval.episodes)[steps]

    return before_attack(cfg, case.name, evaluate) if engine.local else evaluate()


def _log_before(scores: dict[str, Accuracy], seconds: float, session: Session) -> None:
    """The last row, ``BEFORE``: the pre-trained model's metrics (its meta-test accuracy is also
    its clean one), the level a defense that removes the backdoor brings it back to."""
    record = {"defense": BEFORE, **accuracy_fields("clean_meta_test_accuracy", scores["meta_test_accuracy"]),
              **fields(scores), "rejected": [], "episodes": scores["attack_val_accuracy"].episodes, "seconds": seconds}
    session.log(record, f"{seconds:.0f}s")


def _attack_round(cfg: Backdoor, case: Case, rule: str, settings: RoundSettings, engine: Engine) -> list[ClientUpdate]:
    """The attack round's updates (cached where the engine is local) with ``federation.rule = rule``:
    what an attacker that adapts to the rule sends against it."""
    row = _with_rule(cfg, rule)
    return attack_round_updates(row, main_server(row, case, engine), case.name, case.pretrained, settings, engine,
                                pretraining=cfg)


@dataclass
class Plays:
    """Each (rule, secure aggregation)'s rounds up to the last attack round from the pre-trained
    model, with and without the attackers, played once per run: the rows that agree on them
    (FedAvg's server row and the local rows, which defend FedAvg's model) share them, since from
    round 2 on a play trains every user again, attackers included."""

    cfg: Backdoor
    case: Case
    engine: Engine
    clean_first: list[ClientUpdate]
    """Round 1's updates without the attackers."""
    attacked_plays: dict[tuple[str, bool], tuple[Server, Params, Played]] = field(default_factory=dict)
    clean_plays: dict[tuple[str, bool], Params] = field(default_factory=dict)

    def attacked(self, rule: str, secure: bool, first: list[ClientUpdate]) -> tuple[Server, Params, Played]:
        """The rounds under ``rule`` (``first``: round 1's updates): the server (its rule's state as
        the last attack round left it, for the server row to go on with), the model, what it applied."""
        if (rule, secure) not in self.attacked_plays:  # a later round's attacker adapts to the row's rule
            server = main_server(_with_rule(self.cfg, rule), self.case, self.engine)
            self.attacked_plays[rule, secure] = (server, *_play(self.cfg, server, self.case.pretrained, first, secure))
        return self.attacked_plays[rule, secure]

    def clean(self, rule: str, secure: bool) -> Params:
        """The same rounds without the attackers, on a fresh server (a stateful rule starts afresh)."""
        if (rule, secure) not in self.clean_plays:
            server = main_server(without_attack(_with_rule(self.cfg, rule)), self.case, self.engine)
            self.clean_plays[rule, secure] = _play(self.cfg, server, self.case.pretrained, self.clean_first, secure)[0]
        return self.clean_plays[rule, secure]


def _row(plays: Plays, rule: str, local: str | None, secure: bool, attacked: list[ClientUpdate],
         before: dict[str, Accuracy]) -> dict[str, Any]:
    """One row: the attack's rounds under ``rule`` (``attacked``: round 1's updates), then the
    row's local defense or its evaluation and the rounds the backdoor survives."""
    cfg, case, engine = plays.cfg, plays.case, plays.engine
    server, after_attack, played = plays.attacked(rule, secure, attacked)

    def after_clean() -> Params:  # computed only where the clean scores are not cached
        return plays.clean(rule, secure)

    if local:
        defend = LOCAL_DEFENSES.get(local).factory
        users = case.scenario.benign[: cfg.finetune.users]
        steps = [cfg.finetune.steps]
        attack = _mean([defend(cfg, case, after_attack, u, steps)[steps[0]] for u in users])

        def evaluate() -> dict[str, Accuracy]:
            model = after_clean()
            return _mean([defend(cfg, case, model, u, steps)[steps[0]] for u in users])

        clean = clean_local_scores(cfg, case.name, rule, evaluate, (local, secure)) if engine.local else evaluate()
        return {**accuracy_fields("clean_meta_test_accuracy", clean["meta_test_accuracy"]),
                **accuracy_fields("clean_attack_val_accuracy", clean["attack_val_accuracy"]), **fields(attack),
                "rejected": played.rejected, "episodes": attack["attack_val_accuracy"].episodes}  # over its users
    scores = curves(cfg, case, after_attack, case.scenario.everyone, [cfg.eval.steps], cfg.eval.episodes)[cfg.eval.steps]

    def clean_meta_test() -> Accuracy:
        return _meta_test(cfg, case, after_clean())

    clean_test = clean_accuracy(cfg, case.name, rule, clean_meta_test) if engine.local else clean_meta_test()
    survival = {}
    if cfg.compare.after_rounds:  # the server's rule state is the one the attack's last round left
        survival = _survival(cfg, case, server, after_attack, scores["attack_val_accuracy"],
                             before["attack_val_accuracy"])
    return {**accuracy_fields("clean_meta_test_accuracy", clean_test), **fields(scores), **played.weights,
            **survival, "rejected": played.rejected, "episodes": scores["attack_val_accuracy"].episodes}


@dataclass(frozen=True)
class Played:
    """What the server applied in the rounds up to the last attack round."""

    weights: dict[str, float]
    """``attacker_weight`` and ``benign_weight``, averaged over the rounds an attacker sent in."""
    rejected: list[int]
    """The users whose updates the server screened out as non-finite (NaN or Inf) in any of those rounds."""


def _play(cfg: Backdoor, server: Server, params: Params, first: list[ClientUpdate],
          secure: bool) -> tuple[Params, Played]:
    """Rounds 1 to ``attack.last_round`` from ``params`` under ``server``'s rule. Round 1 applies
    ``first`` (computed once, for every row or every kind of rule an adaptive attacker tells
    apart); a later round's updates depend on the row's model, so its users train anew.
    ``secure``: the server receives only each round's mean."""
    weights, rejected = [], []
    for r in range(1, cfg.attack.last_round + 1):
        settings = RoundSettings(r, "main")
        updates = first if r == 1 else server.updates(params, settings)
        sent = [_sum_only(updates)] if secure else updates
        new, report = server.aggregate(params, sent, settings)
        if any(u.user in cfg.attack.users for u in updates) and not secure:
            weights.append(_weights(cfg, updates, flatten(new) - flatten(params)))
        rejected += report.rejected
        params = new
    mean = {k: round(sum(w[k] for w in weights) / len(weights), 6) for k in weights[0]} if weights else {}
    return params, Played(mean, list(dict.fromkeys(rejected)))


def _with_rule(cfg: Backdoor, rule: str) -> Backdoor:
    """``cfg`` with ``federation.rule = rule``: a row's federation, as its attackers know it."""
    return cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rule": rule})})


Z_ONE_SIDED_5PCT = float(norm.ppf(0.95))
"""The one-sided 5% point of the standard normal: ``present``'s threshold."""


def present(now: Accuracy, before: Accuracy) -> bool:
    """Whether a backdoor is still there: attack-val above the pre-trained model's by a one-sided
    z-test at the 5% level on the two episode means (their standard errors, ``Accuracy.stderr``).
    Both are measured on the same episodes, a positive correlation this unpaired test leaves out,
    so it errs towards "removed". (Until 2026-12-06 it asked for the two 95% intervals not to
    overlap, a one-sided test at about 0.3% that called backdoors gone too soon.)"""
    error = math.hypot(now.stderr, before.stderr)
    above = now.mean - before.mean
    return above > Z_ONE_SIDED_5PCT * error if error > 0 else above > 0


def _survival(cfg: Backdoor, case: Case, server: Server, params: Params, right_after: Accuracy,
              before: Accuracy) -> dict[str, int]:
    """Benign rounds after the attack under ``server``'s rule, each followed by the backdoor half
    of the evaluation, until the backdoor is gone or ``compare.after_rounds`` have run."""
    survived, rounds = 0, cfg.compare.after_rounds
    if present(right_after, before):
        steps = cfg.eval.steps
        for k in range(1, rounds + 1):
            params, _ = server.round(params, RoundSettings(cfg.attack.last_round + k, "main"))
            now = curves(cfg, case, params, case.scenario.everyone, [steps], cfg.eval.episodes,
                         meta_test=False)[steps]["attack_val_accuracy"]
            if not present(now, before):
                break
            survived = k
    return {"rounds_survived": survived, "rounds_followed": rounds}


def _weights(cfg: Backdoor, updates: list[ClientUpdate], applied: Tensor) -> dict[str, float]:
    """The attackers' and the benign users' summed effective weights in the applied update."""
    weights = effective_weights(updates, applied)
    attackers = set(cfg.attack.users)
    return {"attacker_weight": round(sum(w for u, w in weights.items() if u in attackers), 6),
            "benign_weight": round(sum(w for u, w in weights.items() if u not in attackers), 6)}


def _sum_only(updates: list[ClientUpdate]) -> ClientUpdate:
    """What the server can compute under secure aggregation: the mean update, one vector."""
    delta = {k: sum(u.delta[k] for u in updates) / len(updates) for k in updates[0].delta}
    return ClientUpdate(-1, delta, sum(u.examples for u in updates))


def _meta_test(cfg: Backdoor, case: Case, params: Params) -> Accuracy:
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


def _table(rows: list[dict[str, Any]]) -> str:
    """The summary table. ``clean attack-val``: what a local row's attack-val is read against (its
    defense on the round nobody attacked); a server row's reference is the ``before the attack`` row."""
    survival = any("rounds_survived" in r for r in rows)
    head = (f"{'defense':36} {'clean meta-test':>15} {'meta-test':>10} {'main task':>10} {'attack-train':>12} "
            f"{'attack-val':>10} {'clean attack-val':>16}")
    head += f" {'survived':>9} {'seconds':>8}" if survival else f" {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [f"{100 * r[m]:.1f}%" for m in ["clean_meta_test_accuracy", *METRICS]]
        reference = f"{100 * r['clean_attack_val_accuracy']:.1f}%" if "clean_attack_val_accuracy" in r else "-"
        line = f"{r['defense']:36} {cells[0]:>15} {cells[1]:>10} {cells[2]:>10} {cells[3]:>12} {cells[4]:>10}"
        line += f" {reference:>16}"
        if survival:
            line += f" {_survived(r):>9}"
        lines.append(f"{line} {r['seconds']:>8.0f}")
    return "\n".join(lines)


def _survived(row: dict[str, Any]) -> str:
    """Rounds survived, ">= n" when still present after every round followed, "-" where not measured."""
    if "rounds_survived" not in row:
        return "-"
    n = row["rounds_survived"]
    return f">= {n}" if n == row["rounds_followed"] and n else str(n)
