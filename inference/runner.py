"""``inference run``: one job from an input file to committed shards, on the Ray cluster it finds
(or an embedded one), with live progress, resume by job id, and a summary in ``job.json``."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from inference.cluster import cluster_slots, connect
from inference.config import Config, ScalingConfig
from inference.errors import InferenceError, JobConflict, OutputError
from inference.estimate import pool_sizes, run_estimate
from inference.inputs import InputProblem, InputRecord, read_input, rejection
from inference.measurements import MeasurementStore, job_report, measurements_dir
from inference.pool import WorkerPool
from inference.progress import Progress, Tracker, job_cost, model_shares
from inference.queue.actor import get_or_create_queue
from inference.queue.records import Packed
from inference.queue.store import JobSpec, NewItem
from inference.schema import ERROR_SCHEMA
from inference.shards import JobOutput, errors_table, resolve_fs

logger = logging.getLogger(__name__)

ENQUEUE_CHUNK = 512


@dataclass
class RunSummary:
    job_id: str
    output: str
    total: int
    done: int
    dead: int
    processed: int
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    items_per_s: float
    tokens_per_s: float
    workers: int
    workers_lost: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def default_job_id(input_path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", input_path.stem)[:64] or "job"
    return f"{stem}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def queue_db_path(config: Config, output_root: str) -> str:
    """Where the job's queue lives: ``queue.url`` (PostgreSQL), else the SQLite file."""
    if config.queue.url:
        return config.queue.url
    return local_queue_path(config, output_root)


def local_queue_path(config: Config, output_root: str) -> str:
    """The SQLite file of the queue (``queue.db_path``, else under the output); with
    ``queue.url`` its folder still holds what a cluster keeps beside the queue."""
    if config.queue.db_path:
        return str(Path(config.queue.db_path).expanduser().absolute())
    _fs, base, is_local = resolve_fs(output_root)
    if not is_local:
        return str(Path("~/.cache/inference/queue.sqlite").expanduser())
    return f"{base}/_queue/queue.sqlite"


PROBLEMS_SHOWN = 20


def validate_input(path: Path, config: Config) -> tuple[dict[str, int], list[InputProblem], int]:
    """First pass over the input: count good records by the pool that serves them, count every
    problem and keep the first few (with ``engines:``, an item naming a model no engine serves
    is one). Streams the file: memory does not grow with its problems."""
    good: dict[str, int] = {}
    problems: list[InputProblem] = []
    count = 0
    for record in _routed(_records(path, config), config):
        if isinstance(record, InputProblem):
            count += 1
            if len(problems) < PROBLEMS_SHOWN:
                problems.append(record)
        else:
            good[record[1]] = good.get(record[1], 0) + 1
    return good, problems, count


def check_input(path: Path, config: Config) -> tuple[dict[str, int], list[InputProblem], int]:
    """:func:`validate_input`, then with ``input.on_invalid: reject`` an InputError naming the
    file and each problem's line or row when there is any (nothing has been enqueued yet);
    with ``skip`` the problems are logged."""
    good, problems, count = validate_input(path, config)
    if count and config.input.on_invalid == "reject":
        raise rejection(path, problems, count)
    for p in problems:
        logger.warning("skipping %s %s: %s", path, p.where or "(file)", p.reason)
    if count > len(problems):
        logger.warning("skipping %d more invalid records of %s", count - len(problems), path)
    return good, problems, count


def _records(path: Path, config: Config) -> Iterator[InputRecord | InputProblem]:
    return read_input(
        path, config.input, _default_model(config), max_item_bytes=config.queue.max_item_bytes
    )


def _default_model(config: Config) -> str:
    """body.model of plain rows without a model column: the (first) engine's name."""
    return next(iter(config.engines)) if config.engines else config.engine.model


def _routed(
    records: Iterator[InputRecord | InputProblem], config: Config
) -> Iterator[tuple[InputRecord, str] | InputProblem]:
    """Each good record with the pool that serves its model."""
    for record in records:
        if isinstance(record, InputProblem):
            yield record
            continue
        pool = config.pool_of(record.model)
        if pool is None:
            served = ", ".join(config.served_names())
            yield InputProblem(
                record.line,
                f"{record.item_id}: model {record.model!r} is not served by this job "
                f"(engines: {served})",
                record.row,
            )
            continue
        yield record, pool


