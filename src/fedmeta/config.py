"""Typed, validated experiment configs, read from presets or TOML files.

An experiment is a config, not a script: ``fedmeta run CONFIG`` takes a preset name (a TOML file
in ``fedmeta/experiments/presets``) or a path to a TOML file, applies ``--set key=value``
overrides and validates the result. Unknown keys and bad values are refused with the dotted key
and what it accepts. A preset may start from another with ``extends = "name"``; the resolved
config is written to the run folder in full, so a run can always be repeated from its folder.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

PRESETS = resources.files("fedmeta") / "experiments" / "presets"


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what it accepts."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class DataConfig(Section):
    dataset: Literal["omniglot", "miniimagenet", "mnist", "fashionmnist"] = "omniglot"
    root: str | None = None
    """Folder with the datasets; default: $FEDMETA_DATA, else ../shared/data."""
    omniglot_split: Literal["seeded-1200", "torchmeta"] = "seeded-1200"
    """Omniglot characters: a seeded 1200/423 shuffle, or Vinyals' 1028/172/423 (torchmeta)."""
    rotations: bool = True
    """Omniglot: 90/180/270-degree rotations of meta-training characters as extra classes."""


class ModelConfig(Section):
    architecture: Literal["conv4", "smallconv", "mlp"] = "conv4"
    """'conv4': with BatchNorm (batch statistics); 'smallconv': Conv4 without normalisation, with
    conv biases (the usual MAML net on MNIST); 'mlp': fully connected, widths ``hidden``."""
    filters: PositiveInt = 64
    downsample: Literal["maxpool", "stride"] = "maxpool"
    """'maxpool': Conv4 of MAML/Reptile/the paper; 'stride': supervised-reptile's Omniglot net."""
    hidden: list[PositiveInt] = [128, 64]
    """MLP only: widths of the hidden layers."""


class MetaConfig(Section):
    algorithm: Literal["reptile", "maml", "fomaml"] = "reptile"
    ways: PositiveInt = 5
    shots: PositiveInt = 10
    """Training shots per class (Reptile's episodes; MAML's support sets)."""
    queries: PositiveInt = 15
    """MAML only: query examples per class in a training task."""
    inner_steps: PositiveInt = 10
    inner_batch: PositiveInt = 10
    """Reptile only: mini-batch size of the inner Adam steps (MAML adapts on the full support)."""
    inner_lr: PositiveFloat = 1e-3
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_carry: Literal["sequential", "parallel"] = "sequential"
    """Reptile: how the inner Adam moments pass between the episodes of a meta-batch."""
    meta_batch: PositiveInt = 5
    meta_lr: PositiveFloat = 0.1
    """Reptile's outer step size epsilon; MAML's outer Adam learning rate."""
    meta_lr_final: float | None = Field(None, ge=0.0)
    """If set, the outer step size anneals linearly to this value over the iterations."""
    iterations: PositiveInt = 1000


class EvalConfig(Section):
    ways: PositiveInt = 5
    shots: list[PositiveInt] = [5]
    """Meta-test shots; the first is the headline number, the others are reported beside it."""
    queries: PositiveInt = 1
    """Held-out examples per class in a meta-test episode."""
    steps: PositiveInt = 50
    batch: PositiveInt = 10
    """Mini-batch of the fine-tuning steps (Reptile; MAML fine-tunes on the full support)."""
    lr: PositiveFloat | None = None
    """Fine-tuning learning rate; default: meta.inner_lr."""
    transductive: bool = False
    """True: all queries in one batch; False: each query alone with the support set."""
    episodes: PositiveInt = 1000
    """Episodes of the final evaluation."""
    every: PositiveInt = 500
    """Iterations between evaluation points (each writes a metrics line and a checkpoint)."""
    episodes_during: PositiveInt = 100
    """Episodes of each intermediate evaluation."""

    @property
    def mode(self) -> str:
        return "transductive" if self.transductive else "non-transductive"


