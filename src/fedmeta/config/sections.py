"""The sections of a config: one typed model per table of the TOML file.

A key means the same in every experiment that has it. Names of pluggable parts (datasets,
meta-learners, aggregation rules, attack strategies, trigger patterns, local defenses) are checked
against their registries (``fedmeta.registry``), so a part added by a plugin is accepted and a
typo is refused with the registered names. Their settings live in tables named after the part
(``[rules.trimmed-mean]``, ``[attacks.boosted]``), typed by the options model the part registers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from fedmeta.registry import ATTACKS, DATASETS, LEARNERS, LOCAL_DEFENSES, RULES, TRIGGERS, Registry

ALLOW = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what it accepts."""


MAGNITUDE = 2.0**32
"""No number in a config is larger than this: counts beyond it are not runs, and a value like
1e38 would overflow float32 arithmetic (seeds up to 2^32 still fit)."""

Rate = Annotated[float, Field(gt=0.0, le=10.0)]
"""A learning rate or step size: positive, at most 10 (beyond that every step overflows)."""


class Section(BaseModel):
    model_config = ALLOW

    @field_validator("*")
    @classmethod
    def _sane_magnitude(cls, value: Any) -> Any:
        """Refuse absurd numbers anywhere (inf and NaN are refused by ``allow_inf_nan=False``)."""
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int | float) and not isinstance(item, bool) and abs(item) > MAGNITUDE:
                raise ValueError(f"{item:g} is beyond any sensible setting (at most {MAGNITUDE:.0f} in magnitude)")
        return value


def registered(registry: Registry, name: str) -> str:
    """``name`` if ``registry`` has it (the check behind every name-valued key)."""
    if name not in registry:
        raise ValueError(registry.unknown(name))  # without the key, which pydantic names
    return name


