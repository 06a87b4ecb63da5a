"""The Flower engine: same experiment, same global model, same metrics as the in-process run,
in simulation and under SecAgg+ (up to quantization); the deployment is in test_flower_deployment.py."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("flwr") is None:
    pytest.skip("the Flower tests need fedmeta[flower]", allow_module_level=True)

from fedmeta import flower_app as flower
from fedmeta.config import Config, load_config
from fedmeta.experiments import run
from fedmeta.runs import RunDir

TINY = [
    "model.filters=8", "meta.shots=2", "meta.inner_steps=2", "meta.meta_batch=2", "federation.episodes=4",
    "federation.rounds=2", "pretrain.rounds=1", "pretrain.episodes=4", "attacks.boosted.episodes=4", "attacks.boosted.inner_epochs=1",
    "eval.episodes=3", "eval.steps=2", "runtime.threads=1",
]


def _recording(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Global weights at every checkpoint (after round 0, 1, ...), in the process that runs the server."""
    seen: list[dict[str, torch.Tensor]] = []
    original = RunDir.save_checkpoint

    def save(self, tensors, state):
        if not self.path.name.endswith(".partial"):  # the run's, not the pre-training cache's
            seen.append({k: v.clone() for k, v in tensors.items()})
        original(self, tensors, state)

    monkeypatch.setattr(RunDir, "save_checkpoint", save)
    return seen


@dataclass
class Plain:
    """The tiny config run in-process and on Flower's simulation, with the weights of each checkpoint."""

    cfg: Config
    local: RunDir
    flower: RunDir
    local_weights: list[dict[str, torch.Tensor]]
    flower_weights: list[dict[str, torch.Tensor]]
    summary: dict
    cache: Path


@pytest.fixture(scope="module")
def plain(tmp_path_factory, omniglot) -> Plain:
    """Shared by the equivalence and SecAgg+ tests: each Ray start-up costs seconds."""
    root = tmp_path_factory.mktemp("plain")
    cfg = load_config("omniglot-exp1a-quick", TINY)
    with pytest.MonkeyPatch.context() as mp:
        seen = _recording(mp)
        mp.setenv("FEDMETA_CACHE", str(root / "cache-local"))
        local = RunDir.open(root / "local", cfg)
        run(cfg, local)
        local_weights = list(seen)
        seen.clear()
        mp.setenv("FEDMETA_CACHE", str(root / "cache-flower"))  # pre-training runs on Flower too
        summary = flower.simulate(cfg, root / "flower", actors=2)
    return Plain(cfg, local, RunDir(root / "flower"), local_weights, seen, summary, root / "cache-flower")


def test_flower_simulation_equals_in_process_run(plain):
    cfg = plain.cfg
    rounds = 1 + 1 + cfg.federation.rounds  # round 0, the attack round, the benign rounds
    assert len(plain.flower_weights) == len(plain.local_weights) == rounds
    for ours, theirs in zip(plain.local_weights, plain.flower_weights, strict=True):
        for name in ours:
            torch.testing.assert_close(theirs[name], ours[name], rtol=1e-5, atol=1e-6)
    records, expected = plain.flower.records(), plain.local.records()
    assert [sorted(r) for r in records] == [sorted(r) for r in expected]  # the same metric names
    assert [r["participants"] for r in records[1:]] == [r["participants"] for r in expected[1:]]
    assert 0 in records[1]["participants"]  # the attacker, in round 1
    for ours, theirs in zip(expected, records, strict=True):
        for name in ("meta_test_accuracy", "attack_train_accuracy", "attack_val_accuracy"):
            assert theirs[name] == pytest.approx(ours[name], abs=1e-6)
    assert plain.summary["experiment"] == "backdoor-rounds"


