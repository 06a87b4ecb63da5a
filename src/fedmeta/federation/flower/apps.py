"""The Flower ServerApp and ClientApp of fedmeta (the Message API of flwr 1.42).

The ServerApp runs the configured experiment unchanged; only where clients compute their
updates changes (``experiments.federated.ENGINE``): a ``FlowerServer`` draws the round's users
from fedmeta's seeded ``Schedule`` (never Flower's unseeded node sampling), sends each user's
node the global weights and round settings, sorts the replies by user (arrival order is not
deterministic) and aggregates them with ``Server.aggregate``, so screening, ``min_updates`` and
the seeded arrival order are the in-process ones. The ClientApp rebuilds the experiment's
``MetaClient`` of its own user (``partition-id``) from the config sent along with the weights,
so an attacker is just the client of the attacker's node in its attack round.

Everything a node needs travels in the message (config TOML, case, phase, round), because a
deployed SuperNode starts a fresh process for every message and the simulation engine gives
ClientApps an empty run config.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import tomllib
from collections.abc import Mapping
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
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy
from torch import Tensor

from fedmeta import runtime
from fedmeta.config import Config, ConfigError, FederationConfig, validate
from fedmeta.experiments.backdoor_scenario import Scenario, build_scenario
from fedmeta.experiments.federated import ENGINE, Engine, in_process, main_server, pretrain_server
from fedmeta.federation.aggregation import Rule
from fedmeta.federation.client import MetaClient, RoundSettings
from fedmeta.federation.server import RoundReport, Server
from fedmeta.federation.flower.secagg import secure_mean, secure_reply
from fedmeta.federation.updates import ClientUpdate, add
from fedmeta.models.conv4 import Params
from fedmeta.runs import RunDir

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
    needs_individual_updates: bool

    def __call__(self, updates: Tensor, weights: Tensor, gen: torch.Generator) -> Tensor:
        replies = [
            Message(RecordDict({"arrays": ArrayRecord({"update": Array(row.cpu().numpy())}),
                                "metrics": MetricRecord({"num-examples": weight})}),
                    dst_node_id=0, message_type=MessageType.TRAIN)
            for row, weight in zip(updates, weights.tolist(), strict=True)
        ]
        arrays, _ = self.strategy.aggregate_train(0, replies)
        return torch.from_numpy(arrays["update"].numpy()).to(updates.device, updates.dtype)


def flower_rule(fed: FederationConfig, ours: Rule) -> Rule:
    """Flower's strategy for ``federation.rule`` where Flower has one, else our own rule."""
    strategies = {
        "fedavg": lambda: FedAvg(),
        "median": lambda: FedMedian(),
        "trimmed-mean": lambda: FedTrimmedAvg(beta=fed.trim),
        "krum": lambda: Krum(num_malicious_nodes=fed.byzantine),
        "multi-krum": lambda: MultiKrum(num_malicious_nodes=fed.byzantine, num_nodes_to_select=fed.krum_select),
    }
    if fed.rule not in strategies:
        return ours
    return FlowerRule(strategies[fed.rule](), ours.needs_individual_updates)


# --- server side -----------------------------------------------------------------------------


class Nodes:
    """The run's Flower nodes by user id, and one round trip to them."""

    def __init__(self, grid: Grid, context: Context, users: int, config_toml: str,
                 timeout: float = REPLY_TIMEOUT_S) -> None:
        self.grid, self.context, self.config_toml, self.timeout = grid, context, config_toml, timeout
        self.node_of = self._discover(users)

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

    def spec(self, user: int, settings: RoundSettings, case: str) -> dict[str, Any]:
        """What a node needs to run ``user``'s round: the config, case, phase, round and progress."""
        start, end = settings.progress
        return {"config": self.config_toml, "case": case, "phase": settings.phase, "round": settings.round,
                "progress-start": start, "progress-end": end, "user": user}

    def updates(self, users: list[int], params: Params, settings: RoundSettings, case: str) -> list[ClientUpdate]:
        """Each user's update of ``params``, computed on its node, in the order of ``users``."""
        arrays = ArrayRecord({k: v.detach().cpu().contiguous() for k, v in params.items()})
        messages = [
            Message(RecordDict({"arrays": arrays, "config": ConfigRecord(self.spec(user, settings, case))}),
                    dst_node_id=self.node_of[user], message_type=f"{MessageType.TRAIN}.{PLAIN}",
                    group_id=f"{settings.phase}-{settings.round}")
            for user in users
        ]
        by_user = {int(r.content["metrics"]["user-id"]): r for r in self._exchange(messages, settings.phase)}
        device = next(iter(params.values())).device
        return [_decode(by_user[u], device) for u in users]

    def secure_mean(self, users: list[int], params: Params, settings: RoundSettings,
                    case: str) -> tuple[Params, dict[int, float]]:
        """The mean of the users' deltas through SecAgg+, and their losses."""
        instructions = {u: (self.node_of[u], self.spec(u, settings, case)) for u in users}
        return secure_mean(self.grid, self.context, instructions, params)

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
    case: str = dataclasses.field(kw_only=True)
    secure: bool = dataclasses.field(kw_only=True, default=False)
    """SecAgg+: the server only learns the mean (no screening; every participant is aggregated)."""

    def updates(self, params: Params, settings: RoundSettings) -> list[ClientUpdate]:
        users = self.schedule.participants(settings.round, settings.phase)
        return self.nodes.updates(users, params, settings, self.case)

    def round(self, params: Params, settings: RoundSettings) -> tuple[Params, RoundReport]:
        if not self.secure:
            return super().round(params, settings)
        users = self.schedule.participants(settings.round, settings.phase)
        delta, losses = self.nodes.secure_mean(users, params, settings, self.case)
        return add(params, delta), RoundReport(settings.round, users, users, [], losses)


