"""fedmeta: attacks and defenses in federated meta-learning. Run experiments, list presets, draw figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedmeta.config import ConfigError, load_config, preset_description, preset_names
from fedmeta.data.files import DataError
from fedmeta.registry import ALL
from fedmeta.runs import RunDir, RunError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
def run(
    config: Annotated[str, typer.Argument(help="A preset name (see `fedmeta presets`) or a TOML file.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder; an unfinished one with the same config resumes.")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set meta.iterations=500.")
    ] = None,
    engine: Annotated[
        str, typer.Option("--engine", help="'local': all clients in this process; 'flower': Flower's simulation "
                          "engine (needs fedmeta[flower]).")
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
        else:
            raise ConfigError(f"--engine takes 'local' or 'flower', got '{engine}'")
    except (ConfigError, DataError, RunError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(summary_table(summary))
    typer.echo(f"results in {out}")


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
    typer.echo(f"wrote {plot_runs(runs, out or runs[0] / 'figure.png')}")


def _flower():
    """The Flower app, or a clear error if the extra is missing."""
    try:
        from fedmeta import flower_app
    except ImportError as err:
        raise ConfigError(f"--engine flower needs Flower: pip install 'fedmeta[flower]' ({err})") from None
    return flower_app


def summary_table(summary: dict) -> str:
    """The summary as aligned ``key  value`` rows (accuracies as percentages)."""
    rows = []
    for key, value in summary.items():
        if isinstance(value, dict):
            value = json.dumps(value)
        elif isinstance(value, float) and "accuracy" in key:
            value = f"{100 * value:.2f}%"
        rows.append((key, str(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":
    app()