def test_secure_aggregation_differs_from_fedavg_by_quantization_only(plain, tmp_path, monkeypatch):
    from fedmeta.engines.flower.secagg import CLIPPING_RANGE, QUANTIZATION_RANGE

    monkeypatch.setenv("FEDMETA_CACHE", str(plain.cache))  # the same pre-trained model as the plain run
    seen = _recording(monkeypatch)
    cfg = load_config("omniglot-exp1a-quick", TINY + ["federation.secure_aggregation=true"])
    flower.simulate(cfg, tmp_path / "secure", actors=2)
    assert len(seen) == len(plain.flower_weights)
    largest = max(float((a[k] - b[k]).abs().max()) for a, b in zip(plain.flower_weights, seen) for k in a)
    print(f"largest |SecAgg+ - FedAvg| over all rounds and weights: {largest:.3g}")
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE  # one quantization level
    assert 0 < largest < 4 * step * (1 + cfg.federation.rounds)  # the attack round, then the benign ones
    records = RunDir(tmp_path / "secure").records()
    assert [r["round"] for r in records] == [0, 1, 2, 3] and 0 in records[1]["participants"]  # attacked under SecAgg+


@pytest.mark.slow  # ~40 s; CI tests stragglers on fake nodes (test_flower_deployment), the killed SuperNode is slow too
def test_secure_aggregation_goes_on_without_a_node_that_fails(tmp_path, omniglot, monkeypatch):
    """An attacker boosted past the SecAgg+ clipping range fails in the masked stage: SecAgg+ drops
    it, unmasks the mean of the two others (M_min = 2), and the round reports it as missing."""
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache"))
    cfg = load_config("omniglot-exp1a-quick", TINY + ["federation.secure_aggregation=true", "federation.rounds=1",
                                                      "federation.min_updates=2", "attacks.boosted.boost=100000"])
    summary = flower.simulate(cfg, tmp_path / "secure", actors=2)
    records = RunDir(tmp_path / "secure").records()
    assert [(r["participants"], r["aggregated"], r["missing"]) for r in records[1:]] == [
        ([0, 1, 2], [1, 2], [0]), ([1, 2, 3], [1, 2, 3], [])]
    assert summary["flower_updates_received"] == 3 + 2 + 3  # pre-training, the attack round, a benign round


def test_secure_aggregation_refuses_rules_that_need_each_update(tmp_path):
    from typer.testing import CliRunner

    from fedmeta.cli import app

    result = CliRunner().invoke(app, ["run", "omniglot-exp1a-quick", "--engine", "flower", "--out", str(tmp_path / "x"),
                                      "--set", "federation.secure_aggregation=true", "--set", "federation.rule=median"])
    assert result.exit_code == 2
    assert "needs every update on its own" in result.output and not (tmp_path / "x").exists()


