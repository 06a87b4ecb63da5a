"""Typed, validated experiment configs: the sections (``sections``), one model per experiment
family (``schema``), and reading presets and TOML files (``loader``)."""

from fedmeta.config.loader import PRESETS, load_config, preset_description, preset_names, validate
from fedmeta.config.schema import FAMILIES, Backdoor, Base, Config, Federated
from fedmeta.config.sections import (
    AttackConfig,
    AttackerConfig,
    CompareConfig,
    ConfigError,
    DataConfig,
    DefenseConfig,
    EvalConfig,
    FederationConfig,
    FinetuneConfig,
    MetaConfig,
    MiaConfig,
    ModelConfig,
    PretrainConfig,
    RobustConfig,
    RuntimeConfig,
    TriggerConfig,
)

__all__ = [
    "FAMILIES", "PRESETS", "AttackConfig", "AttackerConfig", "Backdoor", "Base", "CompareConfig", "Config",
    "ConfigError", "DataConfig", "DefenseConfig", "EvalConfig", "FederationConfig", "Federated", "FinetuneConfig",
    "MetaConfig", "MiaConfig", "ModelConfig", "PretrainConfig", "RobustConfig", "RuntimeConfig", "TriggerConfig",
    "load_config", "preset_description", "preset_names", "validate",
]
