"""Figures from run folders, in the layout of the paper's figures.

- ``pretrain``: meta-test accuracy against meta-training iterations.
- ``backdoor-rounds`` (Figs 3-4): one panel per case, accuracy against federated rounds.
- ``backdoor-finetune`` (Figs 5-6) and ``defense-finetune`` (Figs 7-8): one row per case, one
  column per benign user, accuracy against fine-tuning steps.
- ``defense-comparison``: grouped bars, one group per defense.
- ``backdoor-core`` (the README's first command): Experiment 1's rounds beside grouped bars for
  the model right after the attack and under each local defense (Experiments 2 and 3).
- ``robustness`` and ``robustness-federated`` (paper 002): standard and robust accuracy against
  meta-iterations (or rounds), one line per learner (or per number of plain-MAML clients); the
  final evaluation as a star with its 95% interval.
- ``membership`` (paper 001, Figs. 4-5 and the defense curves): reconstructions of members and
  non-members beside their priors; attack AUC against meta-test accuracy for each noise defense;
  attack accuracy against the number of ways; AUC against the number of aggregated tasks; for a
  run without sweeps, each threat-stage score's AUC with its bootstrap interval.

Line colours follow the paper: meta-test black, main task purple, attack training blue, attack
validation green. Titles name the experiment and the dataset; shaded bands are the 95% intervals
over evaluation episodes that the metrics lines log; legends sit below the panels; a fine-tuning
curve's step 0 (the model before any adaptation) is a lone point, not joined to step 50 or 100.
Curves over seeds (bands over seeds) are ``fedmeta report``'s.
"""

from __future__ import annotations

import json
import textwrap
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

LINES = {
    "meta_test_accuracy": ("meta-testing", "black"),
    "main_task_accuracy": ("main task", "tab:purple"),
    "attack_train_accuracy": ("attack training", "tab:blue"),
    "attack_val_accuracy": ("attack validation", "tab:green"),
}
TWIN_LINE = ("clean_attack_val_accuracy", "attack validation, clean twin", "tab:green")
"""Drawn dashed where a run logs it (``finetune.clean_twin``): the level attack-val is read against."""