class FederationConfig(Section):
    users: PositiveInt = 4
    """M: users, each with a disjoint share of the meta-training classes."""
    per_round: PositiveInt = 3
    """M_r: users the server selects each round."""
    min_updates: PositiveInt = 3
    """M_min: the server aggregates as soon as this many updates arrived."""
    weighting: Literal["equal", "size"] = "equal"
    """alpha_i: equal (1/M_min), or by the size of each user's data."""
    rule: Literal["fedavg", "median", "trimmed-mean", "krum", "multi-krum", "clip"] = "fedavg"
    """How the server combines the updates: FedAvg (the paper), or a robust rule (a defense)."""
    trim: float = Field(0.2, ge=0.0, lt=0.5)
    """trimmed-mean: fraction of updates dropped from each side, per coordinate."""
    byzantine: NonNegativeInt = 1
    """krum, multi-krum: f, the number of malicious updates the rule tolerates."""
    krum_select: PositiveInt = 2
    """multi-krum: how many of the best-scored updates are averaged."""
    clip_norm: PositiveFloat = 1.0
    """clip: largest L2 norm an update keeps."""
    clip_noise: float = Field(0.0, ge=0.0)
    """clip: Gaussian noise std added to the mean, in units of clip_norm (0: clipping only)."""
    secure_aggregation: bool = False
    """The server only learns the sum of the updates (as under SecAgg+): rules that need each
    update on its own are refused."""
    episodes: PositiveInt = 1000
    """E: episodes each selected user meta-trains per round (E / meta.meta_batch outer steps)."""
    rounds: NonNegativeInt = 50
    """Benign rounds after the attack (Experiment 1)."""
    holdout: PositiveInt = 5
    """Examples held out of every meta-training class, as queries of main-task episodes."""


class PretrainConfig(Section):
    """Benign federated meta-training before the attack; cached and shared between experiments."""

    rounds: NonNegativeInt = 20
    episodes: PositiveInt = 1000
    """E per user per pre-training round."""
    inner_steps: PositiveInt | None = None
    """Overrides meta.inner_steps during pre-training."""
    meta_lr: PositiveFloat | None = None
    """Overrides meta.meta_lr during pre-training."""
    meta_lr_final: float | None = Field(None, ge=0.0)
    """Anneals the outer step size over all pre-training rounds."""


class TriggerConfig(Section):
    pattern: Literal["patch", "checker", "line", "blend"] = "patch"
    size: PositiveInt = 4
    """Side of the patch or checkerboard, length of the line, in pixels."""
    position: Literal["bottom-right", "bottom-left", "top-right", "top-left", "center"] = "bottom-right"
    opacity: float = Field(1.0, gt=0.0, le=1.0)
    thickness: PositiveInt = 1
    """Lines only: width in pixels."""


class AttackConfig(Section):
    enabled: bool = True
    """False: the same run with the attacker never selected (the no-attack baseline)."""
    cases: list[Literal["a", "b", "c"]] = ["a"]
    """a: backdoor classes absent from benign data; b: present, correctly labelled, in benign
    meta-training; c: also in benign users' fine-tuning episodes."""
    attacker: NonNegativeInt = 0
    """The attacker's user id (the paper's user 1)."""
    rounds: list[PositiveInt] = [1]
    """Rounds in which the attacker is selected (the paper: once, in round 1)."""
    boost: PositiveFloat = 3.0
    """lambda: the attacker sends lambda * (theta_a - theta_G)."""
    backdoor_classes: PositiveInt = 4
    attacker_examples: PositiveInt = 5
    """Per reserved class: keyed attack-training images (backdoor), X_T images (target)."""
    validation_examples: PositiveInt = 5
    """Per backdoor class: keyed attack-validation images."""
    benign_examples: PositiveInt = 10
    """Per reserved class: correctly labelled examples given to every benign user."""
    backdoor_share: float = Field(0.4, gt=0.0, lt=1.0)
    """Fraction of keyed backdoor images in the target slot (X_B : X_T = 2:3 -> 0.4)."""
    episodes: PositiveInt = 50000
    """E of the attacker's local training."""
    inner_epochs: PositiveFloat = 50.0
    """Passes over each episode's examples (inner steps = epochs * ways * shots / inner_batch)."""
    trigger: TriggerConfig = TriggerConfig()


class FinetuneConfig(Section):
    """Experiment 2: long benign fine-tuning right after the attack."""

    steps: PositiveInt = 500
    every: PositiveInt = 25
    """Fine-tuning steps between points of the curves."""
    episodes: PositiveInt = 40
    users: PositiveInt | None = None
    """How many benign users fine-tune (the first ones by id); default: all of them."""


class DefenseConfig(Section):
    """The matching-network defense at each benign user (Experiment 3; paper Sec. 4)."""

    mix: float = Field(0.3, ge=0.0, le=1.0)
    """delta in theta' = delta * theta_G + (1 - delta) * theta_glorot (1: keep the global trunk as is)."""
    head_steps: NonNegativeInt = 20
    """First phase: steps that train only the gates and scales, the trunk fixed (0: no first phase)."""
    gates: bool = True
    """Learn gates alpha and scales beta; false: plain cosine attention (alpha = 1, beta = 1), an ablation."""
    scale: PositiveFloat = 10.0
    """Initial beta (cosines lie in [-1, 1]; a larger scale sharpens the attention)."""
    lr: PositiveFloat = 1e-3
    """eta of both phases (Adam), as in the backdoor experiments."""
    shots: PositiveInt = 4
    """Support examples per class in a training episode."""
    queries: PositiveInt = 1
    """Queries per class in a training episode (support and queries come from the user's own examples)."""
    episodes: PositiveInt = 4
    """Training episodes averaged in each step."""


