"""The Flower deployment: TLS and SuperNode authentication, the ServerApp's checks of nodes and
replies, the operator's run folder, and rounds that go on without a node that died."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("flwr") is None:
    pytest.skip("the Flower tests need fedmeta[flower]", allow_module_level=True)

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedmeta.config import load_config
from fedmeta.engines.flower.apps import (
    NODES_ENV,
    RUNS_ENV,
    FlowerError,
    FlowerServer,
    Nodes,
    Operator,
    run_folder,
)
from fedmeta.experiments import run
from fedmeta.federation.aggregation import make_rule
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.schedule import Schedule
from fedmeta.federation.server import Server
from fedmeta.runs import RunDir
from fedmeta.scenario.builder import Phase

TINY = [
    "model.filters=8", "meta.shots=2", "meta.inner_steps=2", "meta.meta_batch=2", "federation.episodes=4",
    "federation.rounds=1", "pretrain.rounds=1", "pretrain.episodes=4", "attacks.boosted.episodes=4",
    "attacks.boosted.inner_epochs=1", "eval.episodes=3", "eval.steps=2", "runtime.threads=1",
]
KILLED = 3  # the user whose SuperNode dies after round 1
TIMEOUT = 40.0  # federation.reply_timeout of the deployment test: 2.5 times its slowest round under load


@pytest.mark.slow  # about 2 minutes, 40 s of it waiting for the dead node: a fifth of the CI suite
def test_secured_deployment_refuses_strangers_and_goes_on_without_a_dead_node(tmp_path, omniglot, monkeypatch):
    """TLS and SuperNode authentication on loopback: a node whose key was never registered is
    refused by the SuperLink, a registered node that claims user 1's partition by the ServerApp;
    user 3's SuperNode is killed after round 1, and round 2 goes on with the 3 updates that arrived
    (M_min = 2), exactly as in-process when user 3's update is lost; no process is left."""
    from fedmeta.engines.flower.deployment import Loopback

    cfg = load_config("omniglot-exp1a-quick", TINY + ["federation.users=4", "federation.per_round=3",
                                                      "federation.min_updates=2", f"federation.reply_timeout={TIMEOUT}"])
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache"))  # shared: the deployment reuses the pre-training
    with monkeypatch.context() as mp:
        mp.setattr(Server, "updates", _losing(Server.updates, KILLED, round=2))
        local = RunDir.open(tmp_path / "local", cfg)
        run(cfg, local)
    with Loopback(cfg.federation.users, tmp_path / "runs", home=tmp_path / "flwr") as deployment:
        stranger = deployment.add_node(1, name="unregistered", registered=False)
        rogue = deployment.add_node(1, name="rogue", trusted=False)
        deployment.wait_online()
        victim = deployment.processes[f"supernode-{KILLED}"]
        killer = threading.Thread(target=_kill_after_round, args=(tmp_path / "runs" / "deployed", 1, victim.pid),
                                  daemon=True)
        killer.start()
        clock = time.monotonic()
        summary = deployment.run(cfg, "deployed", timeout=1200)
        print(f"deployed run: {time.monotonic() - clock:.0f} s")
        assert stranger.wait(30) != 0
        assert "Failed to activate SuperNode" in (deployment.logs / "unregistered.log").read_text()
        running = deployment.left()
    assert deployment.left() == [] and not [pid for pid in running if _alive(pid)]
    assert not killer.is_alive() and victim.returncode == -signal.SIGKILL
    refusal = f"node {deployment.registered['rogue']} claims user 1, but the operator's table gives user 1 to node "
    assert summary["flower_refused"] == [refusal + str(deployment.node_of[1])]
    assert rogue.returncode is not None  # stopped with the deployment
    records, expected = RunDir(tmp_path / "runs" / "deployed").records(), local.records()
    assert [r["round"] for r in records] == [0, 1, 2] and 0 in records[1]["participants"]
    assert records[2]["participants"] == [1, 2, 3] and len(records[2]["aggregated"]) == 2  # benign rounds: all 3
    assert [r.get("missing") for r in records] == [None, [], [KILLED]]
    for ours, theirs in zip(expected, records, strict=True):
        assert sorted(theirs) == sorted(ours)
        for name in ("meta_test_accuracy", "attack_train_accuracy", "attack_val_accuracy"):
            assert theirs[name] == pytest.approx(ours[name], abs=1e-6)


def _losing(updates: Callable, user: int, round: int) -> Callable:
    """``Server.updates`` in which ``user``'s update of main round ``round`` never arrives."""

    def lossy(self, params, settings, known=None):
        arrived = updates(self, params, settings, known)
        return [u for u in arrived if not (settings.phase == "main" and settings.round == round and u.user == user)]

    return lossy


