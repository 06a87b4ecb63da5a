"""The Flower engine, ServerApp and ClientApp of fedmeta (the Message API of flwr 1.42).

The ServerApp runs the configured experiment unchanged with a ``FlowerEngine`` passed to it; only
where clients compute their updates changes: a ``FlowerServer`` draws the round's users
from fedmeta's seeded ``Schedule`` (never Flower's unseeded node sampling), sends each user's
node the global weights and round settings, sorts the replies by user (arrival order is not
deterministic) and aggregates them with ``Server.aggregate``, so screening, ``min_updates`` and
the seeded arrival order are the in-process ones. The ClientApp rebuilds its own user's
(``partition-id``) client with the federation builder (``scenario.builder``) from the config and
the ``Phase`` sent along with the weights, so an attacker is just the client of a malicious user's
node in its attack round, and a plugin's parts are imported there too (the config's ``plugins``).

The ServerApp trusts the nodes no more than it must (``Nodes``): a user's updates come only from
the node that holds the user (the operator's table of registered nodes decides where there is one),
and a reply for another user, or whose arrays are not the model's, is refused and logged. A round
waits for its users up to ``federation.reply_timeout`` and goes on without the missing ones when at
least ``min_updates`` arrived (``FlowerServer``). Where run folders go is the operator's choice
(``Operator``), never the submitted run config's.

The experiment itself is not imported here (experiments sit above engines): ``make_serverapp``
takes the function that runs it, and ``fedmeta.flower_app`` wires the two.

Everything a node needs travels in the message (config TOML, phase, round), because a
deployed SuperNode starts a fresh process for every message and the simulation engine gives
ClientApps an empty run config.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as strategies
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from fedmeta import runtime
from fedmeta.config import Config, validate
from fedmeta.engines.flower.secagg import secure_mean, secure_reply
from fedmeta.federation.aggregation import Rule
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.server import Client, RoundReport, Server
from fedmeta.federation.updates import ClientUpdate, add
from fedmeta.models.conv4 import Params
from fedmeta.registry import RULES
from fedmeta.runs import RunDir
from fedmeta.scenario.builder import Phase, Population, build_clients, build_population

log = logging.getLogger(__name__)

PLAIN = "fedmeta"
"""The ClientApp action of a plain round (``train.fedmeta``); the default ``train`` action runs
under SecAgg+, whose client mod only handles messages of type ``train``."""

POLL_S = (0.05, 1.0)
"""First and longest wait between pulls for replies, growing by half each time: quick replies
(simulation, tests) come back at once, long rounds are not polled 20 times a second (the
deployment grid's own ``send_and_receive`` sleeps 3 s)."""

RUNS_ENV = "FEDMETA_RUNS"
"""Environment variable of the ServerApp's process (set for the SuperLink, which passes it on): the
absolute folder that holds the server's run folders. The server's operator fixes it; the submitted
run config only names the run, so whoever submits a run cannot make the server write elsewhere."""

NODES_ENV = "FEDMETA_NODES"
"""Environment variable of the ServerApp's process: a TOML file ``[nodes]`` of ``"<user>" = <node
id>`` that the operator wrote when registering each user's SuperNode key (``flwr supernode register``
prints the node id). Optional; see ``Nodes`` for what the ServerApp does with and without it."""


class FlowerError(RuntimeError):
    """A node failed or did not answer; the message says which user and why."""


# --- aggregation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowerRule:
    """One of our rules computed by the Flower strategy that implements it.

    The strategy aggregates whatever arrays the replies carry; it gets one reply per update (the
    flat update as its only array, its weight alpha_i as ``num-examples``), already screened and
    sorted by user, so Krum's ties break as in ``aggregation.Krum``.
    """

    strategy: Strategy

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator, users: Any = None) -> Tensor:
        replies = [
            Message(RecordDict({"arrays": ArrayRecord({"update": Array(row.cpu().numpy())}),
                                "metrics": MetricRecord({"num-examples": weight})}),
                    dst_node_id=0, message_type=MessageType.TRAIN)
            for row, weight in zip(updates, weights.tolist(), strict=True)
        ]
        arrays, _ = self.strategy.aggregate_train(0, replies)
        return torch.from_numpy(arrays["update"].numpy()).to(updates.device, updates.dtype)


