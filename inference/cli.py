"""The ``inference`` command line. Thin: it parses arguments, calls the layers below, and prints.
Exit codes: 0 success, 1 the job could not finish, 2 bad config or input."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from inference.config import Config, load_config
from inference.errors import ConfigError, InferenceError, InputError
from inference.progress import Progress as JobProgress

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Batch inference on Ray.",
)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Batch inference on Ray: run jobs, serve the HTTP API, inspect queues."""


ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Job config (YAML).")]


def _load(config_path: Path, output: Path | None) -> Config:
    config = load_config(config_path)
    if output is not None:
        config = config.with_updates(output={"path": str(output)})
    return config


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@app.command()
def run(
    input: Annotated[
        Path, typer.Argument(help="Input file (OpenAI batch JSONL, JSONL/CSV/Parquet).")
    ],
    config: ConfigOpt = Path("configs/tiny-cpu.yaml"),
    output: Annotated[
        Path | None, typer.Option(help="Output root (overrides output.path).")
    ] = None,
    job_id: Annotated[
        str | None, typer.Option("--job-id", help="Job id; the same id resumes.")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Run one job to completion, with live progress; re-running the same --job-id resumes."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from inference.runner import run_job

    try:
        cfg = _load(config, output)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[counts]}"),
        TextColumn("{task.fields[rate]} items/s"),
        TextColumn("ETA {task.fields[eta]}"),
        TextColumn("dead {task.fields[dead]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    )
    task = bar.add_task("starting", total=None, rate="0.0", eta="--", dead=0, counts="")

    def show(p: JobProgress) -> None:
        bar.update(
            task,
            total=p.total,
            completed=p.done + p.dead,
            rate=f"{p.items_per_s:.1f}",
            eta=_fmt_eta(p.eta_s),
            dead=p.dead,
            description=p.state,
            counts=f"{p.done + p.dead}/{p.total}",
        )

    try:
        with bar:
            summary = run_job(input, cfg, job_id=job_id, on_progress=show)
    except InputError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except InferenceError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    table = Table(title=f"job {summary.job_id}", show_header=False)
    for key, value in [
        ("items", f"{summary.total} ({summary.done} done, {summary.dead} dead letters)"),
        ("processed this run", summary.processed),
        ("tokens", f"{summary.prompt_tokens} prompt + {summary.completion_tokens} completion"),
        ("wall time", f"{summary.wall_s:.1f} s"),
        ("throughput", f"{summary.items_per_s:.1f} items/s, {summary.tokens_per_s:.0f} tokens/s"),
        ("workers", f"{summary.workers} ({summary.workers_lost} lost)"),
        ("output", summary.output),
    ]:
        table.add_row(key, str(value))
    Console().print(table)
    print(json.dumps({"summary": summary.as_dict()}))


def main() -> None:  # pragma: no cover - console entry point
    app()
