"""Report figures in the style of ``fedmeta.plots``: curves with shaded 95% bands over seeds, and
the table's means with their intervals as error bars. One colour per setting. A curve over
fine-tuning steps draws step 0, the unadapted model, as a point of its own: a line from it to the
first fine-tuned point would look like a measured curve."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from matplotlib.ticker import MaxNLocator

from fedmeta.plots import ATTACK_ROUNDS, FINE_TUNING, ROUND_LABEL, STEP_LABEL, plt, save_figure
from fedmeta.reports.collect import AXES, CAPPED, POINTS, Cell, Table, capped_text, series


def curve_figure(curves: Table, names: dict[str, dict[str, Any]], experiment: str, out: Path,
                 title: str) -> Path | None:
    """Rows: metrics; columns: curves (case, user, ...); a line and band per setting; ``title``
    above (the experiment and its dataset)."""
    from fedmeta.reports import group_order, label_text, position_text

    keys = [k for k in curves if k[0] == experiment]
    if not keys:
        return None
    metrics = list(dict.fromkeys(k[3] for k in keys))
    columns = list(dict.fromkeys(series(k[2]) for k in keys))
    fig, axes = plt.subplots(len(metrics), len(columns), figsize=(3.6 * len(columns), 2.7 * len(metrics)),
                             squeeze=False, sharex=True, sharey=True)
    for colour, group in enumerate(group_order(names)):
        for i, metric in enumerate(metrics):
            for j, column in enumerate(columns):
                points = sorted((_axis(k[2]), curves[k]) for k in keys
                                if k[1] == group and k[3] == metric and series(k[2]) == column)
                if points:
                    _band(axes[i][j], points, f"C{colour}", label_text(names[group]), experiment in FINE_TUNING)
    for i, metric in enumerate(metrics):
        axes[i][0].set_ylabel(metric.replace("_", " "), fontsize=8)
        for j, column in enumerate(columns):
            axes[i][j].grid(alpha=0.3)
            if metric.endswith("accuracy"):  # a band over few seeds may pass 0 or 1; an accuracy cannot
                axes[i][j].set_ylim(0, 1.02)
            if i == 0:
                axes[i][j].set_title(position_text(column) or experiment, fontsize=9)
    axis = next((a for a in AXES if any(a in dict(k[2]) for k in keys)), "step")
    xlabel = (ROUND_LABEL if axis == "round" and experiment in ATTACK_ROUNDS else
              STEP_LABEL if experiment in FINE_TUNING else axis)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=min(len(labels), 4), loc="upper center", bbox_to_anchor=(0.5, 0.0))
    return _save(fig, out, title)


def _axis(position: tuple) -> float:
    where = dict(position)
    return next(where[a] for a in AXES if a in where)


def _band(ax: Any, points: list, colour: str, label: str, unadapted_start: bool) -> None:
    """The mean over seeds and its 95% band; with ``unadapted_start``, a point at x = 0 is drawn
    apart, as a marker with its interval. A single seed has no interval over seeds: its band is the
    run's own interval over its episodes (as ``fedmeta plot`` draws a run), and the legend says so."""
    cis = [c.interval() for _, c in points]
    seeds = min(ci.n for ci in cis)
    halves = [ci.half for ci in cis]
    over = f"{seeds} seeds" if seeds > 1 else "1 seed"
    if all(len(c.values) == 1 and c.within for _, c in points):
        halves, over = [next(iter(c.within.values())) for _, c in points], "1 seed, band over its episodes"
    if unadapted_start and points[0][0] == 0:
        ax.errorbar(0, cis[0].mean, yerr=halves[0], color=colour, marker="o", ms=3, capsize=2)
        points, cis, halves = points[1:], cis[1:], halves[1:]
    xs, means = [x for x, _ in points], [ci.mean for ci in cis]
    ax.plot(xs, means, color=colour, lw=1.4, label=f"{label} ({over})")
    if all(h is not None for h in halves):
        ax.fill_between(xs, [m - h for m, h in zip(means, halves)], [m + h for m, h in zip(means, halves)],
                        color=colour, alpha=0.2, lw=0)


