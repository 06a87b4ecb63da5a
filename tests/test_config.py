"""Configs: presets load, bad keys and values are refused by name, overrides apply."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.config import ConfigError, load_config, preset_description, preset_names, validate


def test_every_preset_validates_and_describes_itself():
    from fedmeta.sweeps import plan

    for name in preset_names():
        cfg = plan(name, [], [], None).base  # a sweep preset: its base config, every cell validated
        assert preset_description(name), name
        assert validate(__import__("tomllib").loads(cfg.to_toml())) == cfg  # config.toml round-trips


def test_attack_tables_of_unused_strategies_are_checked_and_do_not_make_a_new_setting(tmp_path):
    """A quick preset sets every strategy's length (so a swapped strategy does not train at the
    paper's 50000 x 50); those tables are checked, yet a run written without them is the same setting."""
    from fedmeta.runs import config_changes

    swapped = load_config("omniglot-exp1a-quick", ['attack.attackers=[{user = 0, strategy = "alie"}]'])
    assert swapped.attacks["alie"]["episodes"] == 1000
    with pytest.raises(ConfigError, match="alie.zz"):
        load_config("omniglot-exp1a-quick", ["attacks.alie.zz=1"])
    cfg = load_config("omniglot-exp1a-quick")
    older = __import__("tomllib").loads(cfg.to_toml())
    older["attacks"] = {"boosted": older["attacks"]["boosted"]}  # as written before the preset set the others
    (tmp_path / "config.toml").write_text(__import__("tomli_w").dumps(older))
    assert config_changes(tmp_path / "config.toml", cfg) == {}
    assert config_changes(tmp_path / "config.toml", swapped)  # another strategy is another setting


def test_preset_names_follow_dataset_experiment_scale():
    for name in preset_names():
        dataset, *_, scale = name.split("-")
        assert dataset in {"omniglot", "miniimagenet", "mnist", "fashionmnist"} and scale in {"quick", "medium", "paper"}, name


def test_quick_preset_extends_paper_preset():
    quick, paper = load_config("omniglot-pretrain-quick"), load_config("omniglot-pretrain-paper")
    assert quick.meta.inner_batch == paper.meta.inner_batch == 10
    assert quick.meta.iterations < paper.meta.iterations


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"meta\.inner_stepz: unknown key; allowed here: algorithm, .*inner_steps"):
        load_config("omniglot-pretrain-quick", ["meta.inner_stepz=3"])


def test_bad_choice_names_the_allowed_values():
    with pytest.raises(ConfigError, match=r"meta\.algorithm: unknown meta-learner 'sgd'; registered: reptile, fomaml, maml$"):
        load_config("omniglot-pretrain-quick", ["meta.algorithm=sgd"])


def test_bad_number_is_refused():
    with pytest.raises(ConfigError, match=r"meta\.inner_lr: Input should be greater than 0"):
        load_config("omniglot-pretrain-quick", ["meta.inner_lr=-1"])


def test_batched_needs_parallel_carry():
    with pytest.raises(ConfigError, match="meta.adam_carry = 'parallel'"):
        load_config("omniglot-pretrain-quick", ["runtime.batched=true"])
    assert load_config("omniglot-pretrain-quick", ["runtime.batched=true", "meta.adam_carry=parallel"]).runtime.batched


def test_overrides_parse_toml_values():
    cfg = load_config("omniglot-pretrain-quick", ["seed=7", "eval.shots=[1, 5]", "data.root=/x/y", "eval.transductive=true"])
    assert (cfg.seed, cfg.eval.shots, cfg.data.root, cfg.eval.transductive) == (7, [1, 5], "/x/y", True)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; presets: .*omniglot-pretrain-quick"):
        load_config("nope")