def _kill_after_round(folder: Path, r: int, pid: int, timeout: float = 900.0) -> None:
    """SIGKILL the process group ``pid`` once the run in ``folder`` logged round ``r``."""
    metrics, deadline = folder / RunDir.METRICS, time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = metrics.read_text().splitlines(keepends=True) if metrics.is_file() else []
        if any(json.loads(line).get("round") == r for line in lines if line.endswith("\n")):  # whole lines only
            os.killpg(pid, signal.SIGKILL)
            return
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_insecure_deployment_is_for_loopback_only(tmp_path):
    from fedmeta.engines.flower.deployment import DeploymentError, Loopback

    with pytest.raises(DeploymentError, match="loopback only"):
        Loopback(2, tmp_path, host="0.0.0.0", secure=False)


# --- the ServerApp's checks, on a grid of fake nodes --------------------------------------------


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a Flower runtime sets in its processes, and messages read (only for this module's tests)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class FakeGrid:
    """Nodes that answer at once with ``answer(node, message)`` (None: never)."""

    def __init__(self, nodes: list[int], answer: Callable[[int, Message], Message | None]) -> None:
        self.nodes, self.answer, self.replies = nodes, answer, {}

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for i, message in enumerate(messages):
            mid = f"m{len(self.replies)}-{i}"
            message.metadata.__dict__["_message_id"] = mid
            self.replies[mid] = self.answer(message.metadata.dst_node_id, message)
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [r for i in ids if (r := self.replies.get(i)) is not None]


PARAMS = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}


def _whoami(users: dict[int, int]) -> Callable[[int, Message], Message | None]:
    return lambda node, msg: Message(RecordDict({"node": ConfigRecord({"user": users[node]})}), reply_to=msg)


def _node(users: dict[int, int], arrays: Callable[[int], dict[str, torch.Tensor]] | None = None,
          claim: Callable[[int], int] = lambda user: user, dead: set[int] = frozenset()):
    """A grid of nodes holding ``users`` (node -> user) that answer whoami and train with ``arrays(user)``."""

    def answer(node: int, msg: Message) -> Message | None:
        if msg.metadata.message_type.startswith("query"):
            return _whoami(users)(node, msg)
        if node in dead:
            return None
        user = int(msg.content["config"]["user"])
        delta = arrays(user) if arrays else {k: torch.full_like(v, float(user)) for k, v in PARAMS.items()}
        return Message(RecordDict({"arrays": ArrayRecord(delta), "metrics": MetricRecord(
            {"user-id": claim(user), "examples": 5, "num-examples": 5, "loss": 0.5})}), reply_to=msg)

    return answer


class FakeContext:
    run_id = 7


def _nodes(grid: FakeGrid, users: int, listed: dict[int, int] | None = None, timeout: float = 0.5) -> Nodes:
    return Nodes(grid, FakeContext(), users, "", timeout, listed)


def test_a_rogue_node_claiming_a_listed_user_is_refused():
    users = {10: 0, 11: 1, 12: 1}  # node 12 claims user 1, which the operator registered as node 11's
    nodes = _nodes(FakeGrid(list(users), _node(users)), 2, listed={0: 10, 1: 11})
    assert nodes.node_of == {0: 10, 1: 11}
    assert nodes.refused == ["node 12 claims user 1, but the operator's table gives user 1 to node 11"]


def test_without_a_table_conflicting_claims_stop_the_run():
    users = {10: 0, 11: 1, 12: 1}
    with pytest.raises(FlowerError, match=r"no node holds users \[1\].*so do nodes \[11, 12\]"):
        _nodes(FakeGrid(list(users), _node(users)), 2)


def test_replies_for_another_user_or_with_foreign_arrays_are_refused(monkeypatch):
    import fedmeta.engines.flower.apps as apps

    users = {10: 0, 11: 1, 12: 2}
    odd = {0: {"w": torch.zeros(3, 2), "b": torch.zeros(2)}, 1: {"w": torch.zeros(2, 3), "b": torch.zeros(2)},
           2: {"w": torch.zeros(3, 2, dtype=torch.float64), "b": torch.zeros(2)}}
    decoded, decode = [], apps._decode
    monkeypatch.setattr(apps, "_decode", lambda reply, device: decoded.append(1) or decode(reply, device))
    nodes = _nodes(FakeGrid(list(users), _node(users, arrays=odd.__getitem__)), 3)
    arrived, missing = nodes.updates([0, 1, 2], PARAMS, RoundSettings(1, "main"), Phase("main", "a"))
    assert [u.user for u in arrived] == [0] and missing == [1, 2]
    assert len(decoded) == 2  # user 1's arrays, of the wrong shapes, were refused before decoding
    assert all("does not match the model's arrays (names, shapes or dtypes of w)" in r for r in nodes.refused)
    nodes = _nodes(FakeGrid(list(users), _node(users, claim=lambda user: 0)), 3)
    arrived, missing = nodes.updates([1, 2], PARAMS, RoundSettings(1, "main"), Phase("main", "a"))
    assert arrived == [] and missing == [1, 2]
    assert nodes.refused[0] == "main round 1: node 11, asked for user 1's update, sent user 0's"