def table_figure(table: Table, names: dict[str, dict[str, Any]], experiment: str, out: Path,
                 title: str) -> Path | None:
    """One panel per metric: each table position on the x axis, a point and error bar per setting
    (not for a ``CAPPED`` count, which has no interval: the tables and the heatmap give it per seed);
    ``title`` above (the experiment and its dataset)."""
    from fedmeta.reports import group_order, label_text, position_text

    keys = [k for k in table if k[0] == experiment and k[3] not in CAPPED]
    if not keys:
        return None
    metrics = list(dict.fromkeys(k[3] for k in keys))
    positions = list(dict.fromkeys(k[2] for k in keys))
    groups = group_order(names)
    width = max(3.5, 0.9 * len(positions) + 2)
    across = min(len(metrics), max(1, int(TABLE_FIGURE_WIDTH // width)))  # panels wrap into rows
    down = -(-len(metrics) // across)
    fig, grid = plt.subplots(down, across, figsize=(width * across, 3.4 * down), squeeze=False)
    axes = grid.flatten()
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes, metrics, strict=False):
        for colour, group in enumerate(groups):
            shift = (colour - (len(groups) - 1) / 2) * 0.8 / max(1, len(groups))
            for x, position in enumerate(positions):
                if (cell := table.get((experiment, group, position, metric))) is not None:
                    ci = cell.interval()
                    ax.errorbar(x + shift, ci.mean, yerr=ci.half or 0.0, fmt="o", color=f"C{colour}", capsize=3,
                                label=label_text(names[group]) if x == 0 else None)
        ax.set_xticks(range(len(positions)), [position_text(p) for p in positions], fontsize=7, rotation=30, ha="right")
        ax.set_title(metric.replace("_", " "), fontsize=9)
        ax.grid(alpha=0.3)
        if metric.endswith("accuracy"):  # an interval over few seeds may pass 0 or 1; an accuracy cannot
            low, high = ax.get_ylim()
            ax.set_ylim(max(low, -0.02), min(high, 1.02))
    axes[across - 1].legend(fontsize=7)
    return _save(fig, out, title)


TABLE_FIGURE_WIDTH = 32.0
"""Inches a row of ``table_figure``'s panels may take before they wrap (eight metrics of a
comparison in one row made a figure 97 inches wide)."""

HEATMAP_METRICS = ("attack_val_accuracy", "attack_val_lift", "meta_test_accuracy", "rounds_survived")
"""``attack_val_lift``: each row's attack-val above its own reference, seed by seed (``collect.with_lifts``)."""


def heatmap_figure(table: Table, names: dict[str, dict[str, Any]], experiment: str, out: Path,
                   title: str) -> Path | None:
    """A threat matrix: one row per setting (attack), one column per ``defense``, a panel per metric
    of ``HEATMAP_METRICS`` the lines have; each cell its mean over seeds (± half-width of the 95%
    interval; a ``CAPPED`` count: coloured by its mean, a lower bound, and labelled seed by seed),
    blank where a row has no such metric (a local defense has no rounds survived). A defense the
    server can run under secure aggregation is marked "(SA)". ``title`` above, as ``table_figure``."""
    from fedmeta.reports import defense_text, group_order, short_label

    keys = [k for k in table if k[0] == experiment and "defense" in dict(k[2]) and k[3] in HEATMAP_METRICS]
    if not keys:
        return None
    defenses = list(dict.fromkeys(dict(k[2])["defense"] for k in keys))
    groups = [g for g in group_order(names) if any(k[1] == g for k in keys)]
    metrics = [m for m in HEATMAP_METRICS if any(k[3] == m for k in keys)]
    rows = [short_label(names[g]) for g in groups]
    columns = [textwrap.fill(defense_text(d), 16) for d in defenses]
    width = 0.85 * len(defenses) + 0.07 * max(map(len, rows)) + 1
    fig, axes = plt.subplots(len(metrics), 1, figsize=(width, (0.5 * len(groups) + 2.2) * len(metrics)), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        found = {(k[1], dict(k[2])["defense"]): k for k in keys if k[3] == metric}
        cells = {gd: table[k].interval() for gd, k in found.items()}
        percent, lift = metric.endswith(POINTS), metric.endswith("_lift")
        scale = 100 if percent else 1
        top = (100 if percent and not lift else  # a lift: coloured up to the largest (below 0: white)
               max(1.0, max(scale * ci.mean for ci in cells.values())))
        grid = [[scale * cells[(g, d)].mean if (g, d) in cells else float("nan") for d in defenses] for g in groups]
        cmap = "Reds" if metric.startswith("attack") else "Greens" if percent else "Purples"
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=top, aspect="auto")
        digits = 0 if percent and not lift else 1
        for (g, d), ci in cells.items():
            half = "" if ci.half is None else f"\n±{scale * ci.half:.{digits}f}"
            text = capped_text(metric, table[found[g, d]], "\n")  # a capped count: seed by seed
            ax.text(defenses.index(d), groups.index(g), text or f"{scale * ci.mean:.{digits}f}{half}", ha="center",
                    va="center", fontsize=7, color="white" if scale * ci.mean > 0.6 * top else "black")
        ax.set_xticks(range(len(defenses)), columns, fontsize=7, rotation=40, ha="right")
        ax.set_yticks(range(len(groups)), rows, fontsize=7)
        what = (" (points above the row's reference on the same episodes: a server rule's, the pre-trained model;"
                " a local defense's, itself on the round nobody attacked), mean over seeds ± 95% interval" if lift else
                " (%), mean over seeds ± 95% interval" if percent else
                " (benign rounds after the attack) per seed, ≥: outlived every round followed; colour: the mean"
                if metric in CAPPED else ", mean over seeds ± 95% interval")
        ax.set_title(f"{metric.replace('_', ' ')}{what}; (SA): runs under secure aggregation", fontsize=8)
    return _save(fig, out, title)


TRADEOFF_METRICS = ("attack_auc", "tpr_at_1pct_fpr")
TRADEOFF_ACROSS = 6
"""Panels in a row of ``tradeoff_figure`` before a metric's attacks wrap into another row."""
UNDEFENDED = "none"


def tradeoff_figure(table: Table, datasets: dict[str, str | None], experiment: str, out: Path,
                    title: str) -> Path | None:
    """Privacy against utility (membership inference): for each attack (threat, target, score...),
    each ``TRADEOFF_METRICS`` metric against meta-test accuracy, one curve per defense and dataset
    through its noise scales, starting at the undefended point; every point the mean over seeds
    with its 95% interval on both axes. A panel per metric (rows) and attack (columns).

    A curve may join the settings (groups) of one dataset (``datasets``: each group's), as kept
    results are usually split: the undefended run beside one sweep per noise scale. Where two
    settings give the same point, the one with more seeds, then more trials, is drawn."""
    from fedmeta.plots import DEFENSE_COLORS
    from fedmeta.reports import position_text

    points = _tradeoff_points_of(table, datasets, experiment)
    defended = [k for k in points if k[3] != UNDEFENDED]
    if not defended:
        return None
    seeds = max(len(cell.values) for curve in points.values() for _, cell, _ in curve.values())
    metrics = [m for m in TRADEOFF_METRICS if any(k[0] == m for k in defended)]
    attacks = list(dict.fromkeys(k[1] for k in defended))
    shared = tuple(pair for pair in attacks[0] if all(pair in a for a in attacks))
    across = min(len(attacks), TRADEOFF_ACROSS)
    down = -(-len(attacks) // across)
    fig, grid = plt.subplots(down * len(metrics), across, figsize=(3.6 * across, 3.0 * down * len(metrics)),
                             squeeze=False)
    for ax in grid.flat:
        ax.set_visible(False)
    datasets_drawn = list(dict.fromkeys(k[2] for k in defended))
    styles = dict(zip(datasets_drawn, ("-", "--", ":", "-."), strict=False))
    markers = dict(zip(datasets_drawn, ("s", "D", "^", "v"), strict=False))
    colours = {d: DEFENSE_COLORS.get(d, f"C{i}") for i, d in enumerate(dict.fromkeys(k[3] for k in defended))}
    for metric_row, metric in enumerate(metrics):
        for j, attack in enumerate(attacks):
            ax = grid[metric_row * down + j // across][j % across]
            ax.set_visible(True)
            for (m, a, dataset, defense), curve in points.items():
                if (m, a) != (metric, attack):
                    continue
                start = points.get((metric, attack, dataset, UNDEFENDED), {})
                if defense == UNDEFENDED:  # drawn once, in black; each defense's curve starts from it
                    _tradeoff_points(ax, curve, "black", metric, f"undefended, {dataset}" if len(styles) > 1
                                     else "undefended", marker=markers.get(dataset, "s"), seeds=seeds)
                else:
                    _tradeoff_points(ax, curve, colours[defense], metric, None, seeds=seeds)
                    xy = [_tradeoff_xy(*cells, metric) for _, cells in sorted({**start, **curve}.items())]
                    ax.plot(*zip(*xy, strict=True), color=colours[defense], ls=styles[dataset], lw=1.2,
                            label=f"{defense}, {dataset}" if len(styles) > 1 else defense)
            _tradeoff_axes(ax, metric, position_text(tuple(p for p in attack if p not in shared))
                           or position_text(attack))
    legend = {label: handle for ax in grid.flat for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(legend.values(), legend.keys(), fontsize=7, ncol=min(len(legend), 5), loc="upper center",
               bbox_to_anchor=(0.5, 0.0))  # one legend, below the panels: in a panel it covered points
    shared_text = position_text(shared)
    return _save(fig, out, f"{title}: attack against utility per defense" + (f" ({shared_text})" * bool(shared_text)))


def _tradeoff_axes(ax: Any, metric: str, title: str) -> None:
    ax.set_title(textwrap.fill(title, 48), fontsize=8)
    ax.set_xlabel("meta-test accuracy (%)", fontsize=8)
    ax.set_ylabel(metric.replace("_", " ") + ("" if metric.endswith("_auc") else " (%)"), fontsize=8)
    if metric.endswith("_auc"):
        ax.axhline(0.5, color="gray", lw=0.8)
    else:  # a rate's t-interval over few seeds may pass 0; the rate cannot
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


TradeoffPoint = tuple[Cell, Cell, tuple[int, int]]
"""A point's meta-test accuracy cell, attack metric cell and rank (seeds, trials)."""


def _tradeoff_points_of(table: Table, datasets: dict[str, str | None],
                        experiment: str) -> dict[tuple, dict[float, TradeoffPoint]]:
    """(metric, attack, dataset, defense) -> noise scale -> point, across settings (see
    ``tradeoff_figure``): where two give one point, the one with more seeds, then more trials."""
    points: dict[tuple, dict[float, TradeoffPoint]] = {}
    for (exp, group, position, metric), cell in table.items():
        where = dict(position)
        accuracy = table.get((exp, group, position, "meta_test_accuracy"))
        if exp != experiment or metric not in TRADEOFF_METRICS or "scale" not in where or accuracy is None:
            continue
        attack = tuple(pair for pair in position if pair[0] not in ("stage", "defense", "scale"))
        curve = points.setdefault((metric, attack, datasets.get(group), where["defense"]), {})
        rank = (len(cell.values), max(cell.episodes, default=0))
        if where["scale"] not in curve or rank > curve[where["scale"]][2]:
            curve[where["scale"]] = (accuracy, cell, rank)
    return points


def _tradeoff_xy(accuracy: Cell, cell: Cell, _rank: Any, metric: str) -> tuple[float, float]:
    """A point's means: meta-test accuracy and the attack metric (a rate in %, an AUC as it is)."""
    return 100 * accuracy.interval().mean, (1 if metric.endswith("_auc") else 100) * cell.interval().mean


def _tradeoff_points(ax: Any, curve: dict[float, TradeoffPoint], colour: str, metric: str, label: str | None,
                     marker: str = "o", seeds: int = 0) -> None:
    """Each point with its intervals on both axes, annotated with its noise scale, and with its
    count of seeds where it has fewer than ``seeds`` (a seed whose point was not scored)."""
    scale = 1 if metric.endswith("_auc") else 100
    for noise, (accuracy, cell, _) in sorted(curve.items()):
        x = accuracy.interval()
        y = cell.interval()
        ax.errorbar(100 * x.mean, scale * y.mean, xerr=100 * (x.half or 0.0), yerr=scale * (y.half or 0.0),
                    fmt=marker, ms=3, color=colour, capsize=2, lw=0.8, label=label)
        label = None
        fewer = f" ({y.n} seed{'s' * (y.n > 1)})" if y.n < seeds else ""
        if noise or fewer:
            ax.annotate(f"{noise:g}{fewer}", (100 * x.mean, scale * y.mean), fontsize=6, color=colour, xytext=(3, 3),
                        textcoords="offset points")


def _save(fig: Any, out: Path, title: str | None = None) -> Path:
    fig.tight_layout()
    if title:
        title = textwrap.fill(title, 70)
        fig.suptitle(title, fontsize=9, y=1.0 + 0.3 * (title.count("\n") + 1) / fig.get_figheight())
    return save_figure(fig, out)