def options_of(registry: Registry, name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options ``given`` for part ``name``, validated by its options model, defaults filled in."""
    model = registry.get(name).options
    if model is None:
        if given:
            raise ValueError(f"{name}: takes no options (got {', '.join(given)})")
        return {}
    try:
        return model.model_validate(given).model_dump(mode="json")
    except ValidationError as err:
        problems = "; ".join(f"{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(problems) from None


def validate_options(registry: Registry, table: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {registered(registry, name): options_of(registry, name, opts or {}) for name, opts in table.items()}


class DataConfig(Section):
    dataset: str = "omniglot"
    """A registered dataset: omniglot, miniimagenet, mnist, fashionmnist (``fedmeta presets`` lists them)."""
    root: str | None = None
    """Folder with the datasets; default: $FEDMETA_DATA, else ../shared/data."""
    omniglot_split: Literal["seeded-1200", "torchmeta"] = "seeded-1200"
    """Omniglot characters: a seeded 1200/423 shuffle, or Vinyals' 1028/172/423 (torchmeta)."""
    rotations: bool = True
    """Omniglot: 90/180/270-degree rotations of meta-training characters as extra classes."""
    reserved_classes: list[str] = []
    """Backdoor experiments: the reserved classes by name, the backdoor classes then the target
    (``attack.backdoor_classes`` + 1 names). A named class leaves the meta-training or meta-test
    classes that held it. The paper's mini-ImageNet pair (its Fig. 2): ``["n04612504",
    "n02120079"]``, yawl then arctic fox, both meta-training classes; Omniglot names are
    ``"Alphabet/characterNN"``. Empty: drawn per seed (Omniglot: among the characters outside
    meta-training; mini-ImageNet: among the 16 validation classes)."""

    check_dataset = field_validator("dataset")(lambda v: registered(DATASETS, v))

    @field_validator("reserved_classes")
    @classmethod
    def _distinct_classes(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"each class once (got {names})")
        return names


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
    algorithm: str = "reptile"
    """A registered meta-learner: reptile, maml, fomaml (robust MAML variants: ``robust.learners``)."""
    ways: PositiveInt = 5
    shots: PositiveInt = 10
    """Training shots per class (Reptile's episodes; MAML's support sets)."""
    queries: PositiveInt = 15
    """MAML only: query examples per class in a training task."""
    inner_steps: PositiveInt = 10
    inner_batch: PositiveInt = 10
    """Reptile only: mini-batch size of the inner Adam steps (MAML adapts on the full support)."""
    inner_lr: Rate = 1e-3
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    """Reptile only: beta2 of the inner and fine-tuning Adam (MAML's outer Adam keeps 0.999)."""
    adam_carry: Literal["sequential", "parallel"] = "sequential"
    """Reptile: how the inner Adam moments pass between the episodes of a meta-batch."""
    meta_batch: PositiveInt = 5
    meta_lr: Rate = 0.1
    """The outer step size: Reptile's interpolation epsilon, MAML's outer Adam learning rate."""
    meta_lr_final: float | None = Field(None, ge=0.0, le=10.0)
    """If set, the outer step size anneals linearly to this value over the iterations
    (centralised, membership) or the rounds (robustness-federated); the backdoor experiments
    anneal their pre-training with ``pretrain.meta_lr_final`` instead."""
    iterations: PositiveInt = 1000
    """Outer steps of centralised meta-training."""

    @field_validator("algorithm")
    @classmethod
    def _algorithm(cls, name: str) -> str:
        plain = [n for n in LEARNERS.names() if not LEARNERS.get(n).info.get("robust")]
        if name not in LEARNERS:
            raise ValueError(f"unknown meta-learner '{name}'; registered: {', '.join(plain)}")
        if LEARNERS.get(name).info.get("robust"):
            raise ValueError(f"'{name}' is a robust MAML variant: name it in robust.learners, with meta.algorithm = 'maml'")
        return name

    @model_validator(mode="after")
    def _beta2(self) -> MetaConfig:
        if self.algorithm != "reptile" and self.adam_beta2 != 0.999:
            raise ValueError(f"meta.adam_beta2 applies to Reptile only (MAML's outer Adam uses 0.999); "
                             f"meta.algorithm is '{self.algorithm}'")
        return self


class EvalConfig(Section):
    ways: PositiveInt = 5
    shots: list[PositiveInt] = [5]
    """Meta-test shots; the first is the headline number, the others are reported beside it."""
    queries: PositiveInt = 1
    """Held-out examples per class in a meta-test episode."""
    steps: PositiveInt = 50
    batch: PositiveInt = 10
    """Mini-batch of the fine-tuning steps (Reptile; MAML fine-tunes on the full support)."""
    lr: Rate | None = None
    """Fine-tuning learning rate; default: meta.inner_lr."""
    transductive: bool = False
    """True: all queries in one batch; False: each query alone with the support set."""
    episodes: PositiveInt = 1000
    """Episodes of the final evaluation (and of every point of a federated experiment)."""
    every: PositiveInt = 500
    """Meta-iterations of centralised training between evaluation points (a federation counts
    rounds: ``federation.eval_every``)."""
    episodes_during: PositiveInt = 100
    """Episodes of each intermediate evaluation."""
    workers: PositiveInt | Literal["auto"] = "auto"
    """CPU processes (1 thread each) that fine-tune evaluation episodes side by side; same
    predictions as 1. "auto": one per ``runtime.threads`` (default: per core) when the evaluation
    has at least 4000 fine-tuning steps; always 1 on a GPU (fedmeta.meta.evaluation). Used by the
    pre-training and backdoor evaluations; the robustness experiments and the comparison's clean
    meta-test run their episodes in the process itself."""

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
    """alpha_i: equal, or by the size of each user's data; the weights of the updates applied in a
    round sum to one. Equal is 1/M_min when M_min updates pass (1/M_r under secure aggregation,
    which applies every update that arrives); when fewer arrive (a straggler on
    Flower) or pass screening (a non-finite one), it is 1 over those that did, so a round
    averages what it has instead of shrinking towards the old model."""
    rule: str = "fedavg"
    """A registered aggregation rule (its settings: the table ``[rules.<name>]``)."""
    secure_aggregation: bool = False
    """The server only learns the sum of the updates (as under SecAgg+): rules that need each
    update on its own are refused, and every update that arrives is applied (M_min only decides
    whether a round may go on without a straggler, on Flower)."""
    episodes: PositiveInt = 1000
    """E: episodes each selected user meta-trains per round (E / meta.meta_batch outer steps)."""
    rounds: NonNegativeInt = 50
    """Rounds after the last attack round (all rounds of a federation nobody attacks): Experiment
    1, the core run and robustness-federated. Experiments 2 and 3 start their local defense right
    after the attack, and the comparison follows ``compare.after_rounds``: they do not read it."""
    eval_every: PositiveInt = 1
    """Rounds between evaluation points of the global model (Experiment 1, robustness-federated)."""
    holdout: PositiveInt = 5
    """Examples held out of every meta-training class, as queries of main-task episodes."""
    dirichlet_alpha: PositiveFloat | None = None
    """Backdoor experiments: None deals the class groups out uniformly at random (the paper's IID
    split); a value alpha shares each alphabet's characters among the users by Dirichlet(alpha)
    proportions (Hsu et al. 2019; ``fedmeta.data.noniid``): smaller is more skewed, 0.5 is common."""
    reply_timeout: float = Field(3600.0, gt=0.0, le=7 * 24 * 3600.0)
    """Seconds a round on remote nodes (Flower) waits for its users' updates; then it goes on with
    the updates that arrived if there are at least min_updates of them (the others are recorded
    as ``missing``), and fails otherwise. In-process rounds never wait."""

    check_rule = field_validator("rule")(lambda v: registered(RULES, v))


class PretrainConfig(Section):
    """Benign federated meta-training before the attack; cached and shared between experiments."""

    rounds: NonNegativeInt = 20
    episodes: PositiveInt = 1000
    """E per user per pre-training round."""
    inner_steps: PositiveInt | None = None
    """Overrides meta.inner_steps during pre-training."""
    meta_lr: Rate | None = None
    """Overrides meta.meta_lr during pre-training."""
    meta_lr_final: float | None = Field(None, ge=0.0, le=10.0)
    """Anneals the outer step size over all pre-training rounds."""


class TriggerConfig(Section):
    pattern: str = "patch"
    """A registered trigger pattern: patch, checker, line, blend, dba (DBA's four separated lines)."""
    size: PositiveInt = 4
    """Side of the patch or checkerboard, length of the line (of each of dba's lines), in pixels."""
    position: Literal["bottom-right", "bottom-left", "top-right", "top-left", "center"] = "bottom-right"
    opacity: float = Field(1.0, gt=0.0, le=1.0)
    thickness: PositiveInt = 1
    """Lines (line, dba) only: width in pixels."""
    gap: PositiveInt = 3
    """dba only: pixels between its lines, across and down. DBA's reference layouts: 3 with lines of
    6 on CIFAR (the default), 2 with lines of 4 on MNIST (``size = 4``, ``gap = 2``)."""
    seed: NonNegativeInt | None = None
    """A random whole-image pattern (blend) only: the seed it is drawn from. None: the run's
    ``seed``, so that each seed has a key of its own; a number keys every seed of a sweep alike
    (and tells the key's share of a seed's result from the model's and the data's)."""

    check_pattern = field_validator("pattern")(lambda v: registered(TRIGGERS, v))

    @model_validator(mode="after")
    def _seed_read(self) -> TriggerConfig:
        if self.seed is not None and not TRIGGERS.get(self.pattern).info.get("whole_image"):
            raise ValueError(f"seed: pattern '{self.pattern}' is not drawn at random (only a whole-image pattern "
                             "such as blend is); leave it at None")
        return self


class AttackerConfig(Section):
    """One malicious user: who, when, and how (a registered attack strategy)."""

    user: NonNegativeInt = 0
    rounds: list[PositiveInt] = [1]
    """Main-phase rounds in which this user is selected (the paper: once, in round 1)."""
    strategy: str = "boosted"
    """A registered attack strategy (its settings: the table ``[attacks.<name>]``)."""

    @field_validator("rounds")
    @classmethod
    def _some_round(cls, rounds: list[int]) -> list[int]:
        if not rounds:
            raise ValueError("an attacker needs at least one round to attack in; to run without the attack, "
                             "set attack.enabled = false")
        return rounds

    check_strategy = field_validator("strategy")(lambda v: registered(ATTACKS, v))


class AttackConfig(Section):
    """The backdoor task (reserved classes, trigger) and the malicious users who pursue it."""

    enabled: bool = True
    """False: the same run with the attackers never selected (the no-attack baseline): the same
    rounds are played, the attack rounds with benign users only."""
    cases: list[Literal["a", "b", "c"]] = ["a"]
    """a: backdoor classes absent from benign data; b: present, correctly labelled, in benign
    meta-training; c: also in benign users' fine-tuning episodes."""
    attackers: list[AttackerConfig] = Field(default_factory=lambda: [AttackerConfig()], min_length=1)
    """The malicious users; all of them hold the attacker's share of the reserved classes (they
    collude on one backdoor). The first is the paper's user 1."""
    backdoor_classes: PositiveInt = 4
    attacker_examples: PositiveInt = 5
    """Per reserved class: keyed attack-training images (backdoor), X_T images (target)."""
    validation_examples: PositiveInt = 5
    """Per backdoor class: keyed attack-validation images."""
    benign_examples: PositiveInt = 10
    """Per reserved class: correctly labelled examples given to every benign user."""
    backdoor_share: float = Field(0.4, gt=0.0, lt=1.0)
    """Fraction of keyed backdoor images in the target slot (X_B : X_T = 2:3 -> 0.4)."""
    target_way: Literal["random", "last"] = "random"
    """The target slot's way in the attacker's episodes: a random one, or the last (the paper's
    "the N-th model output", Sec. 2). Evaluation episodes put the target at a random way either way."""
    case_c_backdoor_ways: PositiveInt | Literal["all"] = 1
    """Case c: backdoor classes in each fine-tuning and evaluation episode beside the target. The
    paper leaves it open; 1 (one drawn per episode) is our reading, "all" puts as many distinct
    backdoor classes as the ways leave (ways - 1 at most)."""
    trigger: TriggerConfig = TriggerConfig()

    @property
    def users(self) -> tuple[int, ...]:
        return tuple(a.user for a in self.attackers)

    @property
    def last_round(self) -> int:
        """The last attack round: the last round any attacker is selected in, or with the attack
        off would have been (the baseline plays the same rounds)."""
        return max(r for a in self.attackers for r in a.rounds)

    @field_validator("attackers")
    @classmethod
    def _distinct(cls, attackers: list[AttackerConfig]) -> list[AttackerConfig]:
        users = [a.user for a in attackers]
        if len(set(users)) != len(users):
            raise ValueError(f"each malicious user once (got users {users})")
        return attackers


class FinetuneConfig(Section):
    """Experiment 2, and every local defense: per-user training right after the attack."""

    steps: PositiveInt = 500
    every: PositiveInt = 25
    """Steps between points of the curves."""
    episodes: PositiveInt = 40
    """Evaluation episodes of each point, per user: in Experiments 2 and 3 and the comparison's
    local rows they replace ``eval.episodes`` (and ``finetune.steps`` replaces ``eval.steps``)."""
    users: PositiveInt | None = None
    """How many benign users run it (the first ones by id); default: all of them."""
    clean_twin: bool = False
    """Experiments 2 and 3: also follow each user's defense from the clean twin (the same attack
    round(s) with the malicious users sitting out), on the same episodes and random streams, and
    log ``clean_meta_test_accuracy``, ``clean_attack_val_accuracy`` and ``attack_val_lift`` (attack-val
    minus the twin's). Where the defense's own training sends keyed images to the target
    (mini-ImageNet, docs/results.md), the lift is the backdoor's share; twice the cost. A run
    without the attack is its own twin (none is run); the comparison's local rows always have one
    (its clean-local scores), so the comparison and the core refuse this key."""


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
    lr: Rate = 1e-3
    """eta of both phases (Adam), as in the backdoor experiments."""
    shots: PositiveInt = 4
    """Support examples per class in a training episode."""
    queries: PositiveInt = 1
    """Queries per class in a training episode (support and queries come from the user's own examples)."""
    episodes: PositiveInt = 4
    """Training episodes averaged in each step."""
    always_target: bool = True
    """Every training episode holds the target class (and, in case c, backdoor classes), as the
    evaluation episodes do: our reading, which the paper leaves open ("episodically on the user's
    own examples"). false: each episode's classes drawn at random from the user's own."""


class CompareConfig(Section):
    """One attack, several defenses (experiment = "defense-comparison")."""

    rules: list[str] = ["fedavg", "median", "trimmed-mean", "krum", "multi-krum", "clip"]
    """Server rules applied to the same client updates (their settings: ``[rules.<name>]``)."""
    local_defenses: list[str] = ["matching"]
    """Local defenses run at benign users (``finetune.users`` of them) on FedAvg's model, in the
    clear and under secure aggregation; [] for none."""
    secure_rows: bool = True
    """Each local defense also under secure aggregation (the server applies only the mean update):
    with equal weights, FedAvg's model up to float round-off (which the defense's training then
    amplifies: 8.3 against 17.3% attack-val on one seed of omniglot-compare-quick, within 2 points
    on the other two). False leaves those rows out (a threat matrix, where each local row costs
    minutes, marks the local rows as running under secure aggregation instead)."""

    after_rounds: NonNegativeInt = 0
    """Benign rounds that follow each server row whose backdoor is present right after the attack
    (attack-val above the before-the-attack level, ``comparison.present``), under the row's rule, to count the
    rounds it survives (``rounds_survived``, evaluated after each); 0: none. Each costs a round
    and an evaluation of the backdoor half; rows that removed the backdoor cost nothing more."""

    check_rules = field_validator("rules")(lambda v: _once([registered(RULES, n) for n in v]))
    check_local = field_validator("local_defenses")(lambda v: _once([registered(LOCAL_DEFENSES, n) for n in v]))


def _once(names: list[str]) -> list[str]:
    """``names``, refused if one repeats (two rows of one defense would share one server's state)."""
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"lists {', '.join(twice)} twice; each defense is one row")
    return names


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