def flower_rule(name: str, options: dict[str, Any], ours: Rule) -> Rule:
    """Flower's strategy for rule ``name`` where its registration names one, else our own rule."""
    mapping = RULES.get(name).info.get("flower")
    if mapping is None:
        return ours
    strategy, arguments = mapping
    return FlowerRule(getattr(strategies, strategy)(**{theirs: options[o] for theirs, o in arguments.items()}))


# --- server side -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Operator:
    """What the server's operator fixes, never the submitted run: the folder of run folders, and
    which registered node holds which user (``nodes``: user -> node id; None: see ``Nodes``)."""

    runs: Path
    nodes: Mapping[int, int] | None = None

    @classmethod
    def from_environment(cls) -> Operator:
        """The operator's settings from ``RUNS_ENV`` and ``NODES_ENV`` of this (ServerApp) process."""
        runs = os.environ.get(RUNS_ENV, "")
        if not Path(runs).is_absolute():
            raise FlowerError(f"the server's operator sets {RUNS_ENV} to the absolute folder of run folders for the "
                              f"SuperLink (got {runs!r}); the run config only names the run")
        listed = os.environ.get(NODES_ENV)
        if not listed:
            return cls(Path(runs))
        if not Path(listed).is_absolute():
            raise FlowerError(f"{NODES_ENV} must be an absolute path (got {listed!r})")
        table = tomllib.loads(Path(listed).read_text()).get("nodes", {})
        return cls(Path(runs), {int(user): int(node) for user, node in table.items()})

    def folder(self, name: str) -> Path:
        return run_folder(self.runs, name)


def run_folder(runs: Path, name: str) -> Path:
    """The run folder ``name`` under ``runs``; a name that would lead out of ``runs`` is refused."""
    if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise FlowerError(f"the run name {name!r} must be a plain folder name: no path separator, not '..'")
    return runs / name


