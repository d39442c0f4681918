"""The ``inference`` command line. Thin: it parses arguments, calls the layers below, and prints.
Exit codes: 0 success, 1 the job could not finish, 2 bad config or input."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from inference.config import Config, load_config, parse_config
from inference.errors import ConfigError, InferenceError, InputError, JobConflict
from inference.progress import Progress as JobProgress
from inference.schedule import describe_next_run

if TYPE_CHECKING:
    from inference.admin import QueueAccess

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
InputArg = Annotated[
    Path, typer.Argument(help="Input file (OpenAI batch JSONL, JSONL/CSV/Parquet).")
]
OutputRootOpt = Annotated[Path | None, typer.Option(help="Output root (overrides output.path).")]


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
    input: InputArg,
    config: ConfigOpt = Path("configs/tiny-cpu.yaml"),
    output: OutputRootOpt = None,
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
            eta=_fmt_eta(p.eta_s)
            if p.next_run_at is None
            else describe_next_run(p.next_run_at, time.time()),
            dead=p.dead,
            description=p.state,
            counts=f"{p.done + p.dead}/{p.total}",
        )

    try:
        with bar:
            summary = run_job(input, cfg, job_id=job_id, on_progress=show)
    except (InputError, JobConflict) as exc:
        # As written: the message names the file, lines and values (no markup, no wrapping).
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
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


@app.command()
def estimate(
    input: InputArg,
    config: ConfigOpt = Path("configs/tiny-cpu.yaml"),
    output: OutputRootOpt = None,
    deadline: Annotated[
        str | None,
        typer.Option(help="Finish within (2h, 90m) or by (ISO time): the workers it needs."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Workers now (default: what `run` starts).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """Tokens, duration and cost of a job before it runs, and the workers a deadline needs."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from inference.estimate import estimate_input, estimate_rows

    try:
        cfg = _load(config, output)
        result = estimate_input(input, cfg, deadline, workers)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except (InputError, ValueError) as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(result, indent=1))
        return
    table = Table(title=f"estimate of {input}", show_header=False)
    for key, value in estimate_rows(result):
        table.add_row(key, value)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    for note in result["notes"]:
        console.print(f"note: {escape(note)}", soft_wrap=True)


@app.command()
def serve(
    config: ConfigOpt = Path("configs/tiny-cpu.yaml"),
    host: Annotated[
        str | None, typer.Option(help="Bind address (default api.host: 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default api.port: 8000).")] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Server processes on the port (default api.workers: 1)."),
    ] = None,
) -> None:
    """Serve the HTTP API (OpenAI files and batches, native enqueue) on the Ray cluster it finds."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from inference.api.server import serve as serve_api

    try:
        serve_api(config, host, port, workers)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


@app.command()
def submit(
    input: Annotated[Path, typer.Argument(help="Input file (inside the project, or shared).")],
    address: Annotated[
        str, typer.Option(help="Ray Jobs API of the cluster, e.g. http://HEAD:8265.")
    ],
    config: ConfigOpt = Path("configs/tiny-cpu.yaml"),
    output: Annotated[
        str | None,
        typer.Option(help="Output root every node reaches: shared absolute path or URI."),
    ] = None,
    job_id: Annotated[
        str | None, typer.Option("--job-id", help="Job id; the same id resumes.")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="KEY=VALUE for the job (repeatable).")
    ] = None,
    follow: Annotated[bool, typer.Option(help="Stream the job's logs until it ends.")] = False,
) -> None:
    """Run `inference run` on a Ray cluster as a Ray job; prints the Ray job id."""
    from inference.submit import SubmitError, follow_job, plan, submit_job

    pairs = [e.partition("=") for e in env or []]
    if any(not k or not sep for k, sep, _ in pairs):
        console.print("[red]error:[/] --env takes KEY=VALUE")
        raise typer.Exit(2)
    try:
        job = plan(
            input, config, address, output=output, job_id=job_id, env={k: v for k, _, v in pairs}
        )
        for note in job.notes:
            console.print(f"note: {note}")
        submit_job(job)
    except SubmitError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    print(f"Ray job: {job.submission_id}")
    print(f"inference job: {job.job_id} (results in {job.output})")
    print(f"follow: {job.follow_hint()}")
    if not follow:
        return
    try:
        status = follow_job(job)
    except SubmitError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print(f"stopped following; the job goes on ({job.follow_hint()})")
        raise typer.Exit(130) from None
    console.print(f"Ray job {job.submission_id}: {status}")
    raise typer.Exit(0 if status == "SUCCEEDED" else 1)


OutputOpt = Annotated[
    Path | None, typer.Option(help="Output root of the job (locates the queue's database).")
]
dlq_app = typer.Typer(help="Dead letters: list and redrive.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


OptionalConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="The job's config (default: built-in).")
]


def _load_optional(config: Path | None, output: Path | None) -> Config:
    if config is not None:
        return _load(config, output)
    defaults = parse_config({})
    return defaults.with_updates(output={"path": str(output)}) if output else defaults


def _access(config: Path | None, output: Path | None, write: bool = False) -> QueueAccess:
    from inference.admin import QueueAccess

    try:
        return QueueAccess(_load_optional(config, output), write=write)
    except (ConfigError, InferenceError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


def _call(config: Path | None, output: Path | None, method: str, *args: Any, write: bool) -> Any:
    """One call on the queue (the cluster's, or its database's); a refusal is a clear error."""
    access = _access(config, output, write=write)
    try:
        return access.call(method, *args)
    except InferenceError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None


@app.command()
def status(
    job: Annotated[str | None, typer.Argument(help="A job id; all jobs when omitted.")] = None,
    config: OptionalConfigOpt = None,
    output: OutputOpt = None,
) -> None:
    """Jobs with their counts, progress, tokens and cost, as a table."""
    from inference.admin import status_rows

    try:
        rows = status_rows(_access(config, output), job)
    except InferenceError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    table = Table(title="jobs")
    for key in rows[0] if rows else ["job"]:
        table.add_column(key, justify="left" if key in ("job", "state") else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    # Piped output is read by scripts: never truncate it to a terminal's 80 columns.
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@app.command()
def cancel(
    job: Annotated[str, typer.Argument(help="The job to cancel.")],
    config: OptionalConfigOpt = None,
    output: OutputOpt = None,
) -> None:
    """Stop leasing a job's items; pending ones become dead letters with code `cancelled`."""
    _call(config, output, "set_job_state", job, "cancelled", write=True)
    console.print(f"cancelled {job}")