class LiraConfig(Section):
    """The calibrated likelihood-ratio attack (``fedmeta.attacks.mia_scores``)."""

    shadows: int = Field(16, ge=2)
    """Shadow tasks per candidate, each observed with the candidate (IN) and without (OUT)."""
    statistic: Literal["loss", "grad-norm", "alignment"] = "loss"
    """The threshold score whose IN and OUT distributions are fitted (``loss``: logit-scaled confidence)."""
    online: bool = True
    """Fit IN and OUT (online LiRA); false: OUT only, scored by its z-score (offline LiRA, half the cost or less)."""


class JointConfig(Section):
    """The realistic server's joint inversion of the task (``fedmeta.attacks.task_inversion``)."""

    iterations: PositiveInt = 300
    """Adam steps on the task's unknown images, per candidate and per reference."""
    lr: Rate = 0.05
    """Adam step on the images, in pixel units (decayed x0.1 at 3/8, 5/8 and 7/8 of the steps)."""
    fill: Literal["public", "matched"] = "matched"
    """Where the inversion starts: ``public``, a random public task with the candidate's class in
    the slot's way; ``matched``, that task's other ways' classes and then its images chosen among
    public data by the matching loss (``task_inversion.matched_fill``; about 10 s per task)."""
    pool: PositiveInt = 32
    """``matched``: public images tried per unknown image (and classes tried per way at most)."""
    trials: int = Field(100, ge=2)
    """It attacks the first ``trials`` tasks of each realistic point (about 40 s per task and target
    on one CPU thread for MNIST 5-way 1-shot, matched fill and 300 steps; the other scores keep
    every trial)."""