class Nodes:
    """The run's Flower nodes by user id, and one round trip to them.

    Which node holds which user: node ids are random and the server cannot read node configs, so
    every connected node is asked its user (``whoami``). With the operator's table of registered
    nodes (``Operator.nodes``), a user is held by its listed node, if that node claims it; every
    other claimant is refused and logged. Without a table, a user is held by the one node that
    claims it; if several claim the same user, the server cannot tell the genuine one, and giving
    the user to the first to answer would let a rogue node win by answering fast, so all of them
    are refused and the run stops. A reply counts only if it comes from the node the message went
    to, for the user asked, with exactly the model's array names, shapes and dtypes; any other is
    refused and logged, as if it had not arrived.
    """

    def __init__(self, grid: Grid, context: Context, users: int, config_toml: str, timeout: float,
                 listed: Mapping[int, int] | None = None) -> None:
        self.grid, self.context, self.config_toml, self.timeout = grid, context, config_toml, timeout
        self.updates_received = 0  # training replies from ClientApps: proof that clients ran on nodes
        self.refused: list[str] = []  # nodes and replies refused, for the summary
        self.node_of = self._discover(users, listed)

    def _discover(self, users: int, listed: Mapping[int, int] | None) -> dict[int, int]:
        queries = {n: Message(RecordDict(), dst_node_id=n, message_type=f"{MessageType.QUERY}.whoami")
                   for n in self._connected(users, listed)}
        claims: dict[int, list[int]] = {}
        for node, reply in self._exchange(queries, "whoami").items():
            try:
                claims.setdefault(int(reply.content["node"]["user"]), []).append(node)
            except (KeyError, TypeError, ValueError, OverflowError) as err:  # Overflow: a claim of inf
                self._refuse(f"node {node} does not say which user it holds: {err!r}")
        node_of = {}
        for user, nodes in sorted(claims.items()):
            holder, why = _holder(user, nodes, listed, users)
            for node in nodes:
                if node != holder:
                    self._refuse(f"node {node} claims user {user}, but {why}")
            if holder is not None:
                node_of[user] = holder
        if len(node_of) < users:
            raise FlowerError(f"no node holds users {sorted(set(range(users)) - set(node_of))}; "
                              f"refused: {'; '.join(self.refused) or 'none'}")
        return node_of

    def _connected(self, users: int, listed: Mapping[int, int] | None) -> list[int]:
        """The connected nodes, once the listed ones (or as many as there are users) are."""
        deadline = time.monotonic() + self.timeout
        while True:
            ids = set(self.grid.get_node_ids())
            if set(listed.values()) <= ids if listed else len(ids) >= users:
                return sorted(ids)
            if time.monotonic() > deadline:
                needed = f"the listed nodes {sorted(listed.values())}" if listed else f"one per user ({users})"
                raise FlowerError(f"{len(ids)} Flower nodes connected in {self.timeout:.0f} s; the federation needs {needed}")
            time.sleep(0.2)

    def _refuse(self, why: str) -> None:
        """Log a refusal and keep it for the summary (None: a check can ``return self._refuse(...)``)."""
        log.warning("refused: %s", why)
        self.refused.append(why)

    def spec(self, user: int, settings: RoundSettings, phase: Phase) -> dict[str, Any]:
        """What a node needs to run ``user``'s round: the config, federation, round and progress."""
        start, end = settings.progress
        return {"config": self.config_toml, **phase.fields(), "round": settings.round,
                "progress-start": start, "progress-end": end, "user": user}

    def updates(self, users: list[int], params: Params, settings: RoundSettings, phase: Phase,
                examples: Mapping[int, int] | None = None) -> tuple[list[ClientUpdate], list[int]]:
        """The updates of ``params`` computed on the users' nodes that arrived in time and check out,
        in the order of ``users``, and the users whose update did not. ``examples``: each user's data
        size as the server's own split gives it; a node that claims another is refused (its claim
        weighs its update under ``federation.weighting = "size"``)."""
        arrays = ArrayRecord({k: v.detach().cpu().contiguous() for k, v in params.items()})
        messages = {
            user: Message(RecordDict({"arrays": arrays, "config": ConfigRecord(self.spec(user, settings, phase))}),
                          dst_node_id=self.node_of[user], message_type=f"{MessageType.TRAIN}.{PLAIN}",
                          group_id=f"{settings.phase}-{settings.round}")
            for user in users
        }
        what = f"{settings.phase} round {settings.round}"
        replies = self._exchange(messages, what)
        known = examples or {}
        checked = {u: self._check(u, replies[u], params, what, known.get(u)) for u in users if u in replies}
        arrived = [update for update in checked.values() if update is not None]
        self.updates_received += len(arrived)
        return arrived, [u for u in users if checked.get(u) is None]

    def _check(self, user: int, reply: Message, params: Params, what: str,
               examples: int | None = None) -> ClientUpdate | None:
        """``user``'s update in ``reply``, or None (refused) unless it is for that user and has the
        model's arrays: a node must not slip another user's update or a malformed one into the sum."""
        node = reply.metadata.src_node_id

        def mismatch(found: dict[str, tuple], expected: dict[str, tuple]) -> None:
            wrong = sorted(set(found) ^ set(expected) | {k for k in set(found) & set(expected) if found[k] != expected[k]})
            return self._refuse(f"{what}: the update of user {user} (node {node}) does not match the model's arrays "
                                f"(names, shapes or dtypes of {', '.join(wrong)})")

        try:  # names and shapes as the reply declares them: a malformed or huge reply is refused undecoded
            declared = {k: tuple(a.shape) for k, a in reply.content["arrays"].items()}
        except (KeyError, TypeError, AttributeError) as err:
            return self._refuse(f"{what}: the reply of node {node} (user {user}) is unreadable: {err!r}")
        if declared != (model := {k: tuple(v.shape) for k, v in params.items()}):
            return mismatch(declared, model)
        try:
            update = _decode(reply, next(iter(params.values())).device)
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as err:
            return self._refuse(f"{what}: the reply of node {node} (user {user}) is unreadable: {err}")
        if update.user != user:
            return self._refuse(f"{what}: node {node}, asked for user {user}'s update, sent user {update.user}'s")
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in update.delta.items()}
        expected = {k: (tuple(v.shape), v.dtype) for k, v in params.items()}
        if shapes != expected:
            return mismatch(shapes, expected)
        if update.examples < 1 or (examples is not None and update.examples != examples):
            known = "" if examples is None else f", where the federation's split gives it {examples}"
            return self._refuse(f"{what}: the update of user {user} (node {node}) claims {update.examples} "
                                f"examples{known}")
        return update

    def secure_mean(self, users: list[int], params: Params, settings: RoundSettings,
                    phase: Phase) -> tuple[Params, dict[int, float]]:
        """The mean of the delta of the users that stayed to the end of SecAgg+, and their losses."""
        instructions = {u: (self.node_of[u], self.spec(u, settings, phase)) for u in users}
        mean, losses = secure_mean(self.grid, self.context, instructions, params, self.timeout)
        self.updates_received += len(losses)
        return mean, losses

    def _exchange(self, messages: Mapping[int, Message], what: str) -> dict[int, Message]:
        """Send ``messages`` (by user, or by node) and wait up to ``timeout`` for their replies.

        Returns the replies that came back in time, without an error, from the node each message
        went to. Any other outcome is logged and left out: the caller decides whether it can do
        without those replies."""
        ids = list(self.grid.push_messages(list(messages.values())))
        pending = {i: key for i, key in zip(ids, messages, strict=False) if i}
        node_of = {key: m.metadata.dst_node_id for key, m in messages.items()}
        for key in set(messages) - set(pending.values()):
            log.warning("%s: the SuperLink did not take the message to node %d", what, node_of[key])
        replies: dict[int, Message] = {}
        deadline, pause = time.monotonic() + self.timeout, POLL_S[0]
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is None:
                    continue
                if reply.has_error():
                    log.warning("%s: node %d failed: %s", what, node_of[key], reply.error.reason)
                elif reply.metadata.src_node_id != node_of[key]:
                    self._refuse(f"{what}: node {reply.metadata.src_node_id} answered for node {node_of[key]}")
                else:
                    replies[key] = reply
            if pending:
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(1.5 * pause, POLL_S[1])
        for key in pending.values():
            log.warning("%s: node %d did not answer in %.0f s", what, node_of[key], self.timeout)
        return replies