def test_toml_file_with_extends(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('extends = "omniglot-pretrain-quick"\nseed = 3\n[meta]\niterations = 10\n')
    cfg = load_config(str(path))
    assert (cfg.seed, cfg.meta.iterations, cfg.meta.inner_steps) == (3, 10, 5)


def test_cli_lists_presets_and_reports_config_errors(tmp_path):
    runner = CliRunner()
    listing = runner.invoke(app, ["presets"])
    assert listing.exit_code == 0 and "omniglot-pretrain-quick" in listing.output
    bad = runner.invoke(app, ["run", "omniglot-pretrain-quick", "--out", str(tmp_path / "r"), "--set", "meta.nope=1"])
    assert bad.exit_code == 2 and "meta.nope: unknown key" in bad.output
    assert not (tmp_path / "r").exists()  # nothing written for a config that cannot run


@pytest.mark.parametrize("preset, overrides, message", [
    ("omniglot-compare-quick", ["attack.cases=['a', 'b']"], r"attack\.cases = \['a', 'b'\]: experiment "
                                                            r"'defense-comparison' runs one case"),
    ("omniglot-core-quick", ["attack.cases=['b', 'c']"], r"attack\.cases .*'backdoor-core' runs one case"),
    ("omniglot-compare-quick", ["finetune.clean_twin=true"], r"finetune\.clean_twin = True: .*clean-local"),
    ("omniglot-exp1a-quick", ["data.omniglot_split=torchmeta"], r"data\.omniglot_split = 'torchmeta': .*seeded"),
    ("omniglot-exp2-quick", ["meta.meta_lr_final=0.0"], r"meta\.meta_lr_final: .*pretrain\.meta_lr_final"),
    ("omniglot-exp1a-quick", ["eval.shots=[5, 1]"], r"eval\.shots = \[5, 1\]: .*one shot count"),
    ("mnist-mia-quick", ["eval.shots=[1, 5]"], r"eval\.shots = \[1, 5\]: .*one shot count"),
    ("mnist-mia-quick", ["eval.ways=3"], r"eval\.ways = 3: .*meta\.ways = 5"),
    ("mnist-mia-quick", ["mia.sweep_iterations=50"], r"mia\.sweep_iterations = 50: .*invert nothing"),
    ("omniglot-rmaml-federated-quick", ["federation.dirichlet_alpha=0.5"], r"federation\.dirichlet_alpha = 0\.5: "
                                                                          r".*leave it at None"),
    ("omniglot-rmaml-federated-quick", ["federation.holdout=7"], r"federation\.holdout = 7: .*leave it at 5"),
    ("omniglot-rmaml-federated-quick", ["robust.learners=['adml']"], r"robust\.learners .*robust\.client_learner"),
    ("omniglot-rmaml-quick", ["meta.adam_beta2=0.5"], r"meta\.adam_beta2 applies to Reptile only"),
    ("omniglot-compare-quick", ["federation.min_updates=2"], r"compare\.secure_rows: .*min_updates = per_round"),
    ("omniglot-compare-quick", ["federation.weighting=size"], r"compare\.secure_rows: .*weighting = 'equal'"),
    ("omniglot-exp1a-quick", ["attack.attackers=[{user = 0, rounds = []}]"], r"attack\.attackers\.0\.rounds: .*"
                                                                             r"at least one round"),
    ("omniglot-compare-quick", ["compare.rules=['krum', 'median', 'krum']"], r"compare\.rules: .*krum twice"),
    # before any pre-training: one ALIE attacker of 10 per round has z_max = 0, the benign mean
    ("omniglot-fleet-quick", ["attack.attackers=[{user = 0, rounds = [1], strategy = 'alie'}]"],
     r"attacks\.alie\.z: with f = 1 attacker of n = 10 .*z_max = Phi\^-1\(1/2\) = 0"),
    ("omniglot-exp1a-quick", ["attack.attackers=[{user = 0, strategy = 'alie'}]", "attacks.alie.z=0"],
     r"alie\.z.*greater than 0"),
    ("mnist-mia-quick", ["data.reserved_classes=['0', '1']"], r"data\.reserved_classes = \['0', '1'\]: .*reserves "
                                                              r"no backdoor classes"),
    ("miniimagenet-exp1a-quick", ["data.reserved_classes=['n04612504']"], r"data\.reserved_classes: 1 names; "
                                                                          r".*and the target need 2"),
])
def test_a_setting_the_experiment_would_not_read_is_refused_by_name(preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset, overrides)


def test_what_the_refused_settings_leave_allowed():
    assert load_config("mnist-mia-quick", ["mia.sweep_iterations=50", "mia.invert_threats=['informed', 'realistic']"])
    assert load_config("omniglot-compare-quick", ["federation.min_updates=2", "compare.secure_rows=false"])
    assert load_config("omniglot-rmaml-quick", ["eval.shots=[1, 5]"])  # robustness evaluates each shot count
    assert load_config("omniglot-exp1a-quick", ["pretrain.meta_lr_final=0.0"])
    assert load_config("miniimagenet-exp1a-quick", ["data.reserved_classes=['n04612504', 'n02120079']"])


def test_without_the_attack_the_baseline_plays_the_same_rounds_with_the_attacker_sitting_out():
    from fedmeta.scenario.builder import Phase, build_schedule

    attackers = "attack.attackers=[{user = 0, rounds = [1, 3]}]"
    on, off = (load_config("omniglot-exp1a-quick", [attackers, f"attack.enabled={flag}"]) for flag in ("true", "false"))
    assert on.attack.last_round == off.attack.last_round == 3  # then federation.rounds more, in both
    population = SimpleNamespace(attackers=[0], benign=[1, 2, 3])
    for cfg, attacking in ((on, True), (off, False)):
        schedule = build_schedule(cfg, Phase("main", "a"), population)
        assert [0 in schedule.participants(r, "main") for r in (1, 3)] == [attacking] * 2