class DpConfig(Section):
    """DP-SGD on the shared meta-gradient (``fedmeta.defenses.dp``); one model per noise multiplier."""

    noise_multipliers: list[PositiveFloat] = []
    """sigma: Gaussian noise std in units of ``clip``; [] runs no DP point."""
    clip: PositiveFloat = 1.0
    """C: L2 bound of each clipped term."""
    unit: Literal["example", "task"] = "example"
    """What is clipped: each query example's term (DP-SGD), or the whole task's gradient (user level)."""
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    """delta of the reported (epsilon, delta)."""
    releases: PositiveInt = 1
    """How many times a term is released (rounds the same data takes part in) for epsilon."""


Threat = Literal["informed", "realistic", "secagg"]


class MiaConfig(Section):
    """Membership inference on distributed MAML (``experiment = "membership"``)."""

    threats: list[Threat] = ["informed", "realistic", "secagg"]
    """Servers attacked without a defense: ``informed`` (knows the whole task but the slot: an upper
    bound), ``realistic`` (knows the candidate and public data), ``secagg`` (realistic, and sees only
    the mean of ``users_per_round`` users' updates); empty: the sweeps only."""
    users_per_round: list[Annotated[int, Field(ge=2)]] = [2, 4, 8]
    """M: users whose updates a ``secagg`` server sees summed (one point each)."""
    invert_threats: list[Threat] = ["informed"]
    """Servers whose points run the inversion's iterations (the others get its zero-iteration scores)."""
    sweep_threats: list[Threat] = ["realistic"]
    """Servers attacked in the defense and ways sweeps (``secagg`` with the first ``users_per_round``)."""
    attacks: list[Literal["inversion", "threshold", "lira", "joint"]] = Field(["inversion", "threshold", "lira"],
                                                                            min_length=1)
    """``inversion``: the paper's gradient matching from the candidate (scores l0-cos, l0-l2, lt,
    distance, class); ``threshold``: loss, grad-norm, alignment; ``lira``: likelihood ratio, with
    per-candidate and with pooled variances (lira, lira-global; not run for the informed server,
    which needs no calibration); ``joint``: the realistic server reconstructs the rest of the task
    around the candidate (joint, joint-cal; realistic points only, see ``joint``)."""
    targets: list[Literal["support", "query"]] = ["support", "query"]
    """Which set of the task is attacked (each trial attacks one slot of each)."""
    nonmembers: list[Literal["same-class", "other-class"]] = ["same-class", "other-class"]
    """Non-member candidates: another image of the slot's class (hard), or of another class (the
    paper's class rule can only catch these)."""
    trials: int = Field(30, ge=2)
    """Tasks attacked at each point of the threat stage; each gives one member and one non-member of each kind."""
    iterations: NonNegativeInt = 100
    """Inversion steps in the threat stage; 0: only the zero-iteration scores."""
    lr: Rate = 0.01
    """Adam step on the image, in pixel units."""
    distance: Literal["cos", "l2"] = "cos"
    """Gradient-matching loss of the inversion."""
    tv: float = Field(0.0, ge=0.0)
    """Total-variation weight (0 keeps a member an exact minimiser of the matching loss)."""
    signed: bool = False
    """Step on the sign of the gradient (Inverting Gradients)."""
    sweep_trials: int = Field(100, ge=2)
    """Tasks attacked at each point of the defense and ways sweeps."""
    sweep_iterations: NonNegativeInt = 0
    """Inversion steps in the sweeps (0: zero-iteration scores only)."""
    sweep_undefended: bool = True
    """Attack the undefended model at the head of the defense sweep; false where another run already
    attacked it on the same tasks (the tasks, the model and its observations depend on the seed, not
    on the point, so the threat stage of a run with the same seed did: only the server's public
    draws differ)."""
    defenses: DefenseScales = DefenseScales()
    dp: DpConfig = DpConfig()
    lira: LiraConfig = LiraConfig()
    joint: JointConfig = JointConfig()
    shadow_tasks: PositiveInt = 32
    """Tasks the server simulates on public data to estimate the other users' mean gradient (inversion under secagg)."""
    ways: list[PositiveInt] = []
    """Ways of the ways sweep (a MAML model is meta-trained for each)."""
    classifier_steps: PositiveInt = 500
    """Adam steps (batch 128) of the server's reference classifier for the class rule."""
    reconstructions: NonNegativeInt = 4
    """Threat-stage trials whose images are kept for the figure (informed server)."""
    bootstrap: PositiveInt = 1000
    """Bootstrap resamples of the trials behind every 95% interval."""

    @field_validator("users_per_round")
    @classmethod
    def _secagg_needs_users(cls, value: list[int], info) -> list[int]:  # info: pydantic's ValidationInfo
        if not value and "secagg" in info.data.get("threats", []):
            raise ValueError("mia.threats has 'secagg': give at least one number of users per round")
        return value

    @model_validator(mode="after")
    def _something_to_attack(self) -> MiaConfig:
        defended = any(self.defenses.model_dump().values()) or self.dp.noise_multipliers
        sweeps = self.sweep_threats and (self.ways or defended)
        if not self.threats and not sweeps:
            raise ValueError("mia.threats is empty and the sweeps attack nothing: give mia.threats, or "
                             "mia.sweep_threats with defenses (mia.defenses, mia.dp.noise_multipliers) or mia.ways")
        return self

    @model_validator(mode="after")
    def _joint_needs_realistic(self) -> MiaConfig:
        if "joint" in self.attacks and "realistic" not in self.threats + self.sweep_threats:
            raise ValueError("mia.attacks has 'joint', which attacks realistic points only: add 'realistic' to "
                             "mia.threats or mia.sweep_threats")
        return self


