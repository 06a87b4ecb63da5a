"""Figures from run folders, in the layout of the paper's figures.

- ``pretrain``: meta-test accuracy against meta-training iterations.
- ``backdoor-rounds`` (Figs 3-4): one panel per case, accuracy against federated rounds.
- ``backdoor-finetune`` (Figs 5-6) and ``defense-finetune`` (Figs 7-8): one row per case, one
  column per benign user, accuracy against fine-tuning steps.
- ``defense-comparison``: grouped bars, one group per defense.

Line colours follow the paper: meta-test black, main task purple, attack training blue, attack
validation green.
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

LINES = {
    "meta_test_accuracy": ("meta-testing", "black"),
    "main_task_accuracy": ("main task", "tab:purple"),
    "attack_train_accuracy": ("attack training", "tab:blue"),
    "attack_val_accuracy": ("attack validation", "tab:green"),
}


def load_run(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    config = tomllib.loads((folder / "config.toml").read_text())
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return config, [json.loads(line) for line in lines if line.strip()]


def plot_runs(folders: Sequence[Path], out: Path) -> Path:
    """Draw the figure for one run, or side-by-side panels for runs of one experiment family."""
    runs = [load_run(f) for f in folders]
    experiments = {config["experiment"] for config, _ in runs}
    if len(experiments) != 1:
        raise ValueError(f"runs of different experiments cannot share a figure: {sorted(experiments)}")
    experiment = experiments.pop()
    records = [r for _, rs in runs for r in rs]
    title = "\n".join(textwrap.shorten(config.get("description", ""), 110) for config, _ in runs)
    if experiment == "pretrain":
        fig = _pretrain(records)
    elif experiment == "backdoor-rounds":
        fig = _grid(records, rows=["all"], cols=_cases(records), axis="round")
    elif experiment in ("backdoor-finetune", "defense-finetune"):
        users = sorted({r["user"] for r in records if "user" in r})
        fig = _grid(records, rows=_cases(records), cols=users, axis="step")
    elif experiment == "defense-comparison":
        fig = _comparison(records)
    else:
        raise ValueError(f"no figure for experiment '{experiment}'")
    fig.suptitle(title, fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


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
                xs = [r[axis] for r in points if name in r]
                ax.plot(xs, [r[name] for r in points if name in r], color=color, label=legend, lw=1.4)
            ax.set_title(label, fontsize=9)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if i == len(rows) - 1:
                ax.set_xlabel("round" if axis == "round" else "fine-tuning step")
            if j == 0:
                ax.set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


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