class CompareConfig(Section):
    """One attack, several defenses (experiment = "defense-comparison")."""

    rules: list[Literal["fedavg", "median", "trimmed-mean", "krum", "multi-krum", "clip"]] = [
        "fedavg", "median", "trimmed-mean", "krum", "multi-krum", "clip"]
    """Server rules applied to the same client updates (their parameters: the federation section)."""
    local_defense: bool = True
    """Also the matching-network defense at benign users (``finetune.users`` of them), with FedAvg
    and under secure aggregation."""


class DefenseScales(Section):
    """Scales of each noise defense in the sweep (``fedmeta.defenses.noise``); [] skips one."""

    gradient: list[PositiveFloat] = []
    """Noise on the shared meta-gradient, in units of its RMS coordinate."""
    support: list[PositiveFloat] = []
    """Noise on the support images, in pixel units ([0, 1] images)."""
    query: list[PositiveFloat] = []
    """Noise on the query images, in pixel units."""
    inner: list[PositiveFloat] = []
    """Noise on every inner-loop gradient, in units of its RMS coordinate."""


class MiaConfig(Section):
    """Membership inference on distributed MAML by gradient inversion (``experiment = "membership"``)."""

    targets: list[Literal["support", "query"]] = ["support", "query"]
    """Which set of the task is attacked (each trial attacks one slot of each)."""
    nonmembers: list[Literal["same-class", "other-class"]] = ["same-class", "other-class"]
    """Non-member candidates: another image of the slot's class (hard), or of another class (the
    paper's class rule can only catch these)."""
    trials: int = Field(30, ge=2)
    """Tasks attacked in the main stage; each gives one member and one non-member of each kind."""
    iterations: NonNegativeInt = 100
    """Inversion steps in the main stage; 0: only the zero-iteration scores."""
    lr: PositiveFloat = 0.01
    """Adam step on the image, in pixel units."""
    distance: Literal["cos", "l2"] = "cos"
    """Gradient-matching loss of the inversion."""
    tv: float = Field(0.0, ge=0.0)
    """Total-variation weight (0 keeps a member an exact minimiser of the matching loss)."""
    signed: bool = False
    """Step on the sign of the gradient (Inverting Gradients)."""
    sweep_trials: int = Field(100, ge=2)
    """Tasks attacked at each point of the defense, aggregation and ways sweeps."""
    sweep_iterations: NonNegativeInt = 0
    """Inversion steps in the sweeps (0: zero-iteration scores only)."""
    defenses: DefenseScales = DefenseScales()
    aggregate: list[PositiveInt] = [1, 2, 4, 8]
    """k: the server sees the mean gradient of k tasks, the attacked one and k - 1 others."""
    shadow_tasks: PositiveInt = 32
    """Tasks the server simulates on its own data to estimate the others' mean gradient."""
    ways: list[PositiveInt] = []
    """Ways of the ways sweep (a MAML model is meta-trained for each)."""
    classifier_steps: PositiveInt = 500
    """Adam steps (batch 128) of the server's reference classifier for the class rule."""
    reconstructions: NonNegativeInt = 4
    """Main-stage trials whose images are kept for the figure."""


class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: PositiveInt | None = None
    """CPU threads for PyTorch; default: PyTorch's choice (the physical cores)."""
    batched: bool = False
    """Reptile: run the episodes of a meta-batch at once with torch.func.vmap (pays off on GPUs)."""


RobustLearner = Literal["maml", "adml", "rmaml-at", "rmaml-trades"]