queue_app = typer.Typer(help="The queue's database.", no_args_is_help=True)
app.add_typer(queue_app, name="queue")


@queue_app.command("migrate")
def queue_migrate(config: OptionalConfigOpt = None, output: OutputOpt = None) -> None:
    """Create the queue's schema, or bring an older one to this version (SQLite file or
    `queue.url` PostgreSQL). A running WorkQueue migrates at its start; this is for doing it
    beforehand, with no cluster up. A schema newer than this version is refused."""
    from inference.admin import migrate_queue
    from inference.runner import queue_db_path

    try:
        cfg = _load_optional(config, output)
        before, after = migrate_queue(queue_db_path(cfg, cfg.output.path))
    except (ConfigError, InferenceError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    if before is None:
        console.print(f"created the queue schema, version {after}")
    elif before == after:
        console.print(f"the queue schema is at version {after}: nothing to do")
    else:
        console.print(f"migrated the queue schema from version {before} to {after}")


@dlq_app.command("list")
def dlq_list(
    job: Annotated[str, typer.Argument(help="The job.")],
    config: OptionalConfigOpt = None,
    output: OutputOpt = None,
    limit: Annotated[int, typer.Option(help="Most dead letters to show.")] = 100,
) -> None:
    """A job's dead letters with their reasons, one JSON object per line."""
    for dead in _call(config, output, "dead_letters", job, limit, 0, write=False):
        print(json.dumps(dead, default=str))


@dlq_app.command("redrive")
def dlq_redrive(
    job: Annotated[str, typer.Argument(help="The job.")],
    config: OptionalConfigOpt = None,
    output: OutputOpt = None,
) -> None:
    """Return a job's dead letters to pending with a fresh attempt budget (run the job again,
    or let a serving cluster's workers, pick them up)."""
    count = _call(config, output, "redrive", job, write=True)
    console.print(f"redriven: {count} item(s) of {job}")


@app.command()
def export(
    job: Annotated[str, typer.Argument(help="The job.")],
    config: OptionalConfigOpt = None,
    output: OutputOpt = None,
    format: Annotated[str, typer.Option("--format", help="Only jsonl (OpenAI batch).")] = "jsonl",
    to: Annotated[Path, typer.Option("--to", help="Folder for the files.")] = Path("."),
) -> None:
    """Write OpenAI batch output and error files (JSONL) from a job's committed results."""
    from inference.admin import QueueAccess, export_jsonl

    if format != "jsonl":
        console.print("[red]error:[/] --format must be jsonl")
        raise typer.Exit(2)
    cfg = _load_optional(config, output)
    try:  # the queue knows the job's endpoint; a job of one endpoint is shaped after it
        urls = QueueAccess(cfg).call("job_urls", job)
    except InferenceError:  # no queue here (results copied elsewhere): each row decides
        urls = []
    endpoint = urls[0] if len(urls) == 1 else None
    out, err = export_jsonl(cfg, job, to, endpoint)
    console.print(f"wrote {out} and {err}")


def main() -> None:  # pragma: no cover - console entry point
    app()