def _holder(user: int, nodes: list[int], listed: Mapping[int, int] | None, users: int) -> tuple[int | None, str]:
    """Which of the ``nodes`` that claim ``user`` holds it (see ``Nodes``), and why the others do not."""
    if user not in range(users):
        return None, f"the federation's users are 0..{users - 1}"
    if listed is not None:
        if user not in listed:
            return None, f"the operator's table lists no node for user {user}"
        return (listed[user] if listed[user] in nodes else None), \
            f"the operator's table gives user {user} to node {listed[user]}"
    if len(nodes) == 1:
        return nodes[0], ""
    return None, f"so do nodes {nodes}, and the server cannot tell the genuine one"


def _decode(reply: Message, device: torch.device) -> ClientUpdate:
    metrics = reply.content["metrics"]
    delta = {k: v.to(device) for k, v in reply.content["arrays"].to_torch_state_dict().items()}
    return ClientUpdate(int(metrics["user-id"]), delta, int(metrics["examples"]), {"loss": float(metrics["loss"])})


class Arrived(list[ClientUpdate]):
    """A round's updates that arrived, and the users selected for it whose update did not
    (``missing``): what ``FlowerServer.aggregate`` needs to report the round."""

    def __init__(self, updates: list[ClientUpdate], missing: list[int]) -> None:
        super().__init__(updates)
        self.missing = missing