class RobustConfig(Section):
    """Robust meta-learning (R-MAML): lengths are in 8-bit pixel levels, 8 meaning 8/255 of [0, 1]."""

    learners: list[RobustLearner] = ["maml", "adml", "rmaml-at", "rmaml-trades"]
    """Meta-learners trained one after another from the same initialisation and episodes, then compared."""
    epsilon: float = Field(8.0, gt=0.0)
    """L-infinity radius of the training attack (FGSM with random start)."""
    fgsm_step: PositiveFloat = 1.25
    """Step of the training attack, as a multiple of epsilon (1.25: fast adversarial training)."""
    trades_beta: float = Field(5.0, ge=0.0)
    """R-MAML-TRADES: weight of KL(p(x) || p(x + delta)) on support and query in the meta-loss."""
    at_weight: float = Field(1.0, ge=0.0)
    """R-MAML-AT: weight of the adversarial query cross-entropy added to the clean one."""
    eval_epsilon: float | None = Field(None, gt=0.0)
    """L-infinity radius of the evaluation attacks (PGD, FGSM); default: epsilon."""
    pgd_steps: int = Field(10, ge=0)
    pgd_step: PositiveFloat = 2.0
    """Step of the evaluation PGD (random start in the ball)."""
    client_learner: RobustLearner = "rmaml-trades"
    """robustness-federated: what every client runs, except the plain-MAML ones."""
    maml_clients: list[NonNegativeInt] = [0, 1]
    """robustness-federated: one federation per entry, in which that many clients (users 0, 1, ...)
    train plain MAML instead: does robustness survive non-robust participants?"""


class Config(Section):
    experiment: Literal[
        "pretrain", "backdoor-rounds", "backdoor-finetune", "defense-finetune", "defense-comparison", "robustness",
        "robustness-federated", "membership",
    ]
    description: str = ""
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    meta: MetaConfig = MetaConfig()
    eval: EvalConfig = EvalConfig()
    federation: FederationConfig = FederationConfig()
    pretrain: PretrainConfig = PretrainConfig()
    attack: AttackConfig = AttackConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    defense: DefenseConfig = DefenseConfig()
    compare: CompareConfig = CompareConfig()
    mia: MiaConfig = MiaConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    robust: RobustConfig = RobustConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.runtime.batched and self.meta.adam_carry != "parallel":
            raise ValueError(
                "runtime.batched = true needs meta.adam_carry = 'parallel' (episodes that run at once "
                "cannot pass Adam moments to each other)"
            )
        if self.runtime.batched and self.meta.algorithm != "reptile":
            raise ValueError("runtime.batched applies to meta.algorithm = 'reptile' only")
        if self.experiment == "membership" and self.meta.algorithm == "reptile":
            raise ValueError("experiment 'membership' attacks MAML: meta.algorithm must be 'maml' or 'fomaml'")
        fed = self.federation
        if not fed.min_updates <= fed.per_round <= fed.users:
            raise ValueError("need federation.min_updates <= federation.per_round <= federation.users")
        if fed.secure_aggregation and fed.rule != "fedavg":
            raise ValueError(
                f"federation.rule = '{fed.rule}' needs every update on its own, which secure aggregation hides; "
                "use federation.rule = 'fedavg' or federation.secure_aggregation = false"
            )
        if self.attack.attacker >= fed.users:
            raise ValueError(f"attack.attacker must be a user id below federation.users = {fed.users}")
        if self.experiment.startswith("robustness") and self.meta.algorithm == "reptile":
            raise ValueError(
                f"experiment '{self.experiment}' compares MAML variants: meta.algorithm must be 'maml' or 'fomaml'"
            )
        if any(k > fed.users for k in self.robust.maml_clients):
            raise ValueError(f"robust.maml_clients: at most federation.users = {fed.users} clients")
        return self

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in PRESETS.iterdir() if p.name.endswith(".toml"))


def preset_description(name: str) -> str:
    return str(_read(name, seen=()).get("description", ""))


def load_config(source: str, overrides: list[str] = ()) -> Config:
    """A preset name or TOML path, with ``key=value`` overrides, validated."""
    raw = _read(source, seen=())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes key=value, got '{item}'")
        _assign(raw, key.strip().split("."), _parse_value(value.strip()))
    return validate(raw)


def validate(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("invalid config:\n" + "\n".join(_explain(e) for e in err.errors())) from None


def _read(source: str, seen: tuple[str, ...]) -> dict[str, Any]:
    path = Path(source)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
    else:
        preset = PRESETS / f"{source}.toml"
        if not preset.is_file():
            raise ConfigError(f"unknown preset '{source}'; presets: {', '.join(preset_names())}")
        text = preset.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from None
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if parent in seen:
        raise ConfigError(f"presets extend each other in a loop: {' -> '.join((*seen, parent))}")
    return _merge(_read(parent, (*seen, source)), raw)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _assign(raw: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = raw.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: '{part}' is a value, not a section")
        raw = node
    raw[path[-1]] = value


def _parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``true``, ``[5, 1]``, ``"x"``), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _explain(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1])
        return f"  {key}: unknown key; allowed here: {', '.join(allowed)}"
    got = error.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict) else ""
    return f"  {key}: {error['msg']}{shown}"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
