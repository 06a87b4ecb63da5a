"""fedmeta: attacks and defenses in federated meta-learning. Run experiments, list presets, draw figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from fedmeta.config import ConfigError, load_config, preset_description, preset_names
from fedmeta.data.files import DataError
from fedmeta.registry import ALL
from fedmeta.runs import RunDir, RunError
from fedmeta.runtime import Diverged
from fedmeta.storage import CorruptFile, Locked

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
def run(
    config: Annotated[str, typer.Argument(help="A preset name (see `fedmeta presets`) or a TOML file.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder; an unfinished one with the same config resumes.")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set meta.iterations=500.")
    ] = None,
    engine: Annotated[
        str, typer.Option("--engine", help="'local': all clients in this process; 'pool': a round's clients in "
                          "single-threaded worker processes (CPU); 'batched': a round's Reptile users as one vmapped "
                          "computation (GPU); 'flower': Flower's simulation engine (needs fedmeta[flower]).")
    ] = "local",
) -> None:
    """Run an experiment and write config.toml, metrics.jsonl and summary.json to OUT."""
    from fedmeta import experiments
    from fedmeta.federation.engine import IN_PROCESS

    try:
        cfg = load_config(config, overrides or [])
        if engine == "flower":
            experiments.check_engine(cfg, "flower")
            summary = _flower().simulate(cfg, out)
        elif engine == "local":
            summary = experiments.run(cfg, RunDir.open(out, cfg), IN_PROCESS)
        elif engine == "pool":
            from fedmeta.engines.pool import LocalPool

            experiments.check_engine(cfg, LocalPool.name)
            summary = experiments.run(cfg, RunDir.open(out, cfg), LocalPool())
        elif engine == "batched":
            from fedmeta.engines.batched import BatchedUsers

            experiments.check_engine(cfg, BatchedUsers.name)
            summary = experiments.run(cfg, RunDir.open(out, cfg), BatchedUsers())
        else:
            raise ConfigError(f"--engine takes 'local', 'pool', 'batched' or 'flower', got '{engine}'")
    except (ConfigError, DataError, RunError, Diverged, CorruptFile, Locked) as err:
        _fail(str(err))
    except OSError as err:  # a path fedmeta cannot read or write (--out, the cache, the data): one line, no traceback
        _fail(f"{err.strerror or err}: {err.filename}" if err.filename else str(err))
    typer.echo(summary_table(summary))
    typer.echo(f"results in {out}{_figure(out)}")
    if "table" in summary:
        typer.echo(summary["table"])


@app.command()
def presets() -> None:
    """List the presets with a one-line description each, then every registered part by kind."""
    names = preset_names()
    width = max(map(len, names))
    for name in names:
        typer.echo(f"{name:<{width}}  {preset_description(name)}")
    for kind, registry in ALL.items():
        typer.echo(f"\n{kind} ({registry.key}):")
        for part in registry.names():
            typer.echo(f"  {part:<14}  {registry.get(part).doc}")


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run folder(s); several runs of one experiment share a figure.")],
    out: Annotated[Path | None, typer.Option("--out", help="Image file; default: RUN/figure.png.")] = None,
) -> None:
    """Draw the figures of one or more runs (the layout of the paper's figures)."""
    from fedmeta.plots import plot_runs

    missing = [str(r) for r in runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        typer.secho(f"error: no metrics.jsonl in {', '.join(missing)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    try:
        typer.echo(f"wrote {plot_runs(runs, out or runs[0] / 'figure.png')}")
    except (ValueError, OSError) as err:  # ValueError: a refused --out, or a run's unreadable TOML or JSON
        _fail(str(err))


@app.command()
def sweep(
    config: Annotated[str, typer.Argument(help="A preset name or a TOML file (which may hold a [sweep] table).")],
    out: Annotated[Path, typer.Option("--out", help="Sweep folder: one run folder per cell; run again to resume.")],
    grid: Annotated[
        list[str] | None, typer.Option("--grid", help="key=v1,v2,... with --set value syntax, e.g. "
                                       "--grid meta.inner_lr=0.001,0.01 or --grid 'eval.shots=[5],[1]'.")
    ] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", help="Seeds per grid point: base seed, +1, ... (default 1).")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a base config key (every cell).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Run cells in N local worker processes.")] = None,
    ray: Annotated[str | None, typer.Option("--ray", help="Run cells on Ray: auto, local or HOST:PORT.")] = None,
    keep: Annotated[Path | None, typer.Option("--keep", help="After each cell finishes, copy what a report reads of "
                                              "the finished cells to this folder (as fedmeta keep does).")] = None,
) -> None:
    """Run every cell of grid x seeds (one run folder each); finished cells are skipped, others resume.

    ``--keep DEST`` copies the finished cells' small files to DEST as each one finishes, so a sweep
    longer than the machine's life (a spot instance, a lent machine) loses at most its running cells."""
    from fedmeta.reports import ReportError
    from fedmeta.reports.collect import check_keep_target, config_meaning
    from fedmeta.reports.collect import keep as keep_runs
    from fedmeta.sweeps import InProcess, LocalPool, RayCluster, plan, run_sweep

    try:
        if workers is not None and ray is not None:
            raise ConfigError("--workers and --ray exclude each other")
        cells = plan(config, overrides or [], grid or [], seeds)
        if keep is not None:
            check_keep_target(keep, "base.toml", config_meaning(cells.base.to_toml()), f"the sweep {out}")
        executor = RayCluster(ray) if ray else LocalPool(workers) if workers else InProcess()
        result = run_sweep(cells, out, executor, finished=None if keep is None else lambda _: keep_runs(out, keep))
        if keep is not None and result.skipped and not result.done:  # only cells finished before this
            keep_runs(out, keep)  # invocation: no callback copied them (each copy takes every finished cell)
    except (ConfigError, RunError, Locked, ReportError) as err:
        _fail(str(err))
    except OSError as err:
        _fail(f"{err.strerror or err}: {err.filename}" if err.filename else str(err))
    typer.echo(f"{len(cells.cells)} cells: {len(result.skipped)} already finished, {len(result.done)} finished now, "
               f"{len(result.failed)} failed; tables: fedmeta report {out}")
    if result.failed:
        for name, error in result.failed.items():
            typer.secho(f"failed: {name}: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command()
def report(
    folders: Annotated[list[Path] | None, typer.Argument(help="Run folders and sweep folders (their cells are read); with --docs, Markdown files.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Report folder; default: SWEEP/report, else ./report.")] = None,
    table: Annotated[bool, typer.Option("--table", help="Print one Markdown table (as in the docs) instead.")] = False,
    experiment: Annotated[str | None, typer.Option("--experiment", help="--table: one experiment of the folders.")] = None,
    metrics: Annotated[str | None, typer.Option("--metrics", help="--table: metric columns, m1,m2,...")] = None,
    where: Annotated[list[str] | None, typer.Option("--where", help="key=v1,v2 (a round, a case...): only those lines, "
                                                   "in the table or the report's files.")] = None,
    paired: Annotated[bool, typer.Option("--paired", help="--table: paired differences instead of means.")] = False,
    against: Annotated[str | None, typer.Option("--against", help="--table: paired differences of each line against "
                                                "the same setting's line at key=value (e.g. round=0).")] = None,
    mean_over: Annotated[str | None, typer.Option("--mean-over", help="--table: merge lines that differ only in this "
                                                  "key (e.g. user), each seed's mean over them.")] = None,
    baseline: Annotated[str | None, typer.Option("--baseline", help="--table --paired: the setting (key=value,...) "
                                                 "every other one is paired with; default: the first.")] = None,
    columns: Annotated[str | None, typer.Option("--columns", help="--table: one column per value of this position "
                                                "key (e.g. defense: a threat matrix).")] = None,
    docs: Annotated[bool, typer.Option("--docs", help="The arguments are Markdown files: regenerate their tables "
                                       "from their '<!-- fedmeta report ... -->' lines.")] = False,
    check: Annotated[bool, typer.Option("--check", help="--docs: only say which files would change (exit 1).")] = False,
) -> None:
    """Tables (Markdown, CSV) and figures: mean and 95% t-interval over seeds, paired differences."""
    from fedmeta.reports import ReportError, default_out, write_report
    from fedmeta.reports.docs import TableQuery, against_of, baseline_of, refresh_files, table_text, where_filters

    try:
        if not folders:
            raise ReportError("give run or sweep folders, or --docs and Markdown files")
        if docs:
            changed = refresh_files(folders, Path.cwd(), check)
            for path, differs in changed.items():
                typer.echo(f"{path}: {('differs' if check else 'regenerated') if differs else 'up to date'}")
            if check and any(changed.values()):
                raise typer.Exit(1)
            return
        if table:
            query = TableQuery(folders, experiment, metrics.split(",") if metrics else None, where_filters(where or []),
                               paired, against_of(against), mean_over, baseline_of(baseline), columns)
            typer.echo(table_text(query), nl=False)
            return
        written = write_report(folders, out or default_out(folders), where_filters(where or []))
    except (ReportError, OSError) as err:
        _fail(str(err))
    for path in written:
        typer.echo(f"wrote {path}")


@app.command()
def keep(
    source: Annotated[Path, typer.Argument(help="A run or sweep folder.")],
    dest: Annotated[Path, typer.Argument(help="Where to copy it, e.g. results/NAME (kept in git).")],
) -> None:
    """Copy what a report reads of finished runs (config, metrics, summary; no weights) to DEST."""
    from fedmeta.reports import ReportError
    from fedmeta.reports.collect import keep as keep_runs

    try:
        written = keep_runs(source, dest)
    except (ReportError, OSError) as err:
        _fail(str(err))
    typer.echo(f"kept {len(written)} files in {dest}")


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _flower():
    """The Flower app, or a clear error if the extra is missing."""
    try:
        from fedmeta import flower_app
    except ImportError as err:
        raise ConfigError(f"--engine flower needs Flower: pip install 'fedmeta[flower]' ({err})") from None
    return flower_app


def _figure(out: Path) -> str:
    """Draw the run's figure (``OUT/figure.png``); what to append to the "results in" line."""
    from fedmeta.plots import plot_runs

    try:
        return f" (figure: {plot_runs([out], out / 'figure.png')})"
    except (ValueError, OSError) as err:  # the results are written: say why the figure is not, and go on
        return f" (no figure: {err})"


def summary_table(summary: dict) -> str:
    """The summary as aligned ``key  value`` rows (accuracies as percentages); an experiment's own
    ``table`` is left to be printed after it, and long nested values to ``summary.json``."""
    rows = []
    for key, value in summary.items():
        if key == "table":
            continue
        if isinstance(value, dict):
            value = json.dumps(value)
            if len(value) > 200:
                value = f"{value[:120]}... (in summary.json)"
        elif isinstance(value, float) and "accuracy" in key:
            value = f"{100 * value:.2f}%"
        rows.append((key, str(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":
    app()