@dataclass(frozen=True)
class FlowerServer(Server):
    """``Server`` whose clients are Flower nodes: same schedule and aggregation, remote updates.

    A round waits up to ``federation.reply_timeout`` for all its users' updates (so when all
    arrive, it is the in-process round: the first ``min_updates`` in the seeded arrival order, with
    in-process weights); then it goes on with those that arrived if there are at least
    ``min_updates``, reporting the others as ``missing``, and fails otherwise. A node that answers
    with an error, or whose reply is refused, counts as missing.
    """

    nodes: Nodes = dataclasses.field(kw_only=True)
    phase: Phase = dataclasses.field(kw_only=True)

    def updates(self, params: Params, settings: RoundSettings) -> Arrived:
        users = self.schedule.participants(settings.round, settings.phase)
        # the data sizes the server knows from its own split (a plugin's client need not say)
        examples = {u: c.examples for u, c in self.clients.items() if isinstance(getattr(c, "examples", None), int)}
        arrived, missing = self.nodes.updates(users, params, settings, self.phase, examples)
        self._enough(settings, len(arrived), missing)
        return Arrived(arrived, missing)

    def aggregate(self, params: Params, updates: list[ClientUpdate], settings: RoundSettings) -> tuple[Params, RoundReport]:
        """``Server.aggregate``; the users whose update never arrived stay participants (they were
        selected) and are reported as missing."""
        params, report = super().aggregate(params, updates, settings)
        missing = list(getattr(updates, "missing", []))
        return params, dataclasses.replace(report, participants=sorted(report.participants + missing), missing=missing)

    def round(self, params: Params, settings: RoundSettings) -> tuple[Params, RoundReport]:
        """In the clear, ``Server.round``; under secure aggregation (``sums``), SecAgg+: the server
        learns only the mean of the updates that arrive (no screening, every one aggregated)."""
        if not self.sums:
            return super().round(params, settings)
        users = self.schedule.participants(settings.round, settings.phase)
        delta, losses = self.nodes.secure_mean(users, params, settings, self.phase)
        missing = sorted(set(users) - set(losses))
        self._enough(settings, len(losses), missing)
        return add(params, delta), RoundReport(settings.round, sorted(users), sorted(losses), [], losses, missing)

    def _enough(self, settings: RoundSettings, arrived: int, missing: list[int]) -> None:
        if arrived < self.min_updates:
            raise FlowerError(
                f"{settings.phase} round {settings.round}: {arrived} updates arrived, fewer than min_updates = "
                f"{self.min_updates}; none from users {missing} (their nodes failed, were refused or did not answer "
                f"within federation.reply_timeout = {self.nodes.timeout:.0f} s). See the ServerApp's log "
                f"(flwr log {self.nodes.context.run_id}) and those users' SuperNode logs.")


class FlowerEngine:
    """Runs every federation of an experiment on the run's Flower ``nodes``."""

    name = "flower"
    local = False

    def __init__(self, nodes: Nodes) -> None:
        self.nodes = nodes

    def stats(self) -> dict[str, Any]:
        """For the summary: how many client updates Flower nodes computed, and what was refused."""
        return {"flower_updates_received": self.nodes.updates_received, "flower_refused": self.nodes.refused}

    def serve(self, server: Server, cfg: Config, phase: Phase, rule: str) -> Server:
        parts = {f.name: getattr(server, f.name) for f in dataclasses.fields(Server)}
        parts["rule"] = flower_rule(rule, cfg.rule_options(rule), server.rule)
        return FlowerServer(**parts, nodes=self.nodes, phase=phase)  # sums: federation.secure_aggregation


