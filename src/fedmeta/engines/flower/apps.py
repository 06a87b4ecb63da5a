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

The experiment itself is not imported here (experiments sit above engines): ``make_serverapp``
takes the function that runs it, and ``fedmeta.flower_app`` wires the two.

Everything a node needs travels in the message (config TOML, phase, round), because a
deployed SuperNode starts a fresh process for every message and the simulation engine gives
ClientApps an empty run config.
"""

from __future__ import annotations

import dataclasses
import functools
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

REPLY_TIMEOUT_S = 3600.0
"""Longest wait for a round's replies: generous, since a deployed node may train for minutes."""

PLAIN = "fedmeta"
"""The ClientApp action of a plain round (``train.fedmeta``); the default ``train`` action runs
under SecAgg+, whose client mod only handles messages of type ``train``."""

POLL_S = (0.05, 1.0)
"""First and longest wait between pulls for replies, growing by half each time: quick replies
(simulation, tests) come back at once, long rounds are not polled 20 times a second (the
deployment grid's own ``send_and_receive`` sleeps 3 s)."""


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


class Nodes:
    """The run's Flower nodes by user id, and one round trip to them."""

    def __init__(self, grid: Grid, context: Context, users: int, config_toml: str,
                 timeout: float = REPLY_TIMEOUT_S) -> None:
        self.grid, self.context, self.config_toml, self.timeout = grid, context, config_toml, timeout
        self.node_of = self._discover(users)
        self.updates_received = 0  # training replies from ClientApps: proof that clients ran on nodes

    def _discover(self, users: int) -> dict[int, int]:
        """Node ids are random and the server cannot read node configs: ask each node its user."""
        deadline = time.monotonic() + self.timeout
        while len(ids := sorted(self.grid.get_node_ids())) < users:
            if time.monotonic() > deadline:
                raise FlowerError(f"{len(ids)} Flower nodes connected; the federation needs one per user ({users})")
            time.sleep(0.2)
        queries = [Message(RecordDict(), dst_node_id=n, message_type=f"{MessageType.QUERY}.whoami") for n in ids]
        node_of = {int(r.content["node"]["user"]): r.metadata.src_node_id for r in self._exchange(queries, "query")}
        if sorted(node_of) != list(range(users)):
            raise FlowerError(f"the nodes hold users {sorted(node_of)}; expected each of 0..{users - 1} once")
        return node_of

    def spec(self, user: int, settings: RoundSettings, phase: Phase) -> dict[str, Any]:
        """What a node needs to run ``user``'s round: the config, federation, round and progress."""
        start, end = settings.progress
        return {"config": self.config_toml, **phase.fields(), "round": settings.round,
                "progress-start": start, "progress-end": end, "user": user}

    def updates(self, users: list[int], params: Params, settings: RoundSettings, phase: Phase) -> list[ClientUpdate]:
        """Each user's update of ``params``, computed on its node, in the order of ``users``."""
        arrays = ArrayRecord({k: v.detach().cpu().contiguous() for k, v in params.items()})
        messages = [
            Message(RecordDict({"arrays": arrays, "config": ConfigRecord(self.spec(user, settings, phase))}),
                    dst_node_id=self.node_of[user], message_type=f"{MessageType.TRAIN}.{PLAIN}",
                    group_id=f"{settings.phase}-{settings.round}")
            for user in users
        ]
        by_user = {int(r.content["metrics"]["user-id"]): r for r in self._exchange(messages, settings.phase)}
        self.updates_received += len(by_user)
        device = next(iter(params.values())).device
        return [_decode(by_user[u], device) for u in users]

    def secure_mean(self, users: list[int], params: Params, settings: RoundSettings,
                    phase: Phase) -> tuple[Params, dict[int, float]]:
        """The mean of the users' deltas through SecAgg+, and their losses."""
        instructions = {u: (self.node_of[u], self.spec(u, settings, phase)) for u in users}
        mean, losses = secure_mean(self.grid, self.context, instructions, params)
        self.updates_received += len(losses)
        return mean, losses

    def _exchange(self, messages: list[Message], what: str) -> list[Message]:
        pending = set(self.grid.push_messages(messages))
        replies: list[Message] = []
        deadline, pause = time.monotonic() + self.timeout, POLL_S[0]
        while pending:
            if time.monotonic() > deadline:
                raise FlowerError(f"{what}: {len(pending)} of {len(messages)} nodes did not answer in {self.timeout:.0f} s")
            for reply in self.grid.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    raise FlowerError(f"{what}: node {reply.metadata.src_node_id} failed: {reply.error.reason}")
                replies.append(reply)
            if pending:
                time.sleep(pause)
                pause = min(1.5 * pause, POLL_S[1])
        return replies


def _decode(reply: Message, device: torch.device) -> ClientUpdate:
    metrics = reply.content["metrics"]
    delta = {k: v.to(device) for k, v in reply.content["arrays"].to_torch_state_dict().items()}
    return ClientUpdate(int(metrics["user-id"]), delta, int(metrics["examples"]), {"loss": float(metrics["loss"])})


@dataclass(frozen=True)
class FlowerServer(Server):
    """``Server`` whose clients are Flower nodes: same schedule and aggregation, remote updates."""

    nodes: Nodes = dataclasses.field(kw_only=True)
    phase: Phase = dataclasses.field(kw_only=True)
    secure: bool = dataclasses.field(kw_only=True, default=False)
    """SecAgg+: the server only learns the mean (no screening; every participant is aggregated)."""

    def updates(self, params: Params, settings: RoundSettings) -> list[ClientUpdate]:
        users = self.schedule.participants(settings.round, settings.phase)
        return self.nodes.updates(users, params, settings, self.phase)

    def round(self, params: Params, settings: RoundSettings) -> tuple[Params, RoundReport]:
        if not self.secure:
            return super().round(params, settings)
        users = self.schedule.participants(settings.round, settings.phase)
        delta, losses = self.nodes.secure_mean(users, params, settings, self.phase)
        return add(params, delta), RoundReport(settings.round, users, users, [], losses)


class FlowerEngine:
    """Runs every federation of an experiment on the run's Flower ``nodes``."""

    name = "flower"
    local = False

    def __init__(self, nodes: Nodes) -> None:
        self.nodes = nodes

    def stats(self) -> dict[str, Any]:
        """For the summary: how many client updates Flower nodes computed."""
        return {"flower_updates_received": self.nodes.updates_received}

    def serve(self, server: Server, cfg: Config, phase: Phase, rule: str) -> Server:
        parts = {f.name: getattr(server, f.name) for f in dataclasses.fields(Server)}
        parts["rule"] = flower_rule(rule, cfg.rule_options(rule), server.rule)
        return FlowerServer(**parts, nodes=self.nodes, phase=phase, secure=cfg.federation.secure_aggregation)


def make_serverapp(run_experiment: Callable[[Config, RunDir, FlowerEngine], Any]) -> ServerApp:
    """The ServerApp that runs ``run_config["config"]`` (TOML) into the folder ``run_config["out"]``
    with ``run_experiment`` (which writes the summary), its clients on the run's nodes."""
    app = ServerApp()

    @app.main()
    def server_main(grid: Grid, context: Context) -> None:
        config_toml = str(context.run_config["config"])
        cfg = validate(tomllib.loads(config_toml))
        engine = FlowerEngine(Nodes(grid, context, cfg.federation.users, config_toml))
        run_experiment(cfg, RunDir.open(Path(str(context.run_config["out"])), cfg), engine)

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
