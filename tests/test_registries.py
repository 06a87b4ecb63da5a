"""The experiment layer: parts added from a file alone, many attackers, a stateful rule that
resumes exactly after SIGKILL, and the rules' hand-computed values."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedmeta.config import ConfigError, load_config
from fedmeta.experiments import run
from fedmeta.federation.aggregation import Krum, make_rule
from fedmeta.federation.foolsgold import FoolsGold, foolsgold_weights
from fedmeta.registry import ATTACKS, RULES, load_plugins
from fedmeta.runs import RunDir

TOY = str(Path(__file__).with_name("plugins") / "toy.py")
TINY = [
    "model.filters=8", "meta.shots=2", "meta.inner_steps=2", "meta.meta_batch=2", "federation.episodes=4",
    "federation.rounds=2", "pretrain.rounds=1", "pretrain.episodes=4", "attacks.boosted.episodes=4",
    "attacks.boosted.inner_epochs=1", "eval.episodes=3", "eval.steps=2", "runtime.threads=1",
]
TOY_SETTINGS = [f"plugins=['{TOY}']", "federation.rule=toy-scaled-mean", "rules.toy-scaled-mean.scale=0.8",
                "attack.attackers=[{user = 0, rounds = [1], strategy = 'toy-sign-flip'}]", "attacks.toy-sign-flip.boost=3.0"]
TWO_ATTACKERS = ["federation.rule=foolsgold", "federation.users=5", "attack.attackers=[{user = 0, rounds = [1, 2]}, {user = 1, rounds = [1]}]"]


def test_plugin_parts_are_validated_and_listed_from_the_registry():
    cfg = load_config("omniglot-exp1a-quick", TINY + TOY_SETTINGS)
    assert "toy-scaled-mean" in RULES and "toy-sign-flip" in ATTACKS
    assert cfg.rule_options("toy-scaled-mean") == {"scale": 0.8}
    assert cfg.attack_options("toy-sign-flip") == {"boost": 3.0}
    with pytest.raises(ConfigError, match=r"rules: toy-scaled-mean.scale: Input should be greater than 0"):
        load_config("omniglot-exp1a-quick", TINY + TOY_SETTINGS + ["rules.toy-scaled-mean.scale=-1"])
    with pytest.raises(ConfigError, match=r"federation.rule: unknown aggregation rule 'toy-nope'; registered: fedavg"):
        load_config("omniglot-exp1a-quick", ["federation.rule=toy-nope"])
    with pytest.raises(ConfigError, match=r"attack.boost: moved; use attacks.boosted.boost"):
        load_config("omniglot-exp1a-quick", ["attack.boost=2.0"])


def test_a_rule_variant_is_its_rule_with_the_settings_of_its_own_table():
    cfg = load_config("omniglot-compare-quick", ["compare.rules=['freqfed', 'freqfed:layers']",
                                                 "rules.freqfed:layers.transform=layers"])
    assert RULES.get("freqfed:layers") is RULES.get("freqfed") and RULES.base("freqfed:layers") == "freqfed"
    transforms = cfg.rule_options("freqfed")["transform"], cfg.rule_options("freqfed:layers")["transform"]
    assert transforms == ("flat", "layers")
    assert "freqfed:layers" in RULES and "nope:layers" not in RULES and ATTACKS.base("dba:x") == "dba:x"  # rules only
    with pytest.raises(ConfigError, match=r"'freqfed:layers' is a variant of 'freqfed': give its settings in "
                                          r"\[rules.\"freqfed:layers\"\]"):
        load_config("omniglot-compare-quick", ["compare.rules=['freqfed:layers']"])  # else it is freqfed renamed
    with pytest.raises(ConfigError, match=r"rules: freqfed:layers.transform: Input should be 'flat' or 'layers'"):
        load_config("omniglot-exp1a-quick", ["federation.rule=freqfed:layers", "rules.freqfed:layers.transform=2d"])
    with pytest.raises(ValueError, match="':' is kept for variants"):
        RULES.register("mine:x")


def test_impossible_attackers_and_keys_of_other_experiments_are_refused():
    with pytest.raises(ConfigError, match="more attackers than federation.per_round = 3 in rounds \\[1\\]"):
        load_config("omniglot-exp1a-quick", ["attack.attackers=[{user=0}, {user=1}, {user=2}, {user=3}]",
                                             "federation.users=8"])
    with pytest.raises(ConfigError, match="leave no benign one"):
        load_config("omniglot-exp1a-quick", ["attack.attackers=[{user=0}, {user=1}, {user=2}, {user=3}]"])
    with pytest.raises(ConfigError, match="per_round = 3 is more than the 2 benign users"):
        load_config("omniglot-exp1a-quick", ["attack.attackers=[{user=0}, {user=1}]"])
    with pytest.raises(ConfigError, match=r"strategy 'dba' splits the trigger .* at least 2 \(got user 0 alone\)"):
        load_config("omniglot-fleet-quick", ["attack.attackers=[{user=0, strategy='dba'}, {user=1}]"])
    with pytest.raises(ConfigError, match=r"robust: unknown key; allowed here: experiment, description"):
        load_config("omniglot-exp1a-quick", ["robust.epsilon=4"])
    with pytest.raises(ConfigError, match=r"meta.inner_lr: Input should be a finite number"):
        load_config("omniglot-exp1a-quick", ["meta.inner_lr=inf"])


def test_toy_rule_and_attack_run_in_a_federation(tmp_path, omniglot, monkeypatch):
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache"))
    load_plugins([TOY])
    toy = sys.modules[next(m for m in sys.modules if m.startswith("fedmeta_plugin_toy"))]
    before = toy.CALLS["rule"]
    cfg = load_config("omniglot-exp1a-quick", TINY + TOY_SETTINGS)
    folder = RunDir.open(tmp_path / "toy", cfg)
    run(cfg, folder)
    records = folder.records()
    assert toy.CALLS["rule"] - before == 3 + 1  # the main rounds, and the one pre-training round
    assert 0 in records[1]["aggregated"]  # the toy attacker's reversed update went in


def test_foolsgold_weights_sybils_zero_and_distinct_users_one():
    distinct = torch.eye(4)[:2] * torch.tensor([[1.0], [2.0]])  # two users with orthogonal histories
    sybil = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    w = foolsgold_weights(torch.cat([distinct, sybil, sybil]))
    assert torch.allclose(w, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    exact = foolsgold_weights(torch.eye(3)[[0, 0, 1, 2]])  # cosine exactly 1: log(0) = -inf must give 0, not 1
    assert exact.tolist() == [0.0, 0.0, 1.0, 1.0]
    rule = FoolsGold()
    updates = torch.cat([distinct, sybil, sybil])
    out = rule(updates, torch.full((4,), 0.25), torch.Generator(), users=[0, 1, 2, 3])
    # the sybils' weight is 0 and the others' 1: their shares of the round (a quarter each), not rescaled (Alg. 1)
    assert torch.allclose(out, 0.25 * distinct.sum(0))
    state = rule.state_dict()
    again = FoolsGold()
    again.load_state_dict(state)
    assert sorted(again.history) == [0, 1, 2, 3] and torch.equal(again.history[2], sybil[0])


def test_multi_krum_weights_the_chosen_updates():
    updates = torch.tensor([[1.0, 1.0], [1.2, 0.8], [0.9, 1.1], [30.0, -30.0]])
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    chosen = (0.1 * updates[0] + 0.3 * updates[2]) / 0.4  # (1,1) and (0.9,1.1): the two best scores
    assert torch.allclose(Krum(1, 2)(updates, weights, torch.Generator()), chosen)
    assert torch.allclose(make_rule("multi-krum", {"byzantine": 1, "select": 2})(updates, weights, torch.Generator()), chosen)


def _cli(out: Path, cache: Path, overrides: list[str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "fedmeta.cli", "run", "omniglot-exp1a-quick", "--out", str(out)]
    for item in TINY + overrides:
        args += ["--set", item]
    env = {**os.environ, "FEDMETA_CACHE": str(cache)}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_two_attackers_and_a_stateful_rule_resume_exactly_after_sigkill(tmp_path, omniglot):
    cache = tmp_path / "cache"
    overrides = TWO_ATTACKERS + ["federation.rounds=3"]
    assert _cli(tmp_path / "ref", cache, overrides).wait(600) == 0
    reference = RunDir(tmp_path / "ref").records()
    assert [r["round"] for r in reference] == [0, 1, 2, 3, 4, 5]
    assert {0, 1} <= set(reference[1]["participants"]) and 0 in reference[2]["participants"]
    killed = tmp_path / "killed"
    process = _cli(killed, cache, overrides)
    deadline = time.monotonic() + 600
    while len(RunDir(killed).records()) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # round 2 (the second attack round) is done: round 3 is under way
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "summary.json").exists()
    assert _cli(killed, cache, overrides).wait(600) == 0
    assert RunDir(killed).records() == reference