class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: PositiveInt | None = None
    """CPU threads for PyTorch; default: PyTorch's choice (the physical cores)."""
    batched: bool = False
    """Reptile: run the episodes of a meta-batch at once with torch.func.vmap (pays off on GPUs)."""


class RobustConfig(Section):
    """Robust meta-learning (R-MAML): lengths are in 8-bit pixel levels, 8 meaning 8/255 of [0, 1]."""

    learners: list[str] = ["maml", "adml", "rmaml-at", "rmaml-trades"]
    """Meta-learners trained one after another from the same initialisation and episodes, then compared."""
    epsilon: float = Field(8.0, gt=0.0)
    """L-infinity radius of the training attack (FGSM with random start)."""
    fgsm_step: PositiveFloat = 1.25
    """Step of the training attack, as a multiple of epsilon (1.25: fast adversarial training)."""
    trades_beta: float = Field(5.0, ge=0.0)
    """R-MAML-TRADES: weight of KL(p(x) || p(x + delta)) on support and query in the meta-loss."""
    at_weight: float = Field(1.0, ge=0.0)
    """R-MAML-AT: weight of the adversarial query cross-entropy added to the clean one."""
    unlabeled_per_class: NonNegativeInt = 0
    """R-MAML-TRADES: unlabeled images per class of a task added to the TRADES KL (0: off), drawn
    beside and apart from its support and query examples, as MetaAdv's unlabeled-data augmentation."""
    contrastive_weight: float = Field(0.0, ge=0.0)
    """R-MAML-AT and -TRADES: weight of the auxiliary contrastive task (0: off), NT-Xent between an
    augmented view and the adversarial example of each image in the robust term (docs/robustness.md)."""
    contrastive_temperature: float = Field(0.5, ge=0.01, le=10.0)
    """Temperature of the contrastive task's NT-Xent (SimCLR's 0.5; below 0.01 its logits overflow float32)."""
    eval_epsilon: float | None = Field(None, gt=0.0)
    """L-infinity radius of the evaluation attacks (PGD, FGSM); default: epsilon."""
    pgd_steps: int = Field(10, ge=0)
    pgd_step: PositiveFloat = 2.0
    """Step of the evaluation PGD (random start in the ball)."""
    strong_steps: PositiveInt = 50
    """Steps of the stronger attack of the final evaluation (same radius and step as PGD)."""
    strong_restarts: NonNegativeInt = 5
    """Random starts of the stronger attack: a query is robust only against all of them (0: not run).
    It runs on the final evaluation only, so robust accuracy is not an artifact of a weak PGD-10."""
    client_learner: str = "rmaml-trades"
    """robustness-federated: what every client runs, except the plain-MAML ones."""
    maml_clients: list[NonNegativeInt] = [0, 1]
    """robustness-federated: one federation per entry, in which that many clients (users 0, 1, ...)
    train plain MAML instead: does robustness survive non-robust participants?"""

    check_learners = field_validator("learners")(lambda v: [_maml_variant(n) for n in v])
    check_client = field_validator("client_learner")(lambda v: _maml_variant(v))


def _maml_variant(name: str) -> str:
    registered(LEARNERS, name)
    if name != "maml" and not LEARNERS.get(name).info.get("robust"):
        raise ValueError(f"'{name}' is not a MAML variant; robust learners: maml, "
                         + ", ".join(n for n in LEARNERS.names() if LEARNERS.get(n).info.get("robust")))
    return name