def _chunks(
    records: Iterator[InputRecord | InputProblem], config: Config
) -> Iterator[list[NewItem]]:
    """The good records as items, in :class:`Packed` chunks (one blob each to the queue)."""
    chunk: list[NewItem] = Packed()
    for entry in _routed(records, config):
        if isinstance(entry, InputProblem):
            continue
        record, pool = entry
        chunk.append(
            NewItem(
                record.item_id,
                record.payload,
                record.tokens,
                pool=pool if config.engines else None,
            )
        )
        if len(chunk) >= ENQUEUE_CHUNK:
            yield chunk
            chunk = Packed()
    if chunk:
        yield chunk


def job_spec(config: Config, job_id: str, output_root: str) -> JobSpec:
    not_before = config.schedule.not_before.timestamp() if config.schedule.not_before else 0.0
    _fs, base, is_local = resolve_fs(output_root)
    token_prices = config.token_prices()
    return JobSpec(
        job_id=job_id,
        pool=config.engine.model,
        priority=config.queue.priority,
        max_attempts=config.queue.max_attempts,
        backoff_base_s=config.queue.backoff_base_s,
        backoff_max_s=config.queue.backoff_max_s,
        not_before=not_before,
        windows=tuple(config.schedule.windows),
        timezone=config.schedule.timezone,
        settings={
            "output_path": base if is_local else output_root,
            "output_format": config.output.format,
            "rows_per_shard": config.output.rows_per_shard,
            "max_shard_age_s": config.output.max_shard_age_s,
            "pack_items": config.batching.pack_items,
            "model": config.engine.model,
            "cost_per_gpu_hour": config.scaling.cost_per_gpu_hour,
            **({"models": model_prices(config)} if config.engines else {}),
            **({"token_prices": token_prices} if token_prices else {}),
            # On a shared queue, the other clusters' Controllers run workers for the job too:
            # they find how in the queue (its secrets left out).
            **({"config": config.stored()} if config.queue.shared else {}),
        },
    )


def model_prices(config: Config) -> dict[str, tuple[str, float]]:
    """Of a config with ``engines:``: each pool's served name and price per hour."""
    return {
        c.engine.model: (name, c.scaling.cost_per_gpu_hour) for name, c in config.models().items()
    }