def flower_engine(cfg: Config, nodes: Nodes) -> Engine:
    """The ``ENGINE`` that runs every server of the experiment on ``nodes``."""

    fed = cfg.federation
    if fed.secure_aggregation and fed.weighting != "equal":
        raise ConfigError("secure aggregation (SecAgg+) averages with equal weights; set federation.weighting = 'equal'")

    def engine(server: Server, scenario: Scenario, phase: str) -> Server:
        if fed.secure_aggregation and server.rule.needs_individual_updates:
            raise ConfigError(f"the rule {type(server.rule).__name__} needs every update on its own, which SecAgg+ "
                              "hides from the server; use federation.rule = 'fedavg'")
        parts = {f.name: getattr(server, f.name) for f in dataclasses.fields(Server)}
        parts["rule"] = flower_rule(fed, server.rule)
        return FlowerServer(**parts, nodes=nodes, case=scenario.case, secure=fed.secure_aggregation)

    return engine


serverapp = ServerApp()


@serverapp.main()
def server_main(grid: Grid, context: Context) -> None:
    """Run the experiment of ``run_config["config"]`` (TOML) into the folder ``run_config["out"]``."""
    from fedmeta import experiments

    config_toml = str(context.run_config["config"])
    cfg = validate(tomllib.loads(config_toml))
    nodes = Nodes(grid, context, cfg.federation.users, config_toml)
    token = ENGINE.set(flower_engine(cfg, nodes))
    try:
        folder = RunDir.open(Path(str(context.run_config["out"])), cfg)
        folder.finish(experiments.get(cfg.experiment)(cfg, folder))
    finally:
        ENGINE.reset(token)


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
                                 "num-examples": update.examples, "loss": update.metrics["loss"]}),
    }), reply_to=msg)


@clientapp.train(mods=[secaggplus_mod])
def secure_train(msg: Message, context: Context) -> Message:
    """A SecAgg+ stage; in the masked-vector stage ``secaggplus_mod`` calls back for the delta."""
    return secure_reply(msg, lambda spec, params: local_update(spec, params, context))


def local_update(spec: Mapping[str, Any], params: Params, context: Context) -> ClientUpdate:
    """Run the round described by ``spec`` (config, case, phase, round, user) for the node's user."""
    user = int(spec["user"])
    if user != _own_user(context):
        raise FlowerError(f"node of user {_own_user(context)} was asked to train user {user}")
    client = _client(str(spec["config"]), str(spec["case"]), str(spec["phase"]), user)
    settings = RoundSettings(int(spec["round"]), str(spec["phase"]),
                             (float(spec["progress-start"]), float(spec["progress-end"])))
    return client.update({k: v.to(client.images.device) for k, v in params.items()}, settings)


def _client(config_toml: str, case: str, phase: str, user: int) -> MetaClient:
    """The experiment's client of ``user``."""
    return _server(config_toml, case, phase).clients[user]


@functools.lru_cache(maxsize=2)
def _server(config_toml: str, case: str, phase: str) -> Server:
    """The in-process server of a phase, for its clients (cached: a simulation actor serves many rounds)."""
    cfg = _config(config_toml)
    token = ENGINE.set(in_process)  # a node runs its client here, never dispatches it again
    try:
        return (main_server if phase == "main" else pretrain_server)(cfg, _scenario(config_toml, case))
    finally:
        ENGINE.reset(token)


@functools.lru_cache(maxsize=1)
def _scenario(config_toml: str, case: str) -> Scenario:
    return build_scenario(_config(config_toml), case)


@functools.lru_cache(maxsize=1)
def _config(config_toml: str) -> Config:
    cfg = validate(tomllib.loads(config_toml))
    runtime.setup(cfg.runtime)
    return cfg