def make_serverapp(run_experiment: Callable[[Config, RunDir, FlowerEngine], Any],
                   operator: Operator | None = None) -> ServerApp:
    """The ServerApp that runs ``run_config["config"]`` (TOML) with ``run_experiment`` (which writes
    the summary) into the run folder ``run_config["run"]`` (a plain name) of the ``operator``'s runs
    folder, its clients on the run's nodes. ``operator`` None: the ServerApp process's environment
    gives it (``Operator.from_environment``), as on a deployed SuperLink."""
    app = ServerApp()

    @app.main()
    def server_main(grid: Grid, context: Context) -> None:
        config_toml = str(context.run_config["config"])
        cfg = validate(tomllib.loads(config_toml))
        server_side = operator or Operator.from_environment()
        folder = server_side.folder(str(context.run_config["run"]))
        nodes = Nodes(grid, context, cfg.federation.users, config_toml, cfg.federation.reply_timeout, server_side.nodes)
        run_experiment(cfg, RunDir.open(folder, cfg), FlowerEngine(nodes))

    return app


# --- client side -----------------------------------------------------------------------------

clientapp = ClientApp()


def _own_user(context: Context) -> int:
    return int(context.node_config["partition-id"])


@clientapp.query("whoami")
def whoami(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"node": ConfigRecord({"user": _own_user(context)})}), reply_to=msg)


@clientapp.train(PLAIN)
def train(msg: Message, context: Context) -> Message:
    """One round of the node's user: global weights in, its (boosted, for the attacker) delta out."""
    spec = msg.content["config"]
    update = local_update(spec, msg.content["arrays"].to_torch_state_dict(), context)
    return Message(RecordDict({
        "arrays": ArrayRecord({k: v.cpu().contiguous() for k, v in update.delta.items()}),
        "metrics": MetricRecord({"user-id": update.user, "examples": update.examples,
                                 "num-examples": update.examples, "loss": update.metrics.get("loss", float("nan"))}),
    }), reply_to=msg)


@clientapp.train(mods=[secaggplus_mod])
def secure_train(msg: Message, context: Context) -> Message:
    """A SecAgg+ stage; in the masked-vector stage ``secaggplus_mod`` calls back for the delta."""
    return secure_reply(msg, lambda spec, params: local_update(spec, params, context))


def local_update(spec: Mapping[str, Any], params: Params, context: Context) -> ClientUpdate:
    """Run the round described by ``spec`` (config, federation, round, user) for the node's user."""
    user = int(spec["user"])
    if user != _own_user(context):
        raise FlowerError(f"node of user {_own_user(context)} was asked to train user {user}")
    phase = Phase(str(spec["phase"]), str(spec["case"]), int(spec["plain"]))
    client = _clients(str(spec["config"]), phase)[user]
    settings = RoundSettings(int(spec["round"]), phase.name, (float(spec["progress-start"]), float(spec["progress-end"])))
    images = getattr(client, "images", None)
    device = images.device if images is not None else torch.device("cpu")
    return client.update({k: v.to(device) for k, v in params.items()}, settings)


@functools.lru_cache(maxsize=2)
def _clients(config_toml: str, phase: Phase) -> dict[int, Client]:
    """The federation's clients, built as the server built them (cached: a simulation actor serves many rounds)."""
    cfg = _config(config_toml)
    return build_clients(cfg, phase, _population(config_toml, phase.case))


@functools.lru_cache(maxsize=1)
def _population(config_toml: str, case: str) -> Population:
    """Who holds which data (the same for every phase of a case: built once per actor)."""
    return build_population(_config(config_toml), Phase(case=case))


@functools.lru_cache(maxsize=1)
def _config(config_toml: str) -> Config:
    cfg = validate(tomllib.loads(config_toml))  # imports the config's plugins in this process too
    runtime.setup(cfg.runtime)
    return cfg