def run_job(
    input_path: str | Path,
    config: Config,
    *,
    job_id: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    poll_s: float = 0.5,
) -> RunSummary:
    """Run one job to completion. Raises InputError (nothing enqueued) for a bad input file."""
    started = time.monotonic()
    input_path = Path(input_path)
    output_root = config.output.path
    job_id = job_id or default_job_id(input_path)
    output = JobOutput(output_root, job_id, config.output.format)

    good_by_pool, _problems, _count = check_input(input_path, config)  # before anything starts
    connect()
    queue = get_or_create_queue(
        queue_db_path(config, output_root), config.queue.max_item_bytes, config.queue.shared
    )
    try:
        resumed = not ray.get(queue.create_job.remote(job_spec(config, job_id, output_root)))
    except JobConflict as exc:  # Ray's wrapper of the queue's error: raise the error itself
        cause = getattr(exc, "cause", exc)
        raise JobConflict(cause.job_id, cause.fields) from None
    before = ray.get(queue.stats.remote(job_id))
    models = config.models()
    tracker = Tracker(
        cost_per_hour=config.scaling.cost_per_gpu_hour,
        models=model_prices(config) if config.engines else None,
        token_prices=config.token_prices(),
    )
    sizing = _Sizings(
        [
            _PoolSizing(c, queue, job_id, _fixed_workers(c, len(models)), name)
            for name, c in config.pools().items()
        ]
    )
    # Workers load their model while the items are enqueued: of each pool this run has new
    # items for, or that has some left from an earlier run.
    before_pools = before.get("pools", {})
    for one in sizing.pools:
        earlier = before_pools.get(one.name, {"total": 0, "pending": 0, "leased": 0})
        if good_by_pool.get(one.name, 0) > earlier["total"] or (
            earlier["pending"] + earlier["leased"] > 0
        ):
            one.start()
    planned = run_estimate(input_path, config, *pool_sizes(config, _slots))  # while they load
    try:
        accepted = 0
        for chunk in _chunks(_records(input_path, config), config):
            accepted += ray.get(queue.enqueue.remote(job_id, chunk)).accepted
        logger.info("job=%s enqueued=%d resumed=%s", job_id, accepted, resumed)
        while True:
            stats = ray.get(queue.stats.remote(job_id))
            remaining = stats["pending"] + stats["leased"]
            progress = tracker.update(time.monotonic(), stats, finalizing=remaining == 0)
            if on_progress:
                on_progress(progress)
            if remaining == 0:
                break
            sizing.step()
            time.sleep(poll_s)
    finally:
        sizing.close()
    final = ray.get(queue.stats.remote(job_id))
    try:
        finalize(queue, output, job_id, final)
    except OSError as exc:
        codes = _dead_codes(queue, job_id)
        raise OutputError(
            f"job {job_id}: cannot write its results to {output.base}: {exc}"
            + (f" (dead letters by code: {codes})" if codes else "")
        ) from exc
    wall_s = time.monotonic() - started
    processed = final["done"] + final["dead"] - before["done"] - before["dead"]
    tokens = (
        final["prompt_tokens"]
        + final["completion_tokens"]
        - before["prompt_tokens"]
        - before["completion_tokens"]
    )
    summary = RunSummary(
        job_id=job_id,
        output=output.uri,
        total=final["total"],
        done=final["done"],
        dead=final["dead"],
        processed=processed,
        prompt_tokens=final["prompt_tokens"],
        completion_tokens=final["completion_tokens"],
        wall_s=wall_s,
        items_per_s=processed / wall_s if wall_s else 0.0,
        tokens_per_s=tokens / wall_s if wall_s else 0.0,
        workers=sizing.peak if processed else 0,
        workers_lost=sizing.lost,
    )
    fields = _job_fields(final, config)
    peaks = {one.name: one.peak for one in sizing.pools}
    store = MeasurementStore(measurements_dir(config))
    report = job_report(
        job_id, config, planned, before, final, wall_s, peaks, fields["cost"], store
    )
    output.write_json(output.job_json, {**summary.as_dict(), **fields, **report})
    if on_progress:
        on_progress(tracker.update(time.monotonic(), final))
    return summary


def _slots(scaling: ScalingConfig) -> int:
    return cluster_slots(scaling.cpus_per_worker, scaling.gpus_per_worker)


def _fixed_workers(config: Config, models: int) -> int:
    """Workers of a fixed pool: ``max_workers``, else the cluster's slots for its workers (a
    share of them when several models run: each pool keeps its workers till the job ends)."""
    s = config.scaling
    workers = s.max_workers or cluster_slots(s.cpus_per_worker, s.gpus_per_worker) // models
    return max(workers, s.min_workers, 1)


class _Sizings:
    """The pools of one job (one per model), stepped and closed together."""

    def __init__(self, pools: list[_PoolSizing]) -> None:
        self.pools = pools

    def step(self) -> None:
        for one in self.pools:
            one.step()

    def close(self) -> None:
        for one in self.pools:
            one.close()

    @property
    def peak(self) -> int:
        return sum(one.peak for one in self.pools)

    @property
    def lost(self) -> int:
        return sum(one.lost for one in self.pools)