def test_flower_rules_match_ours():
    """Where a rule's registration names a Flower strategy, that strategy computes our rule, with
    unequal weights (Flower's Multi-Krum weights the chosen updates by num-examples, as ours does)."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedmeta.engines.flower.apps import FlowerRule, flower_rule
    from fedmeta.federation.aggregation import make_rule
    from fedmeta.registry import RULES

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a Flower runtime sets
    updates = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    updates[0] += 10.0  # an outlier
    weights = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15])
    options = {"trimmed-mean": {"trim": 0.2}, "krum": {"byzantine": 1}, "multi-krum": {"byzantine": 1, "select": 3}}
    mapped = [name for name in RULES.names() if RULES.get(name).info.get("flower")]
    assert mapped == ["fedavg", "median", "trimmed-mean", "multi-krum", "krum"]
    for name in RULES.names():
        ours = make_rule(name, options.get(name, {}))
        theirs = flower_rule(name, options.get(name, {}), ours)
        assert isinstance(theirs, FlowerRule) == (name in mapped)
        if name in mapped:
            torch.testing.assert_close(theirs(updates, weights, torch.Generator()), ours(updates, weights, torch.Generator()),
                                       rtol=1e-5, atol=1e-5)


def test_experiments_without_a_federation_refuse_the_flower_engine(tmp_path):
    from typer.testing import CliRunner

    from fedmeta.cli import app

    result = CliRunner().invoke(app, ["run", "omniglot-pretrain-quick", "--engine", "flower", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "runs on the in-process engine only" in result.output
    assert not (tmp_path / "x").exists()


def test_toy_rule_and_attack_from_a_plugin_file_run_on_flower_as_in_process(tmp_path, omniglot, monkeypatch):
    """A rule and an attack registered in tests/plugins/toy.py alone: the Flower nodes (Ray actors)
    import the plugin from the config and give the in-process metrics."""
    from test_registries import TOY_SETTINGS

    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache"))
    cfg = load_config("omniglot-exp1a-quick", TINY + TOY_SETTINGS + ["federation.rounds=1"])
    local = RunDir.open(tmp_path / "local", cfg)
    run(cfg, local)
    summary = flower.simulate(cfg, tmp_path / "flower", actors=2)
    assert summary["flower_updates_received"] == 3 * 2  # the attack round and one benign round (pre-training: cached)
    records, expected = RunDir(tmp_path / "flower").records(), local.records()
    assert 0 in records[1]["participants"]
    for ours, theirs in zip(expected, records, strict=True):
        for name in ("meta_test_accuracy", "attack_train_accuracy", "attack_val_accuracy"):
            assert theirs[name] == pytest.approx(ours[name], abs=1e-6)


@pytest.mark.parametrize(("preset", "overrides", "updates"), [
    pytest.param("omniglot-exp2-quick", ["attack.cases=['a']", "finetune.steps=2", "finetune.every=2",
                                         "finetune.episodes=2", "finetune.users=1"], 3 + 3,  # pre-training, the attack round
                 marks=pytest.mark.slow),  # its path (the attacked model, then per-user curves) runs in the SecAgg+ Exp 3 test
    pytest.param("omniglot-compare-quick", ["compare.rules=['fedavg', 'median']", "compare.local_defenses=[]",
                                            "finetune.users=1"],
                 3 + 3 + 3,  # pre-training, the attack round, the same round without the attacker
                 marks=pytest.mark.slow),  # CI time; its rounds are Exp 1a's, run on Flower in the equality test
    pytest.param("omniglot-rmaml-federated-quick", ["federation.rounds=1", "federation.episodes=2",
                                                    "robust.maml_clients=[1]"], 4,
                 marks=pytest.mark.slow),  # CI time; the Partition population's path on Flower
])
def test_every_federated_experiment_runs_its_clients_on_flower_nodes(tmp_path, omniglot, monkeypatch, preset, overrides,
                                                                      updates):
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache"))
    tiny = [o for o in TINY if not o.startswith(("attacks.", "pretrain.", "federation.rounds"))] if "rmaml" in preset else TINY
    cfg = load_config(preset, tiny + overrides)
    summary = flower.simulate(cfg, tmp_path / "run", actors=2)
    assert summary["engine"] == "flower" and summary["flower_updates_received"] == updates


def test_attack_and_local_defense_run_under_secure_aggregation(tmp_path, omniglot, monkeypatch):
    """Exp 3 on Flower with SecAgg+: the attack round is masked, the defense runs at each benign user."""
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache"))
    cfg = load_config("omniglot-exp3-quick", TINY + ["federation.secure_aggregation=true", "attack.cases=['a']",
                                                     "defense.head_steps=1", "finetune.steps=2", "finetune.every=2",
                                                     "finetune.episodes=2", "finetune.users=1"])
    summary = flower.simulate(cfg, tmp_path / "exp3", actors=2)
    assert summary["flower_updates_received"] == 3 + 3  # pre-training and the attack round, both under SecAgg+
    records = RunDir(tmp_path / "exp3").records()
    assert [(r["case"], r["step"]) for r in records] == [("a", 0), ("a", 2)]
    assert all(0.0 <= r["attack_val_accuracy"] <= 1.0 for r in records)