def test_a_node_claiming_another_data_size_or_an_infinite_one_is_refused():
    """Under size weighting a node's claim would weigh its update: the server holds each user's
    size from its own split and refuses another (10**15); an infinite claim is refused, not a crash."""
    users = {10: 0, 11: 1, 12: 2}
    claims = {0: 5, 1: 10**15, 2: float("inf")}

    def claiming(node: int, msg: Message) -> Message | None:
        reply = _node(users)(node, msg)
        if not msg.metadata.message_type.startswith("query"):
            reply.content["metrics"]["examples"] = claims[users[node]]
        return reply

    nodes = _nodes(FakeGrid(list(users), claiming), 3)
    sizes = {0: 5, 1: 5, 2: 5}
    arrived, missing = nodes.updates([0, 1, 2], PARAMS, RoundSettings(1, "main"), Phase("main", "a"), sizes)
    assert [u.user for u in arrived] == [0] and missing == [1, 2]
    assert "claims 1000000000000000 examples, where the federation's split gives it 5" in nodes.refused[0]
    assert "is unreadable" in nodes.refused[1]
    with pytest.raises(FlowerError, match=r"no node holds users \[1\]; refused: node 11 does not say which user"):
        _nodes(FakeGrid([10, 11], _node({10: 0, 11: float("inf")})), 2)  # a user id of inf, at discovery


def test_a_reply_from_another_node_than_the_users_is_refused():
    users = {10: 0, 11: 1}

    def spoofing(node: int, msg: Message) -> Message | None:
        reply = _node(users)(node, msg)
        if node == 11 and not msg.metadata.message_type.startswith("query"):
            reply.metadata.__dict__["_src_node_id"] = 10
        return reply

    nodes = _nodes(FakeGrid(list(users), spoofing), 2)
    arrived, missing = nodes.updates([0, 1], PARAMS, RoundSettings(1, "main"), Phase("main", "a"))
    assert [u.user for u in arrived] == [0] and missing == [1]
    assert nodes.refused == ["main round 1: node 10 answered for node 11"]


def test_a_round_goes_on_without_missing_users_if_min_updates_arrived():
    """All 4 users selected, M_min = 2: with 2 nodes silent, the round averages the other two and
    reports the silent ones as missing; with 3 silent, it fails and says who and where to look."""
    users = {10: 0, 11: 1, 12: 2, 13: 3}

    def server(dead: set[int]) -> FlowerServer:
        nodes = _nodes(FakeGrid(list(users), _node(users, dead=dead)), 4, timeout=0.3)
        return FlowerServer({}, Schedule(4, 4, seed=0), make_rule("fedavg", {}), 2, nodes=nodes, phase=Phase("main", "a"))

    params, report = server({12, 13}).round(PARAMS, RoundSettings(2, "main"))
    assert report.participants == [0, 1, 2, 3] and report.missing == [2, 3] and report.aggregated == [0, 1]
    torch.testing.assert_close(params["w"], torch.full((3, 2), 0.5))  # the mean of users 0 and 1's deltas
    with pytest.raises(FlowerError, match=r"1 updates arrived, fewer than min_updates = 2; none from users \[1, 2, 3\] "
                                          r".*federation.reply_timeout = 0 s.*flwr log 7"):
        server({11, 12, 13}).round(PARAMS, RoundSettings(2, "main"))


def test_the_run_folder_is_the_operators(tmp_path, monkeypatch):
    assert run_folder(tmp_path, "exp1") == tmp_path / "exp1"
    for name in ("../elsewhere", "/abs/path", "a/b", "..", "", "a\\b"):
        with pytest.raises(FlowerError, match="plain folder name"):
            run_folder(tmp_path, name)
    monkeypatch.delenv(RUNS_ENV, raising=False)
    with pytest.raises(FlowerError, match=f"operator sets {RUNS_ENV}"):
        Operator.from_environment()
    (tmp_path / "nodes.toml").write_text('[nodes]\n0 = 123\n"1" = 456\n')
    monkeypatch.setenv(RUNS_ENV, str(tmp_path))
    monkeypatch.setenv(NODES_ENV, str(tmp_path / "nodes.toml"))
    assert Operator.from_environment() == Operator(tmp_path, {0: 123, 1: 456})


def test_an_honest_node_does_not_send_a_diverged_update_into_the_secure_sum():
    """SecAgg+ quantises each coordinate, so a NaN would enter the sum as a large integer and the
    server could not see it: the node refuses to send a non-finite update."""
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from fedmeta.engines.flower.secagg import SecureAggregationError, secure_reply
    from fedmeta.federation.updates import ClientUpdate

    fitins = FitIns(ndarrays_to_parameters([np.zeros(2, dtype=np.float32)]), {"names": "w", "clip": 1.0, "round": 1})
    msg = Message(compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=1, message_type="train")
    diverged = ClientUpdate(3, {"w": torch.tensor([float("nan"), 0.5])}, 1, {"loss": 0.1})
    with pytest.raises(SecureAggregationError, match="user 3: a non-finite update"):
        secure_reply(msg, lambda spec, params: diverged)