class _PoolSizing:
    """One pool of the job's workers: a fixed pool (``scaling.mode: fixed``) started up front
    and kept at size, or the backlog-driven :class:`~inference.autoscale.Autoscaler`."""

    def __init__(
        self, config: Config, queue: Any, job_id: str, workers: int, name: str | None = None
    ) -> None:
        self.name = name or config.engine.model
        self.started = False
        self.job_id = job_id
        self.workers = workers
        self.scaling = config.scaling
        self.autoscaler: Any = None
        self.pool: WorkerPool | None = None
        self.deadlines: dict[str, float] = {}
        self._next_step = 0.0
        if self.scaling.mode == "autoscale":
            from inference.autoscale import Autoscaler, deadline_ts

            self.autoscaler = Autoscaler(config, queue, self.name)
            due = deadline_ts(self.scaling)
            self.deadlines = {job_id: due} if due is not None else {}
        else:
            self.pool = WorkerPool(config, self.name, queue)
        self.peak = 0

    def start(self) -> None:
        self.started = True
        if self.pool is not None:
            self.pool.start(self.workers)
            self.peak = self.workers

    def step(self) -> None:
        if self.pool is not None:
            if not self.started:
                return
            self.pool.check(replace=True)
            if self.pool.lost > max(10, 3 * self.workers):
                raise InferenceError(
                    f"job {self.job_id}: {self.pool.lost} workers lost; last error: "
                    f"{self.pool.fatal_errors[-1]}"
                )
            return
        now = time.monotonic()
        if now >= self._next_step:
            self.autoscaler.step(now, deadlines=self.deadlines)
            self.peak = max(self.peak, len(self.autoscaler.pool.members))
            self._next_step = now + self.scaling.interval_s
        if self.autoscaler.failed:
            raise InferenceError(f"job {self.job_id}: {self.autoscaler.failed}")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.drain()
        else:
            self.autoscaler.close()

    @property
    def lost(self) -> int:
        return self.pool.lost if self.pool is not None else int(self.autoscaler.pool.lost)


def _dead_codes(queue: Any, job_id: str) -> dict[str, int]:
    codes: dict[str, int] = {}
    for dead in ray.get(queue.dead_letters.remote(job_id, 10_000, 0)):
        codes[dead["error_code"]] = codes.get(dead["error_code"], 0) + 1
    return codes


def _job_fields(stats: dict[str, Any], config: Config) -> dict[str, Any]:
    busy_s = float(stats["busy_s"])
    token_prices = config.token_prices()
    fields = {
        "state": "completed",
        "finished_at": datetime.now(UTC).isoformat(),
        "busy_s": busy_s,
        "cost": job_cost(stats, config.scaling.cost_per_gpu_hour, token_prices)[0],
        "model": config.engine.model,
        "lease_expiries": stats["lease_expiries"],
    }
    if stats.get("remote_batches"):  # an openai_batch engine's provider batches
        fields["remote_batches"] = stats["remote_batches"]
    if config.engines:
        models = model_shares(stats.get("pools", {}), model_prices(config), token_prices)
        fields["models"] = models
        fields["model"] = list(models)
        fields["cost"] = sum(m["cost"] for m in models.values())
    return fields


DEAD_LETTER_PAGE = 5000  # dead letters per call on the queue, and per row group of errors/


def finalize(queue: Any, output: JobOutput, job_id: str, stats: dict[str, Any]) -> None:
    """Write the dead letters to ``errors/`` and the manifest of committed shards. The dead
    letters stream from the queue a page at a time into the file (a cancelled job of millions
    of items never sits in memory whole)."""

    def pages() -> Iterator[pa.Table]:
        after = 0
        while True:
            page = ray.get(queue.dead_letters.remote(job_id, DEAD_LETTER_PAGE, after))
            if not page:
                return
            after = page[-1]["id"]
            yield errors_table(
                [
                    {
                        "job_id": job_id,
                        "custom_id": d["custom_id"],
                        "error_kind": d["error_kind"],
                        "error_code": d["error_code"],
                        "message": d["message"],
                        "attempts": d["attempts"],
                        "last_attempt_at": datetime.fromtimestamp(d["last_attempt_at"] or 0, UTC),
                    }
                    for d in page
                ]
            )

    error_file = output.errors_path(0)
    tmp = output.scratch_path("errors")
    if output.write_tables(pages(), ERROR_SCHEMA, tmp):
        output.publish(tmp, error_file, replace=True)  # the dead letters are rewritten whole
    else:
        output.remove(error_file)
    shards = ray.get(queue.committed_shards.remote(job_id))
    base = output.base
    output.write_json(
        output.manifest,
        {
            "job_id": job_id,
            "shards": [
                {"file": s["path"][len(base) + 1 :], "rows": s["rows"], "bytes": s["bytes"]}
                for s in shards
            ],
            "done": stats["done"],
            "dead": stats["dead"],
        },
    )
