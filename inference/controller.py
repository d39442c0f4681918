"""The Controller: one detached Ray actor per cluster that owns the jobs it was given.

It keeps the job registry (OpenAI batches and native jobs, with their configs), drives each job
through its lifecycle, sizes a pool of workers per engine pool that has work
(:class:`~inference.fleet.Fleet`: fixed, or autoscaled from the backlog through Ray's autoscaler),
and finalizes settled jobs (errors shard, manifest, ``job.json``, and for a batch its OpenAI output
and error files). The HTTP server and the CLI call it; neither holds any of this logic.

Lifecycle (``status``)::

    validating -> running -> finalizing -> completed        (a batch: checked, then enqueued)
    validating -> failed                                    (a batch file with bad lines)
    queued -> running -> finalizing -> completed -> running (a native job takes items any time)
    any active -> cancelling -> cancelled                   (pending items dead-letter: cancelled)
    queued/running -> expiring -> expired                   (completion window passed)

What must survive a restart lives in SQLite next to the queue database (``controller.sqlite``:
the registry, and the ids of the workers started, whose leases a restarted Controller hands back
at once); a record is written before the call that made it is acknowledged. Everything else
(pools, rates) is rebuilt by the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from inference.api.batch_input import batch_items, check_batch_file
from inference.api.filestore import FileStore, QuotaExceeded
from inference.api.http_errors import ApiError, not_found
from inference.config import Config
from inference.errors import ConfigError, JobConflict, OutputError, QueueError
from inference.estimate import server_estimate
from inference.export import error_jsonl
from inference.fleet import Fleet, job_deadlines
from inference.heap import freeze_startup_heap
from inference.measurements import MeasurementStore, job_report
from inference.metrics import record_ray as record_ray_metrics
from inference.progress import History, Tracker, job_cost
from inference.queue.actor import NAMESPACE, OWNER_WAIT_S, get_queue, head_node_id
from inference.queue.db import DatabaseOwned, hold_owner_lock
from inference.results import ShardOrder
from inference.runner import finalize, job_spec, model_prices
from inference.schema import CUSTOM_ID, URL_TASKS
from inference.shards import JobOutput
from inference.webhooks import (
    KEEP_S,
    Deliverer,
    Outbox,
    WebhookSettings,
    insert_rows,
    load_secrets,
)

logger = logging.getLogger(__name__)

CONTROLLER_NAME = "Controller"
TICK_S = 1.0
SWEEP_S = 30.0  # the janitor's period: expired files are deleted within it
ACTIVE = ("validating", "queued", "running", "finalizing", "cancelling", "expiring")
FINAL = ("completed", "failed", "cancelled", "expired")
_ENDING = {"cancelling": "cancelled", "expiring": "expired"}  # -> the dead letters' code
_WINDOW = re.compile(r"^([1-9]\d{0,6})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def window_s(text: str) -> int:
    """Seconds of a completion window such as ``24h`` (OpenAI's), ``90m`` or ``30s``."""
    match = _WINDOW.match(text)
    if not match or not 1 <= int(match[1]) * _UNITS[match[2]] <= 30 * 86400:
        raise ApiError(
            400,
            f"completion_window must be a duration such as '24h' (1s to 30d), got {text!r}",
            "completion_window",
            "invalid_completion_window",
        )
    return int(match[1]) * _UNITS[match[2]]


class Registry:
    """The Controller's durable state: job records (JSON documents) and started workers."""

    def __init__(self, path: Path, owner_wait_s: float = OWNER_WAIT_S) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One Controller per state: two servers on one queue (queue.shared) must not take each
        # other's jobs for their own (each would finalize them). A restarted Controller waits
        # for its previous process to let go.
        try:
            self._owner = hold_owner_lock(path, wait_s=owner_wait_s)
        except DatabaseOwned:
            raise QueueError(
                f"the server state in {path.parent} is in use by another running server: give"
                " each server its own api.state_dir"
            ) from None
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS jobs(seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " job_id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, doc TEXT NOT NULL);"
            "CREATE TABLE IF NOT EXISTS workers(worker_id TEXT PRIMARY KEY, pool TEXT NOT NULL,"
            " started_at REAL NOT NULL);"
        )
        self._lock = threading.Lock()
        self.outbox = Outbox(self._db, self._lock)  # webhook events due, in this database

    def load(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT seq, doc FROM jobs ORDER BY seq").fetchall()
        return [{**json.loads(doc), "seq": seq} for seq, doc in rows]

    def save(self, rec: dict[str, Any], events: list[tuple[Any, ...]] | None = None) -> None:
        """Write a record, and with it (one transaction) the webhook ``events`` its move
        makes due (outbox rows)."""
        doc = json.dumps({k: v for k, v in rec.items() if k not in ("seq", "stats")})
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "INSERT INTO jobs(job_id, kind, doc) VALUES (?, ?, ?) ON CONFLICT(job_id)"
                    " DO UPDATE SET doc = excluded.doc RETURNING seq",
                    (rec["id"], rec["kind"], doc),
                ).fetchone()
                if events:
                    insert_rows(self._db, events)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        rec["seq"] = row[0]

    def add_workers(self, pool: str, worker_ids: list[str]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO workers VALUES (?, ?, ?)",
                [(w, pool, time.time()) for w in worker_ids],
            )

    def remove_workers(self, worker_ids: list[str]) -> None:
        with self._lock:
            self._db.executemany(
                "DELETE FROM workers WHERE worker_id = ?", [(w,) for w in worker_ids]
            )

    def workers(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT worker_id FROM workers")]


class Controller:
    """Job registry and lifecycle, worker pools, finalization. Runs as a threaded Ray actor:
    API calls on Ray's threads, the control loop on its own thread, one lock over the records."""

    def __init__(self, state_dir: str, webhooks: WebhookSettings | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        self.state_dir = Path(state_dir)
        webhooks = webhooks or WebhookSettings()
        keys = load_secrets(webhooks.endpoints)  # first: a missing secret is the error
        self._queue = get_queue()
        self._registry = Registry(self.state_dir / "controller.sqlite")
        self._webhooks = Deliverer(self._registry.outbox, webhooks, keys)
        self._files = FileStore(self.state_dir / "files")
        self._lock = threading.RLock()
        self._jobs: dict[str, dict[str, Any]] = {r["id"]: r for r in self._registry.load()}
        self._trackers: dict[str, Tracker] = {}
        self._foreign: dict[str, dict[str, Any] | None] = {}  # configs of others' jobs
        self._progress: dict[str, dict[str, Any]] = {}
        self._history = History()
        self._fleet = Fleet(self._queue, self._registry)
        self._backlog = 0
        self._settled = (0.0, 0)  # (time, done + dead of every job) for the drain rate
        self._items_per_s = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._server_counters: dict[str, dict[tuple[str, ...], float]] = {}
        self._live: dict[str, ShardOrder] = {}  # running batches' output files
        self._shard_paths: dict[str, dict[int, str]] = {}
        self._observed: dict[str, int] = {}  # batch -> its done count when last observed
        self._swept_at = 0.0
        self._release_lost_workers()
        freeze_startup_heap()
        self._thread = threading.Thread(target=self._loop, name="controller-loop", daemon=True)
        self._thread.start()
        self._webhooks.start()
        logger.info("Controller ready state=%s jobs=%d", self.state_dir, len(self._jobs))

    # ------------------------------------------------------------------ liveness
    def ping(self) -> str:
        return str(self.state_dir)

    def wake(self) -> None:
        """Run the loop now (new work arrived)."""
        self._wake.set()

    def webhook_urls(self) -> list[str]:
        """The endpoints this Controller delivers webhooks to (those it was started with)."""
        return self._webhooks.urls()

    def server_counters(
        self, server: str, counters: dict[tuple[str, ...], float]
    ) -> dict[tuple[str, ...], float]:
        """The request counters of every API server process, summed: each process reports its
        own (counted since it started) and gets the sum back, so ``/metrics`` says the same
        whichever process a scrape reaches (``inference serve --workers N``). A report replaces
        that process's last one; processes that ended keep their last counts, so the sums never
        go down while the Controller lives."""
        with self._lock:
            self._server_counters[server] = dict(counters)
            totals: dict[tuple[str, ...], float] = {}
            for reported in self._server_counters.values():
                for key, n in reported.items():
                    totals[key] = totals.get(key, 0.0) + n
            return totals

    def snapshot(self) -> dict[str, Any]:
        """Cheap figures for the server: backlog, drain rate, pools, job statuses."""
        with self._lock:
            statuses: dict[str, int] = {}
            for rec in self._jobs.values():
                key = f"{rec['kind']}:{rec['status']}"
                statuses[key] = statuses.get(key, 0) + 1
            return {
                "backlog": self._backlog,
                "items_per_s": self._items_per_s,
                "jobs": statuses,
                "pools": self._fleet.snapshot(),
                "pool_errors": dict(self._fleet.errors),
                "loop_alive": self._thread.is_alive(),
                "webhooks": self._webhooks.snapshot(),
            }

    def throughput(self) -> dict[str, list[float]]:
        """Items and tokens per second of the live jobs, one point per tick, oldest first."""
        with self._lock:
            return self._history.as_dict()

    def shutdown(self) -> None:
        """Stop the loop and drain every pool (tests, and a planned stop)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._webhooks.stop()
        self._fleet.shutdown()

    # ------------------------------------------------------------------ records
    def _new_record(self, kind: str, job_id: str, config: dict[str, Any], **fields: Any) -> dict:
        now = int(time.time())
        rec: dict[str, Any] = {
            "id": job_id,
            "kind": kind,
            "status": "validating" if kind == "batch" else "queued",
            "created_at": now,
            "config": _redacted(config),
            "times": {},
            "expires_at": None,
            "end_reason": None,
            "metadata": None,
            **fields,
        }
        if rec.get("completion_window"):
            rec["expires_at"] = now + window_s(rec["completion_window"])
        return rec

    def _set(
        self, rec: dict[str, Any], status: str, stamp: str | None = None, expect: str | None = None
    ) -> bool:
        """Move a record to ``status`` (stamping ``<stamp>_at``) and persist it. With
        ``expect``, only from that status (an API call may have moved it meanwhile)."""
        with self._lock:
            if expect is not None and rec["status"] != expect:
                return False
            ends = status in FINAL and rec["status"] != status
            rec["status"] = status
            if stamp:
                rec["times"][f"{stamp}_at"] = int(time.time())
            events = self._webhooks.rows(rec["kind"], rec["id"], status) if ends else None
            self._registry.save(rec, events)
            if status in FINAL and (rec["kind"] == "batch" or status != "completed"):
                self._trackers.pop(rec["id"], None)  # it never moves again
        if events:
            self._webhooks.wake()
        logger.info("job %s job=%s status=%s", rec["kind"], rec["id"], status)
        return True

    def _view(self, rec: dict[str, Any], fresh: bool = False) -> dict[str, Any]:
        """A copy of a record for callers: its last queue stats (fresh ones on request) and
        progress, without the config."""
        with self._lock:
            out = {k: v for k, v in rec.items() if k != "config"}
            out["times"] = dict(rec["times"])
            out["progress"] = self._progress.get(rec["id"])
        if fresh and out["status"] not in ("validating", "failed"):
            # No queue job yet, or the queue is restarting: the last known stats stand.
            with contextlib.suppress(Exception):
                out["stats"] = ray.get(self._queue.stats.remote(rec["id"]), timeout=10)
        return out

    def _check_open_jobs(self, cap: int | None) -> None:
        """429 when ``cap`` (``api.max_open_jobs``) jobs and batches are not finished yet."""
        if cap is None:
            return
        with self._lock:
            open_jobs = sum(1 for r in self._jobs.values() if r["status"] in ACTIVE)
        if open_jobs >= cap:
            raise ApiError(
                429,
                f"{open_jobs} jobs and batches are not finished (api.max_open_jobs is {cap}); "
                "cancel some or wait for them to finish",
                None,
                "quota_exceeded",
            )

    def _record(self, job_id: str, kind: str) -> dict[str, Any]:
        rec = self._jobs.get(job_id)
        if rec is None or rec["kind"] != kind:
            raise not_found("batch" if kind == "batch" else "job", job_id)
        return rec

    def _page(self, kind: str, limit: int, after: str | None) -> tuple[list[dict], bool]:
        with self._lock:
            recs = sorted(
                (r for r in self._jobs.values() if r["kind"] == kind),
                key=lambda r: r["seq"],
                reverse=True,
            )
        if after:
            anchor = self._jobs.get(after)
            if anchor is None or anchor["kind"] != kind:
                raise not_found(kind, after, "after")
            recs = [r for r in recs if r["seq"] < anchor["seq"]]
        return [self._view(r) for r in recs[:limit]], len(recs) > limit

    # ------------------------------------------------------------------ native jobs
    def create_job(
        self,
        job_id: str | None,
        config: dict[str, Any],
        output_root: str,
        metadata: dict[str, str] | None = None,
        completion_window: str | None = None,
        max_open_jobs: int | None = None,
    ) -> dict[str, Any]:
        """Register a native job and create it in the WorkQueue; items come later."""
        job_id = job_id or f"job_{uuid.uuid4().hex[:24]}"
        _check_job_id(job_id, output_root)
        with self._lock:
            if job_id in self._jobs:
                raise ApiError(409, f"job {job_id!r} exists already", "job_id", "job_exists")
            self._check_open_jobs(max_open_jobs)
            rec = self._new_record(
                "native",
                job_id,
                config,
                output_root=output_root,
                metadata=metadata,
                completion_window=completion_window,
            )
            spec = job_spec(Config.model_validate(config), job_id, output_root)
            try:
                created = ray.get(self._queue.create_job.remote(spec))
            except JobConflict as exc:  # the id is an earlier job's, with another config
                message = str(getattr(exc, "cause", exc))
                raise ApiError(409, message, "job_id", "job_exists") from None
            if not created:
                raise ApiError(409, f"job {job_id!r} exists in the queue", "job_id", "job_exists")
            self._jobs[job_id] = rec
            self._registry.save(rec)
        logger.info("native job created job=%s", job_id)
        return self._view(rec)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._view(self._record(job_id, "native"), fresh=True)

    def jobs(self, limit: int = 20, after: str | None = None) -> tuple[list[dict], bool]:
        return self._page("native", limit, after)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._cancel(self._record(job_id, "native"))

    def job_brief(self, job_id: str) -> dict[str, Any] | None:
        """What the server needs before enqueueing: kind, status (no queue round trip)."""
        rec = self._jobs.get(job_id)
        if rec is None:
            return None
        return {
            "kind": rec["kind"],
            "status": rec["status"],
            "end_reason": rec["end_reason"],
            "pool": rec["config"]["engine"]["model"],
            "endpoint": rec.get("endpoint"),  # a batch's; a native job's items say theirs
        }

    # ------------------------------------------------------------------ OpenAI batches
    def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        config: dict[str, Any],
        output_root: str,
        max_open_jobs: int | None = None,
        output_expires_after_s: int | None = None,
    ) -> dict[str, Any]:
        """Register a batch (status ``validating``); the loop checks its file and enqueues it.
        Its output and error files expire ``output_expires_after_s`` after the batch's
        creation (OpenAI's ``output_expires_after``), or are kept until deleted."""
        doc = self._files.get(input_file_id)
        if doc is None:
            raise not_found("file", input_file_id, "input_file_id")
        if doc["status"] == "expired":
            raise _expired(input_file_id, "input_file_id")
        if doc["purpose"] != "batch":
            raise ApiError(
                400,
                f"file {input_file_id} has purpose {doc['purpose']!r}; a batch needs 'batch'",
                "input_file_id",
                "invalid_file_purpose",
            )
        if endpoint not in URL_TASKS:
            raise ApiError(
                400,
                f"endpoint must be one of {', '.join(URL_TASKS)}, got {endpoint!r}",
                "endpoint",
                "unsupported_endpoint",
            )
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        rec = self._new_record(
            "batch",
            batch_id,
            config,
            output_root=output_root,
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=completion_window,
            metadata=metadata,
            output_file_id=None,
            error_file_id=None,
            errors=None,
            model=None,
            output_expires_after_s=output_expires_after_s,
        )
        with self._lock:
            self._check_open_jobs(max_open_jobs)
            self._jobs[batch_id] = rec
            self._registry.save(rec)
        logger.info("batch created batch=%s file=%s", batch_id, input_file_id)
        self._wake.set()
        return self._view(rec)

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._view(self._record(batch_id, "batch"), fresh=True)

    def batches(self, limit: int = 20, after: str | None = None) -> tuple[list[dict], bool]:
        return self._page("batch", limit, after)

    def redrive(self, job_id: str) -> int:
        """A job's dead letters back to pending. A batch's only while it runs: from finalizing
        on, its output and error files are being written (an item redriven then would be in
        neither). The check and the redrive hold the lock that the move to finalizing takes."""
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is not None and rec["kind"] == "batch" and rec["status"] != "running":
                raise ApiError(
                    409,
                    f"batch {job_id} is {rec['status']}; only a running batch's dead letters"
                    " can be redriven",
                    "job_id",
                    "batch_final",
                )
            return int(ray.get(self._queue.redrive.remote(job_id, None, True)))

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._cancel(self._record(batch_id, "batch"))

    def _cancel(self, rec: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if rec["status"] in ("cancelling", "cancelled"):
                return self._view(rec)
            if rec["status"] in FINAL or rec["status"] in ("finalizing", "expiring"):
                raise ApiError(
                    409,
                    f"{rec['id']} is {rec['status']}; it cannot be cancelled",
                    None,
                    "not_cancellable",
                )
            rec["end_reason"] = "cancelled"
            was_validating = rec["status"] == "validating"
            self._set(rec, "cancelling", "cancelling")
        if not was_validating:  # a validating batch is cancelled in the queue once enqueued
            ray.get(self._queue.set_job_state.remote(rec["id"], "cancelled"))
        else:  # enqueue may have failed half-way: its job, if any, must settle
            with contextlib.suppress(QueueError):
                ray.get(self._queue.set_job_state.remote(rec["id"], "cancelled"))
        self._wake.set()
        return self._view(rec)

    # ------------------------------------------------------------------ files
    def put_file(
        self, data: bytes, filename: str, purpose: str, expires_at: int | None = None
    ) -> dict[str, Any]:
        _check_upload(filename, purpose)
        return self._files.put([data], filename=filename, purpose=purpose, expires_at=expires_at)

    def begin_upload(
        self, filename: str, purpose: str | None = None, max_files: int | None = None
    ) -> str:
        """Start a streamed upload (``POST /v1/files``): its pieces come with
        :meth:`write_upload`, then :meth:`finish_upload` stores it (or :meth:`abort_upload`
        drops it). 400 for a purpose (when known yet) or name the Batch API refuses, 429 when
        the store is full."""
        _check_upload(filename, purpose)
        with _quota():
            return self._files.begin_upload(max_files)

    def write_upload(self, upload_id: str, data: bytes, max_bytes: int | None = None) -> int:
        with _quota():
            return self._files.append(upload_id, data, max_bytes)

    def finish_upload(
        self,
        upload_id: str,
        filename: str,
        purpose: str,
        max_files: int | None = None,
        max_bytes: int | None = None,
        expires_at: int | None = None,
    ) -> dict[str, Any]:
        try:
            _check_upload(filename, purpose)
        except ApiError:
            self._files.abort(upload_id)
            raise
        with _quota():
            return self._files.commit(
                upload_id,
                filename=filename,
                purpose=purpose,
                max_files=max_files,
                max_bytes=max_bytes,
                expires_at=expires_at,
            )

    def abort_upload(self, upload_id: str) -> None:
        self._files.abort(upload_id)

    def file_requests(self, file_id: str) -> int:
        """The requests (non-blank lines) of an uploaded batch file; 404 when unknown."""
        if self._files.get(file_id) is None:
            raise not_found("file", file_id, "input_file_id")
        return self._files.count_lines(file_id)

    def file(self, file_id: str) -> dict[str, Any]:
        doc = self._files.get(file_id)
        if doc is None:
            rec = self._live_batch(file_id)
            if rec is None:
                raise not_found("file", file_id)
            return self._live_doc(rec)
        return doc

    def files(
        self, purpose: str | None, limit: int, after: str | None
    ) -> tuple[list[dict[str, Any]], bool]:
        return self._files.list(purpose, limit, after)

    def read_file(self, file_id: str, offset: int, size: int) -> bytes:
        doc = self._files.get(file_id)
        if doc is None:
            rec = self._live_batch(file_id)
            if rec is None:
                raise not_found("file", file_id)
            return self._live_order(rec).read(self._order_paths(rec), offset, size)
        if doc["status"] == "expired":
            raise _expired(file_id)
        return self._files.read(file_id, offset, size)

    def sweep_files(self, now: float | None = None) -> list[str]:
        """The janitor: delete the files past their ``expires_at`` (uploads with
        ``expires_after``, batch outputs with ``output_expires_after``). Runs in the loop every
        ``SWEEP_S``; returns the ids deleted."""
        deleted = [f for f in self._files.expired(now) if self._files.delete(f)]
        if deleted:
            logger.info("janitor: deleted %d expired file(s): %s", len(deleted), deleted[:10])
        return deleted

    # ------------------------------------------------------------------ results while running
    def _live_batch(self, file_id: str) -> dict[str, Any] | None:
        """The batch whose output file ``file_id`` is, while that file is being written (the
        batch runs): its content then is every result committed so far."""
        key = file_id.removeprefix("file-").removesuffix("o")
        rec = self._jobs.get(f"batch_{key}")
        if rec is None or rec["kind"] != "batch" or rec.get("output_file_id") != file_id:
            return None
        if rec["status"] in FINAL:  # finalized, and its file deleted since
            return None
        return rec

    def _live_order(self, rec: dict[str, Any]) -> ShardOrder:
        with self._lock:
            order = self._live.get(rec["id"])
            if order is None:
                config = Config.model_validate(rec["config"])
                output = JobOutput(rec["output_root"], rec["id"], config.output.format)
                order = self._live[rec["id"]] = ShardOrder(output.fs, rec["endpoint"])
            return order

    def _observe(self, rec: dict[str, Any]) -> None:
        """Add a batch's newly committed shards to the end of its output file's layout (the
        order they were first seen committed, kept in the record, so the file's bytes never
        move under a reader); the batch gets its ``output_file_id`` with its first shard."""
        shards = ray.get(self._queue.committed_shards.remote(rec["id"]), timeout=60)
        with self._lock:
            self._shard_paths[rec["id"]] = {int(s["n"]): str(s["path"]) for s in shards}
            order = rec.setdefault("shard_order", [])
            known = set(order)
            new = sorted(int(s["n"]) for s in shards if int(s["n"]) not in known)
            if not new:
                return
            order.extend(new)
            if rec.get("output_file_id") is None:
                rec["output_file_id"] = f"file-{rec['id'].removeprefix('batch_')}o"
            self._registry.save(rec)

    def _order_paths(self, rec: dict[str, Any]) -> list[str]:
        with self._lock:
            paths = self._shard_paths.get(rec["id"], {})
            order = list(rec.get("shard_order") or ())
        if any(n not in paths for n in order):  # a restarted Controller: ask the queue
            self._observe(rec)
            with self._lock:
                paths = self._shard_paths[rec["id"]]
        return [paths[n] for n in order]

    def _live_doc(self, rec: dict[str, Any]) -> dict[str, Any]:
        size = self._live_order(rec).size(self._order_paths(rec))
        return {
            "id": rec["output_file_id"],
            "object": "file",
            "bytes": size,
            "created_at": rec["times"].get("in_progress_at") or rec["created_at"],
            "filename": f"{rec['id']}_output.jsonl",
            "purpose": "batch_output",
            "status": "uploaded",
            "status_details": "the batch is running: more lines come as its results commit",
            "expires_at": self._output_expiry(rec),
        }

    @staticmethod
    def _output_expiry(rec: dict[str, Any]) -> int | None:
        seconds = rec.get("output_expires_after_s")
        return None if seconds is None else int(rec["created_at"]) + int(seconds)

    def delete_file(self, file_id: str) -> bool:
        if not self._files.delete(file_id):
            raise not_found("file", file_id)
        return True

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:
                logger.exception("controller tick failed")
            self._wake.wait(TICK_S)
            self._wake.clear()

    def _tick(self) -> None:
        stats: dict[str, dict[str, Any]] = ray.get(self._queue.stats.remote(), timeout=60)["jobs"]
        now = time.monotonic()
        with self._lock:
            for rec in self._jobs.values():
                if rec["id"] in stats:
                    rec["stats"] = stats[rec["id"]]
            watched = [
                r
                for r in self._jobs.values()
                if r["status"] in ACTIVE or (r["kind"] == "native" and r["status"] == "completed")
            ]
        for rec in watched:
            st = stats.get(rec["id"])
            if st is not None:
                tracker = self._trackers.get(rec["id"]) or self._trackers.setdefault(
                    rec["id"], _tracker(rec["config"])
                )
                progress = tracker.update(now, st, finalizing=rec["status"] == "finalizing")
                self._progress[rec["id"]] = progress.as_dict()
            try:
                self._advance(rec, stats.get(rec["id"]))
            except Exception:
                logger.exception("job %s: cannot advance from %s", rec["id"], rec["status"])
        self._measure(stats, now)
        with self._lock:
            live = [self._progress[r["id"]] for r in watched if r["id"] in self._progress]
            self._history.add(time.time(), live)
        record_ray_metrics(stats, self._progress, self._jobs)
        self._size_pools(stats, now)
        if now - self._swept_at >= SWEEP_S:
            self._swept_at = now
            self.sweep_files()
            if pruned := self._registry.outbox.prune(time.time() - KEEP_S):
                logger.info("janitor: deleted %d settled webhook row(s) past their keep", pruned)

    def _measure(self, stats: dict[str, dict[str, Any]], now: float) -> None:
        self._backlog = sum(s["pending"] for s in stats.values() if s["state"] == "active")
        settled = sum(s["done"] + s["dead"] for s in stats.values())
        t0, n0 = self._settled
        if t0 and now > t0:
            rate = max(0.0, (settled - n0) / (now - t0))
            self._items_per_s = 0.8 * self._items_per_s + 0.2 * rate
        self._settled = (now, settled)

    def _advance(self, rec: dict[str, Any], st: dict[str, Any] | None) -> None:
        status = rec["status"]
        expires_at = rec.get("expires_at")
        if status == "validating" and expires_at and time.time() >= expires_at:
            with self._lock:  # expiry holds in every state, even before the lines are in
                rec["end_reason"] = "expired"
                self._set(rec, "expiring")
            if st is not None:
                ray.get(self._queue.set_job_state.remote(rec["id"], "cancelled", "expired"))
            return
        if status == "validating":
            self._start_batch(rec)
            return
        if st is None:
            if status == "cancelling":  # cancelled before it reached the queue
                self._set(rec, "cancelled", "cancelled")
            elif status == "expiring":
                self._set(rec, "expired", "expired")
            return
        settled = st["pending"] + st["leased"] == 0
        if (
            rec["kind"] == "batch"
            and status in ("running", "cancelling", "expiring")
            and self._observed.get(rec["id"]) != st["done"]  # a shard committed since
        ):
            self._observe(rec)
            self._observed[rec["id"]] = st["done"]
        if status in ("queued", "running", "completed"):
            if expires_at and time.time() >= expires_at and not settled:
                with self._lock:
                    if rec["status"] != status:
                        return
                    rec["end_reason"] = "expired"
                    self._set(rec, "expiring")
                ray.get(self._queue.set_job_state.remote(rec["id"], "cancelled", "expired"))
                return
            if st["total"] == 0:
                return
            if not settled:
                if status != "running":
                    started = rec["times"].get("in_progress_at")
                    self._set(rec, "running", None if started else "in_progress", expect=status)
                return
            if status == "completed" and rec.get("finalized_total") == st["total"]:
                return
            if not self._set(rec, "finalizing", "finalizing", expect=status):
                return
            status = "finalizing"
        if status == "finalizing" and settled:
            # Settled at the tick's snapshot; a redrive may have come since (before the move to
            # finalizing, which refuses later ones): look again before writing the files.
            st = ray.get(self._queue.stats.remote(rec["id"]))
            if st["pending"] + st["leased"]:
                self._set(rec, "running", expect="finalizing")
                return
            self._finalize(rec, st, "completed")
        elif status == "cancelling" and settled:
            self._finalize(rec, st, "cancelled")
        elif status == "expiring" and settled:
            self._finalize(rec, st, "expired")

    def _start_batch(self, rec: dict[str, Any]) -> None:
        """Check the batch's file as OpenAI does; when it is clean, create the job in the queue
        and enqueue every line (idempotent, so a restart mid-way just enqueues again)."""
        config = Config.model_validate(rec["config"])
        path = self._files.path(rec["input_file_id"])
        if not path.is_file():
            rec["errors"] = {
                "object": "list",
                "data": [
                    {
                        "code": "file_not_found",
                        "message": f"input file {rec['input_file_id']} no longer exists",
                        "param": "input_file_id",
                        "line": None,
                    }
                ],
            }
            self._set(rec, "failed", "failed")
            return
        check = check_batch_file(path, rec["endpoint"], config)
        if check.errors:
            rec["errors"] = {"object": "list", "data": check.errors}
            self._set(rec, "failed", "failed")
            logger.info("batch %s failed validation: %d error(s)", rec["id"], check.error_count)
            return
        rec["estimate"] = self._estimate(config, path, rec["endpoint"])  # job.json shows it
        spec = job_spec(config, rec["id"], rec["output_root"])
        # Its dead letters are redriven only through here (see redrive), never behind the
        # back of its output and error files.
        spec = dataclasses.replace(spec, settings={**spec.settings, "kind": "openai_batch"})
        ray.get(self._queue.create_job.remote(spec))
        # Paused until every line is in: a batch that fails half-way has run none of them.
        ray.get(self._queue.set_job_state.remote(rec["id"], "paused"))
        try:
            for chunk, lines in batch_items(path, rec["endpoint"], config):
                try:
                    ray.get(self._queue.enqueue.remote(rec["id"], chunk))
                except QueueError:
                    if rec["status"] in _ENDING:  # cancelled or expired meanwhile: no more lines
                        break
                    self._refused_lines(rec, chunk, lines)
                    raise
        except (QueueError, ValueError) as exc:
            ray.get(self._queue.set_job_state.remote(rec["id"], "cancelled"))
            if not rec.get("errors"):
                error = {"code": "enqueue_failed", "message": str(exc)[:2000]}
                rec["errors"] = {"object": "list", "data": [{**error, "param": None, "line": None}]}
            self._set(rec, "failed", "failed")
            logger.warning("batch %s failed while enqueued: %s", rec["id"], exc)
            return
        rec["model"] = check.model
        with self._lock:
            ending = _ENDING.get(rec["status"])
            if ending is None:
                self._set(rec, "running", "in_progress")
        with contextlib.suppress(QueueError):  # cancelled already: it stays so
            if ending is None:
                ray.get(self._queue.set_job_state.remote(rec["id"], "active"))
            else:
                ray.get(self._queue.set_job_state.remote(rec["id"], "cancelled", ending))
        self._wake.set()

    def _refused_lines(self, rec: dict[str, Any], chunk: list[Any], lines: list[int]) -> None:
        """The queue refused a chunk (it refuses a call whole): find its lines one by one, and
        record them as the batch's errors, as OpenAI's validation names lines."""
        errors = []
        for item, line in zip(chunk, lines, strict=True):
            try:
                ray.get(self._queue.enqueue.remote(rec["id"], [item]))
            except QueueError as exc:
                message = str(getattr(exc, "cause", exc)).removeprefix(
                    "enqueue refused, nothing accepted: "
                )
                errors.append(
                    {"code": "invalid_request", "message": message, "param": None, "line": line}
                )
            if len(errors) >= 100:
                break
        if errors:
            rec["errors"] = {"object": "list", "data": errors}

    def _finalize(self, rec: dict[str, Any], st: dict[str, Any], final: str) -> None:
        """Errors shard, manifest and job.json; for a batch, its output and error files."""
        config = Config.model_validate(rec["config"])
        job_id = rec["id"]
        output = JobOutput(rec["output_root"], job_id, config.output.format)
        finalize(self._queue, output, job_id, st)
        summary = _job_summary(rec, st, config, final)
        ran_s = time.time() - rec["created_at"] if rec["kind"] == "batch" else None
        store = MeasurementStore(self.state_dir / "measurements")
        plan = rec.get("estimate")
        summary.update(
            job_report(
                job_id,
                config,
                plan,
                {},
                st,
                ran_s,
                {},
                summary["cost"],
                store,
                final == "completed",
            )
        )
        output.write_json(output.job_json, summary)
        if rec["kind"] == "batch":
            # The output file is the lines a reader may have had while the batch ran, in the
            # same order, then the rest.
            self._observe(rec)
            paths = self._order_paths(rec)
            key = job_id.removeprefix("batch_")  # produced files get ids derived from the batch
            expires_at = self._output_expiry(rec)
            rec["output_file_id"] = self._put_output(
                f"file-{key}o",
                f"{job_id}_output.jsonl",
                self._live_order(rec).chunks(paths),
                expires_at,
            )
            rec["error_file_id"] = self._put_output(
                f"file-{key}e",
                f"{job_id}_error.jsonl",
                error_jsonl(output.base, rec["end_reason"]),
                expires_at,
            )
            with self._lock:
                self._live.pop(job_id, None)
                self._shard_paths.pop(job_id, None)
                self._observed.pop(job_id, None)
        rec["finalized_total"] = st["total"]
        self._set(rec, final, final)

    def _estimate(self, config: Config, path: Path, endpoint: str) -> dict[str, Any] | None:
        """A checked batch file's estimate (None, logged, where none can be made)."""
        try:
            pairs = (
                (it.pool, it.payload)
                for chunk, _ in batch_items(path, endpoint, config)
                for it in chunk
            )
            return server_estimate(config, pairs, self.state_dir, self._fleet.snapshot())
        except Exception as exc:
            logger.warning("no estimate of %s: %s", path, exc)
            return None

    def _put_output(
        self, file_id: str, filename: str, chunks: Iterator[bytes], expires_at: int | None
    ) -> str | None:
        first = next(chunks, None)
        if first is None:
            self._files.delete(file_id)
            return None
        self._files.put(
            itertools.chain([first], chunks),
            filename=filename,
            purpose="batch_output",
            file_id=file_id,
            expires_at=expires_at,
        )
        return file_id

    # ------------------------------------------------------------------ worker pools
    def _size_pools(self, stats: dict[str, dict[str, Any]], now: float) -> None:
        configs: dict[str, Config] = {}
        with self._lock:
            recs = [r for r in self._jobs.values() if r["id"] in stats]
            known = set(self._jobs)
        busy = [r for r in recs if stats[r["id"]]["pending"] + stats[r["id"]]["leased"]]
        job_configs = [(rec["id"], rec["config"]) for rec in busy]
        # On a shared queue, jobs another cluster's server took: this cluster helps drain them
        # (their own server tracks, finalizes and answers for them).
        for job_id, st in stats.items():
            if job_id not in known and st["state"] == "active" and st["pending"] + st["leased"]:
                config = self._foreign_config(job_id)
                if config is not None:
                    job_configs.append((job_id, config))
        for job_id, config in job_configs:
            for pool in stats[job_id].get("pools", {}):
                if pool not in configs:
                    pools = Config.model_validate(config).pools()
                    if pool in pools:
                        configs[pool] = pools[pool]
        self._fleet.size(stats, configs, job_deadlines(busy), now, time.time())

    def _foreign_config(self, job_id: str) -> dict[str, Any] | None:
        """The config of a job in the queue that this Controller did not create: stored with
        the job on a shared queue (``queue.shared``); None where there is none to run it by."""
        if job_id not in self._foreign:
            spec = ray.get(self._queue.job_spec.remote(job_id), timeout=60)
            config = spec.settings.get("config")
            self._foreign[job_id] = config
            if config is not None:
                logger.info(
                    "job %s: another server's, on the shared queue; helping drain it", job_id
                )
        return self._foreign[job_id]

    def _release_lost_workers(self) -> None:
        """Workers of a previous incarnation die with it: make sure they are gone (one may
        still be leasing until Ray notices its owner died), then hand their leases back now
        rather than after the lease period (an attempt is charged, as for any lost worker)."""
        worker_ids = self._registry.workers()
        survivors = []
        for worker_id in worker_ids:
            with contextlib.suppress(ValueError):  # not alive: the usual case
                handle = ray.get_actor(worker_id, namespace=NAMESPACE)
                ray.kill(handle, no_restart=True)
                survivors.append(handle)
        deadline = time.monotonic() + 30
        for handle in survivors:
            while time.monotonic() < deadline:
                try:
                    ray.get(handle.pid.remote(), timeout=2)
                except ray.exceptions.RayActorError:
                    break  # dead: it leases nothing more
                except ray.exceptions.GetTimeoutError:
                    continue
                time.sleep(0.1)
        for worker_id in worker_ids:
            released = ray.get(self._queue.release_worker.remote(worker_id, "worker_lost"))
            logger.info("released leases of lost worker=%s items=%d", worker_id, released)
        self._registry.remove_workers(worker_ids)


def _expired(file_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"file {file_id} has expired", param, "file_expired")


def _check_upload(filename: str, purpose: str | None) -> None:
    """400 for what the Batch API refuses: a purpose other than batch, a name not .jsonl."""
    if purpose is not None and purpose != "batch":
        raise ApiError(
            400, f"purpose must be 'batch', got {purpose!r}", "purpose", "invalid_purpose"
        )
    if not filename.endswith(".jsonl"):
        raise ApiError(
            400,
            "Invalid file format for Batch API. Must be .jsonl",
            "file",
            "invalid_file_format",
        )


@contextlib.contextmanager
def _quota() -> Iterator[None]:
    """The file store's QuotaExceeded as a 429."""
    try:
        yield
    except QuotaExceeded as exc:
        raise ApiError(429, f"{exc}; delete files to make room", None, "quota_exceeded") from None


def _redacted(config: dict[str, Any]) -> dict[str, Any]:
    """A job's config as it is recorded: without the server's API tokens."""
    api = config.get("api")
    if isinstance(api, dict) and api.get("tokens"):
        config = {**config, "api": {**api, "tokens": []}}
    return config


def _check_job_id(job_id: str, output_root: str) -> None:
    """400 unless ``job_id`` is an id the output layout takes (a folder of its own)."""
    try:
        if not CUSTOM_ID.fullmatch(job_id):
            raise OutputError(f"job_id must match {CUSTOM_ID.pattern}")
        JobOutput(output_root, job_id)
    except OutputError as exc:
        raise ApiError(400, f"job_id {job_id[:140]!r}: {exc}", "job_id", "invalid_id") from None


def _tracker(config_data: dict[str, Any]) -> Tracker:
    """A job's progress tracker: at its price per hour, or each model's for several."""
    config = Config.model_validate(config_data)
    models = model_prices(config) if config.engines else None
    return Tracker(
        cost_per_hour=config.scaling.cost_per_gpu_hour,
        models=models,
        token_prices=config.token_prices(),
    )


def _job_summary(rec: dict[str, Any], st: dict[str, Any], config: Config, final: str) -> dict:
    busy_s = float(st.get("busy_s", 0.0))
    return {
        "job_id": rec["id"],
        "kind": rec["kind"],
        "state": final,
        "total": st["total"],
        "done": st["done"],
        "dead": st["dead"],
        "prompt_tokens": st["prompt_tokens"],
        "completion_tokens": st["completion_tokens"],
        "busy_s": busy_s,
        "cost": job_cost(st, config.scaling.cost_per_gpu_hour, config.token_prices())[0],
        "model": config.engine.model,
        "lease_expiries": st["lease_expiries"],
        "created_at": datetime.fromtimestamp(rec["created_at"], UTC).isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
    }


def get_or_create_controller(state_dir: str | Path, webhooks: WebhookSettings | None = None) -> Any:
    """The cluster's Controller actor, created on the head node (where its state lives) when it
    does not exist yet, delivering webhooks by ``webhooks`` (the server config's endpoints; their
    secrets come from the Controller's environment). The WorkQueue must exist first."""
    head = head_node_id()
    actor_cls = ray.remote(Controller)
    handle: Any = actor_cls.options(
        name=CONTROLLER_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,
        max_concurrency=32,
        num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=head, soft=False),
    ).remote(str(state_dir), webhooks)
    try:
        running = ray.get(handle.ping.remote())
    except ray.exceptions.ActorDiedError as exc:  # its __init__ refused the config: say why
        refused = re.search(r"inference\.errors\.ConfigError: (.+)", str(exc))
        if refused is None:
            raise
        raise ConfigError(refused[1]) from None
    if running != str(state_dir):
        logger.warning(
            "the cluster's Controller keeps its state in %s, not in %s as this config says",
            running,
            state_dir,
        )
    wanted = [e.url for e in (webhooks or WebhookSettings()).endpoints]
    serving = ray.get(handle.webhook_urls.remote())
    if serving != wanted:
        logger.warning(
            "the cluster's Controller delivers webhooks to %s, not to %s as this config says "
            "(it keeps the endpoints it was started with)",
            serving or "no endpoint",
            wanted or "no endpoint",
        )
    return handle


def get_controller() -> Any:
    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        raise ApiError(503, "no Controller runs on this Ray cluster") from None