def load_run(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    config = tomllib.loads((folder / "config.toml").read_text())
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return config, [json.loads(line) for line in lines if line.strip()]


TITLES = {
    "pretrain": "Benign meta-training",
    "backdoor-rounds": "Experiment 1: benign rounds after a one-shot backdoor attack",
    "backdoor-finetune": "Experiment 2: fine-tuning at each benign user after the attack",
    "defense-finetune": "Experiment 3: the matching-network defense at each benign user",
    "defense-comparison": "One attack, every defense",
    "backdoor-core": "The backdoor paper's core: attack, benign rounds, local defenses",
    "robustness": "Robust meta-learning (R-MAML): clean and robust accuracy",
    "robustness-federated": "Federated R-MAML with plain-MAML clients",
    "membership": "Membership inference on distributed MAML",
}
DATASETS = {"omniglot": "Omniglot", "miniimagenet": "mini-ImageNet", "mnist": "MNIST", "fashionmnist": "Fashion-MNIST"}


def title_of(experiment: str, configs: Sequence[dict[str, Any]]) -> str:
    """The experiment and its dataset (never a preset's description, which may be long or stale)."""
    return experiment_title(experiment, [c.get("data", {}).get("dataset") for c in configs],
                            [int(c.get("seed", 0)) for c in configs])


def experiment_title(experiment: str, datasets: Sequence[str | None], seeds: Sequence[int]) -> str:
    """"<experiment>, <datasets> (seed(s) ...)": the title of a figure of runs of one experiment."""
    names = ", ".join(dict.fromkeys(DATASETS.get(d, d) for d in datasets if d))
    seeds = sorted(set(seeds))
    return (TITLES.get(experiment, experiment) + (f", {names}" if names else "")
            + (f" (seed {seeds[0]})" if len(seeds) == 1 else f" (seeds {', '.join(map(str, seeds))})"))


def plot_runs(folders: Sequence[Path], out: Path) -> Path:
    """Draw the figure for one run, or side-by-side panels for runs of one experiment family."""
    runs = [load_run(f) for f in folders]
    experiments = {config["experiment"] for config, _ in runs}
    if len(experiments) != 1:
        raise ValueError(f"runs of different experiments cannot share a figure: {sorted(experiments)}")
    experiment = experiments.pop()
    records = [r for _, rs in runs for r in rs]
    title = title_of(experiment, [config for config, _ in runs])
    if experiment == "pretrain":
        fig = _pretrain(records)
    elif experiment == "backdoor-rounds":
        fig = _grid(records, rows=["all"], cols=_cases(records), axis="round")
    elif experiment == "membership":
        fig = _membership(records, folders[0] / "reconstructions.safetensors")
    elif experiment in ("backdoor-finetune", "defense-finetune"):
        users = sorted({r["user"] for r in records if "user" in r})
        fig = _grid(records, rows=_cases(records), cols=users, axis="step")
    elif experiment == "defense-comparison":
        fig = _comparison(records)
    elif experiment == "backdoor-core":
        fig = _core(records, attack_round=max(r for a in runs[0][0]["attack"]["attackers"] for r in a["rounds"]))
    elif experiment in ("robustness", "robustness-federated"):
        fig = _robustness(records, *(("learner", "step") if experiment == "robustness" else ("case", "round")))
    else:
        raise ValueError(f"no figure for experiment '{experiment}'")
    title = textwrap.fill(title, 70)
    fig.suptitle(title, fontsize=9, y=1.0 + 0.05 * (title.count("\n") + 1))  # above the panel titles
    return save_figure(fig, out)


SOFTWARE = "fedmeta"
"""The PNG ``Software`` text of every figure fedmeta draws: what tells its own images from others'."""


def save_figure(fig: plt.Figure, out: Path) -> Path:
    """``fig`` as the PNG ``out``, marked as fedmeta's. An existing file is replaced only if
    fedmeta drew it (or it is a run folder's own ``figure.png``): ``--out thesis.png`` must not
    overwrite someone's image. Refusals are ``ValueError`` naming the path."""
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: fedmeta draws PNG figures; give a name ending in .png")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give an image file such as {out / 'figure.png'}")
    run_figure = out.name == "figure.png" and (out.parent / "config.toml").is_file()
    if out.exists() and not run_figure and not drawn_by_fedmeta(out):
        raise ValueError(f"{out} exists and fedmeta did not draw it; delete it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight", metadata={"Software": SOFTWARE})
    plt.close(fig)
    return out


def drawn_by_fedmeta(path: Path) -> bool:
    """Whether ``path`` is a PNG whose ``Software`` text is fedmeta's (``save_figure``)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get("Software") == SOFTWARE
    except (OSError, ValueError):
        return False


def _cases(records: list[dict[str, Any]]) -> list[str]:
    return sorted({r["case"] for r in records})


def _pretrain(records: list[dict[str, Any]]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k, shots in enumerate(sorted({r["shots"] for r in records}, reverse=True)):
        color = f"C{k}"
        points = [r for r in records if r["shots"] == shots and not r.get("final")]
        what = f"{records[0]['ways']}-way {shots}-shot ({records[0]['mode']})"
        if points:
            ax.plot([r["step"] for r in points], [r["meta_test_accuracy"] for r in points], marker="o", color=color,
                    label=f"{what}, {points[0]['episodes']} episodes")
        for r in (r for r in records if r["shots"] == shots and r.get("final")):
            ax.errorbar(r["step"], r["meta_test_accuracy"], yerr=r["meta_test_accuracy_ci95"], marker="*", ms=10,
                        color=color, capsize=3, label=f"{what}, final, {r['episodes']} episodes: "
                        f"{100 * r['meta_test_accuracy']:.2f}%")
    ax.set(xlabel="meta-training iteration", ylabel="meta-test accuracy", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _grid(records: list[dict[str, Any]], rows: list[Any], cols: list[Any], axis: str) -> plt.Figure:
    """Panels of the four accuracies; rows are cases (or one row), columns users (or cases)."""
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.4 * len(cols), 2.6 * len(rows)), squeeze=False,
                             sharex=True, sharey=True)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            if axis == "round":
                points, label = [r for r in records if r["case"] == col], f"case ({col})"
            else:
                points, label = [r for r in records if r["case"] == row and r.get("user") == col], f"case ({row}), user {col}"
            for name, (legend, color) in LINES.items():
                _curve(ax, [r for r in points if name in r], axis, name, legend, color)
            if twin := [r for r in points if TWIN_LINE[0] in r]:
                _curve(ax, twin, axis, *TWIN_LINE, ls="--")
            ax.set_title(label, fontsize=9)
            ax.set_ylim(0, 1.02)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
            ax.grid(alpha=0.3)
            if i == len(rows) - 1:
                ax.set_xlabel(ROUND_LABEL if axis == "round" else STEP_LABEL)
            if j == 0:
                ax.set_ylabel("accuracy")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, names, fontsize=7, ncol=len(names), loc="upper center", bbox_to_anchor=(0.5, 0.0))
    return fig


ROUND_LABEL = "round (0: before the attack; 1: the attack round,\nwhich the paper numbers 2: ours r is its r + 1)"
STEP_LABEL = "fine-tuning step (step 0: before any)"
ATTACK_ROUNDS = ("backdoor-rounds", "backdoor-core", "defense-comparison")
"""Experiments whose rounds are numbered from the attack (``ROUND_LABEL``)."""
FINE_TUNING = ("backdoor-finetune", "defense-finetune")
"""Experiments whose curves run over fine-tuning steps: step 0 is the unadapted model, drawn apart."""


def _curve(ax: plt.Axes, points: list[dict[str, Any]], axis: str, name: str, legend: str, color: str,
           ls: str = "-") -> None:
    """One accuracy against ``axis`` with its 95% band where the lines log one. A fine-tuning
    curve's step 0 (before any adaptation) is a lone marker: a line would draw the unadapted model
    and the first fine-tuned point as one continuous curve."""
    start = [r for r in points if axis == "step" and r[axis] == 0]
    rest = [r for r in points if r not in start]
    xs, ys = [r[axis] for r in rest], [r[name] for r in rest]
    ax.plot(xs, ys, color=color, label=legend, lw=1.4, ls=ls)
    if rest and all(f"{name}_ci95" in r for r in rest):
        half = [r[f"{name}_ci95"] for r in rest]
        ax.fill_between(xs, [y - h for y, h in zip(ys, half, strict=True)], [y + h for y, h in zip(ys, half, strict=True)],
                        color=color, alpha=0.15, lw=0)
    for r in start:
        ax.errorbar(r[axis], r[name], yerr=r.get(f"{name}_ci95"), color=color, marker="o", ms=3, capsize=2)


def _comparison(records: list[dict[str, Any]]) -> plt.Figure:
    bars = {"clean_meta_test_accuracy": ("meta-testing, no attack", "grey"), **LINES}
    fig, ax = plt.subplots(figsize=(1.4 * len(records) + 2, 3.6))
    width = 0.8 / len(bars)
    for k, (name, (label, colour)) in enumerate(bars.items()):
        xs = [i + (k - (len(bars) - 1) / 2) * width for i in range(len(records))]
        ax.bar(xs, [100 * r[name] for r in records], width, label=label, color=colour)
    ax.set_xticks(range(len(records)), [textwrap.fill(r["defense"], 14) for r in records], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=len(bars), loc="upper center", bbox_to_anchor=(0.5, -0.22))
    return fig


def _core(records: list[dict[str, Any]], attack_round: int) -> plt.Figure:
    """Left, Experiment 1's curves over rounds; right, the model right after the attack and under
    each local defense (mean over its users), one group of bars each."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    rounds = [r for r in records if "round" in r]
    for name, (legend, color) in LINES.items():
        _curve(left, rounds, "round", name, legend, color)
    left.set(xlabel=ROUND_LABEL, ylabel="accuracy", ylim=(0, 1.02))
    left.set_title("benign rounds after the attack", fontsize=9)
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.grid(alpha=0.3)
    groups = {"no defense": [r for r in rounds if r["round"] == attack_round]}
    for r in records:
        if "defense" in r:
            groups.setdefault(f"{CORE_DEFENSES.get(r['defense'], r['defense'])}, {r['step']} steps", []).append(r)
    width = 0.8 / len(LINES)
    for k, (name, (_, color)) in enumerate(LINES.items()):
        xs = [i + (k - (len(LINES) - 1) / 2) * width for i in range(len(groups))]
        right.bar(xs, [sum(r[name] for r in g) / len(g) for g in groups.values()], width, color=color)
    right.set_xticks(range(len(groups)), [textwrap.fill(g, 16) for g in groups], fontsize=8)
    right.set_title(f"right after the attack (round {attack_round})", fontsize=9)
    right.grid(alpha=0.3, axis="y")
    handles, names = left.get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, names, fontsize=7, ncol=len(names), loc="upper center", bbox_to_anchor=(0.5, 0.0))
    return fig


CORE_DEFENSES = {"finetune": "fine-tuning (Exp 2)", "matching": "matching network (Exp 3)"}


def _robustness(records: list[dict[str, Any]], key: str, axis: str) -> plt.Figure:
    """Standard and robust accuracy during training, one colour per learner (or federation)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    attack = f"PGD-{records[0]['pgd_steps']} at {records[0]['epsilon_255']:g}/255"
    for ax, metric, name in zip(axes, ("standard_accuracy", "robust_accuracy"),
                                ("standard accuracy (clean queries)", f"robust accuracy ({attack})"), strict=True):
        for k, group in enumerate(dict.fromkeys(r[key] for r in records)):
            rows, color = [r for r in records if r[key] == group], f"C{k}"
            points, final = [r for r in rows if not r.get("final")], [r for r in rows if r.get("final")]
            label = f"{group}: {100 * final[-1][metric]:.1f}%" if final else str(group)
            ax.plot([r[axis] for r in points], [r[metric] for r in points], marker="o", ms=3, color=color, label=label)
            for r in final:
                ax.errorbar(r[axis], r[metric], yerr=r[f"{metric}_ci95"], marker="*", ms=10, color=color, capsize=3)
        ax.set(title=name, xlabel="meta-iteration" if axis == "step" else "round", ylim=(0, 1))
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    return fig


DEFENSE_COLORS = {"gradient": "tab:red", "support": "tab:blue", "query": "tab:green", "inner": "tab:orange",
                  "dp": "tab:purple"}
SCORE_STYLES = {"l0-l2": "-", "l0-cos": "--", "distance": ":", "class": "-.", "lt": (0, (1, 3))}
CANDIDATES = ("member", "same-class", "other-class")


def _membership(records: list[dict[str, Any]], images: Path) -> plt.Figure:
    """Top: reconstructions (if kept); bottom: defense curves per target, ways, aggregation."""
    fig = plt.figure(figsize=(15, 8.5 if images.is_file() else 3.6))
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.25, 1]) if images.is_file() else (None, fig)
    if top is not None:
        _reconstructions(top, images)
    records = [r for r in records if "not_scored" not in r]  # a point whose attack diverged: no scores
    nonmember = records[0]["nonmember"]  # the first kind in the config: same-class by default
    rows = [r for r in records if r["nonmember"] == nonmember]
    panels = [(_defense_curves, [r for r in rows if r["stage"] == "defense" and r["target"] == target], (target,))
              for target in ("support", "query")]
    panels += [(_sweep, [r for r in rows if r["stage"] == "ways"], ("ways", "attack_accuracy", "number of ways (N)")),
               (_sweep, [r for r in rows if r["stage"] == "aggregation"], ("k", "attack_auc", "tasks aggregated (k)"))]
    # only the stages the run has; a run without sweeps shows its threat-stage scores
    panels = [p for p in panels if p[1]] or [(_threat_scores, [r for r in rows if r["stage"] == "threat"], ())]
    axes = bottom.subplots(1, len(panels), squeeze=False)[0]
    for ax, (draw, points, args) in zip(axes, panels, strict=True):
        draw(ax, points, *args)
    axes[0].set_ylabel(f"attack AUC (non-members: {nonmember})")
    bottom.subplots_adjust(wspace=0.3, bottom=0.3)
    return fig


def _reconstructions(fig: plt.Figure, path: Path) -> None:
    """Per target: the true example, then each candidate's prior and the attack's output (Fig. 4)."""
    from safetensors.torch import load_file

    images = load_file(str(path))
    targets = [t for t in ("support", "query") if f"{t}.true" in images]
    kinds = [k for k in CANDIDATES if f"{targets[0]}.{k}.start" in images]
    columns = [("true", "true example")] + [(f"{k}.{e}", f"{k}\n{'prior x*' if e == 'start' else 'output'}")
                                            for k in kinds for e in ("start", "end")]
    trials = len(images[f"{targets[0]}.true"])
    for sub, target in zip(fig.subfigures(1, len(targets)), targets):
        axes = sub.subplots(trials, len(columns), squeeze=False)
        for j, (key, title) in enumerate(columns):
            for i in range(trials):
                ax = axes[i][j]
                ax.imshow(images[f"{target}.{key}"][i, 0], cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(title, fontsize=7)
        sub.suptitle(f"{target} attack: reconstructions from the target as prior", fontsize=9)


def _defense_curves(ax: plt.Axes, rows: list[dict[str, Any]], target: str) -> None:
    """Attack AUC against meta-test accuracy, one colour per defense (scales in the labels)."""
    reference = [r for r in rows if r["defense"] == "none"]
    for defense, color in DEFENSE_COLORS.items():
        for score, style in SCORE_STYLES.items():
            points = sorted((r for r in rows if r["defense"] == defense and r["score"] == score), key=lambda r: r["scale"])
            if not points:
                continue
            points = [r for r in reference if r["score"] == score] + points
            ax.plot([r["meta_test_accuracy"] for r in points], [r["attack_auc"] for r in points], color=color,
                    ls=style, marker="o", ms=3, lw=1.2, label=f"{defense}, {score}")
            for r in points[1:]:
                ax.annotate(f"{r['scale']:g}", (r["meta_test_accuracy"], r["attack_auc"]), fontsize=6, color=color,
                            xytext=(2, 2), textcoords="offset points")
    ax.axhline(0.5, color="gray", lw=0.8)
    ax.set(xlabel="meta-test accuracy", title=f"{target} attack under noise defenses", ylim=(0.4, 1.02))
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))


def _threat_scores(ax: plt.Axes, rows: list[dict[str, Any]]) -> None:
    """Each score's AUC with its 95% bootstrap interval, one point per server, target and score."""
    x = range(len(rows))
    auc = [r["attack_auc"] for r in rows]
    # a percentile bootstrap interval over few trials can leave out its own estimate: no bar on that side
    ax.errorbar(x, auc, yerr=[[max(0.0, a - r["attack_auc_low"]) for a, r in zip(auc, rows)],
                              [max(0.0, r["attack_auc_high"] - a) for a, r in zip(auc, rows)]], fmt="o", ms=3,
                capsize=2)
    servers = [r["threat"] + (f" M={r['users']}" if r["users"] > 1 else "") for r in rows]
    ax.set_xticks(list(x), [f"{server}, {r['target']}: {r['score']}" for server, r in zip(servers, rows)],
                  rotation=30, ha="right", fontsize=6)
    ax.axhline(0.5, color="gray", lw=0.8)
    ax.set(title="attacks without a defense (95% bootstrap intervals over the trials)", ylim=(0.3, 1.02))
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)


def _sweep(ax: plt.Axes, rows: list[dict[str, Any]], axis: str, metric: str, xlabel: str) -> None:
    """A metric against a sweep axis, one line per target (colour) and score (style)."""
    for target, color in (("support", "tab:blue"), ("query", "tab:green")):
        for score, style in SCORE_STYLES.items():
            points = sorted((r for r in rows if r["target"] == target and r["score"] == score), key=lambda r: r[axis])
            if points:
                ax.plot([r[axis] for r in points], [r[metric] for r in points], color=color, ls=style, marker="o",
                        ms=3, lw=1.2, label=f"{target}, {score}")
    ax.axhline(0.5, color="gray", lw=0.8)
    ax.set(xlabel=xlabel, ylabel=metric.replace("_", " "), ylim=(0.4, 1.02))
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=6)
