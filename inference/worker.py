"""``InferenceWorker``: one Ray actor per GPU (or per CPU slot) that keeps its engine busy.

Three threads, so the engine never waits on the queue or on storage:

- the **lease thread** leases items ahead of the engine (``prefetch_batches`` worth), prepares
  them (tokenize, context check) into the :class:`~inference.batching.Batcher`, and heartbeats
  every lease the worker holds;
- the **engine loop** (the ``run`` call) takes batches and runs them in isolation; or, for an
  engine with its own scheduler (vLLM, a
  :class:`~inference.engines.base.ContinuousEngine`), submits each prepared item as soon as
  the engine has room (``max_batch_size`` requests and ``max_batch_tokens`` in flight) and
  takes every result from the step that finished it, so no item waits on a batch's longest;
- the **writer thread** collects results per job and commits shards through the WorkQueue's
  commit protocol (declare, write and fsync, publish and complete).

``drain`` stops leasing, finishes what is held, commits, and returns; ``stop`` releases what is
not finished (no attempt charged) and returns. When the engine dies (engine-fatal), what was
computed is still committed, everything else the worker holds goes back to the queue with no
attempt charged (cause ``engine_fatal``: the engine's fault, not the items'), and ``run``
raises so that the pool replaces the worker. When one of the worker's own threads fails (any
exception from a queue call, a write, a bug), the worker stops at once rather than lease and
heartbeat what it can no longer commit: what it holds is failed back to the queue with the
reason (an attempt charged, so a cause that repeats ends in the dead letters) and ``run`` raises
:class:`~inference.errors.WorkerError`, which the pool counts as a lost worker and replaces.

An item leased as a *suspect* (a worker was lost, or its lease expired, while it held the item
before) may be a poison item that kills its process. With an engine that runs in the worker's
process (transformers, vLLM) it never runs beside other items: the worker stops leasing, gives
back what it had not started (no attempt charged), commits every result it holds, and only then
runs the suspect alone and commits it. A poison item then kills its worker alone and reaches the
dead letters after ``max_attempts``, while the items that shared its first batch complete
(split and retry)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import ray

from inference.batching import Batcher
from inference.config import Config
from inference.engines import ContinuousEngine, Prepared, is_continuous, make_engine
from inference.errors import (
    EngineFatalError,
    InferenceError,
    ItemError,
    PermanentError,
    WorkerError,
)
from inference.faults import arm_item_faults, fault
from inference.heap import freeze_startup_heap
from inference.packing import run_packed
from inference.queue.actor import get_queue
from inference.queue.store import LeasedItem, LeaseToken
from inference.schema import Result, choices_column, decode_item
from inference.shards import JobOutput, results_table

logger = logging.getLogger(__name__)

_IDLE_POLL_S = (0.02, 0.5)  # lease poll interval when the queue is empty: grows from..to


@dataclass
class _Pending:
    """Results of one job waiting for their shard."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[LeaseToken] = field(default_factory=list)
    since: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0


class InferenceWorker:
    """Leases items, batches them through an engine, commits shards."""

    def __init__(self, worker_id: str, config: Config, pool: str = "default") -> None:
        logging.basicConfig(level=logging.INFO)
        self.worker_id = worker_id
        self.config = config
        self.pool = pool
        self.lease_s = config.queue.lease_s
        self.queue = get_queue()
        self.engine = arm_item_faults(
            make_engine(config.engine, config.batching, config.limits, worker_id, pool)
        )
        b = config.batching
        size = self.engine.max_batch_size
        if not config.engine.remote:  # a remote engine's in-flight limit is its concurrency
            size = min(b.max_batch_size, size)
        self.batcher = Batcher(size, b.max_batch_tokens, b.max_wait_ms)
        self.prefetch_items = size * b.prefetch_batches
        self.continuous = is_continuous(self.engine)
        self._held: dict[LeaseToken, str] = {}  # token -> job id, everything leased and unsettled
        self._held_lock = threading.Lock()
        self._suspects: deque[Prepared] = deque()  # run alone, one at a time (see above)
        # A remote engine runs nothing of an item in this process, so no item can crash it:
        # alone, a suspect would only cost a request or a provider batch of its own.
        self._isolate_suspects = not config.engine.remote
        self._isolating = threading.Event()  # a suspect runs: the lease thread leases nothing
        self._pending: dict[str, _Pending] = defaultdict(_Pending)
        self._pending_lock = threading.Lock()
        self._outputs: dict[str, JobOutput] = {}
        self._settings: dict[str, dict[str, Any]] = {}
        self._draining = threading.Event()
        self._stopping = threading.Event()
        self._queue_empty = threading.Event()
        self._flush_now = threading.Event()
        self._writer_stop = threading.Event()
        self._state = "starting"
        self._counters = {
            "batches": 0,
            "items": 0,
            "errors": 0,
            "shards": 0,
            "busy_s": 0.0,
            "last_batch_size": 0,
            "last_batch_tokens": 0,
        }
        self._fatal: str | None = None
        self._failure: str | None = None  # a thread of the worker failed: the worker must go
        self.node = socket.gethostname()
        freeze_startup_heap()  # the engine and its model live as long as the worker
        logger.info("worker ready worker=%s pool=%s pid=%d", worker_id, pool, os.getpid())

    # ------------------------------------------------------------------ control
    def info(self) -> dict[str, Any]:
        with self._held_lock:
            held = len(self._held)
        return {
            "worker": self.worker_id,
            "pool": self.pool,
            "state": "draining"
            if self._draining.is_set() and self._state in ("busy", "leasing")
            else self._state,
            "node": self.node,
            "pid": os.getpid(),
            "held": held,
            "buffered": len(self.batcher) + len(self._suspects),
            "in_flight": self.engine.in_flight() if self.continuous else 0,  # type: ignore[attr-defined]
            "gpus": ray.get_gpu_ids(),
            "fatal": self._fatal or self._failure,
            **self._counters,
        }

    def pid(self) -> int:
        return os.getpid()

    def drain(self) -> None:
        """Stop leasing; finish and commit what is held; then ``run`` returns."""
        self._draining.set()

    def stop(self) -> None:
        """Stop soon: release what is not finished (no attempt charged)."""
        self._stopping.set()
        self._draining.set()

    def _die(self, reason: str) -> None:
        """A thread of the worker failed: stop everything; ``run`` fails what is held."""
        if self._failure is None:
            self._failure = reason
            logger.error("worker failed worker=%s: %s", self.worker_id, reason, exc_info=True)
        self._stopping.set()
        self._draining.set()
        self._flush_now.set()

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict[str, Any]:
        """The engine loop. Returns the worker's counters when drained or stopped."""
        lease_thread = threading.Thread(target=self._lease_loop, name="lease", daemon=True)
        writer_thread = threading.Thread(target=self._writer_loop, name="writer", daemon=True)
        lease_thread.start()
        writer_thread.start()
        try:
            if self.continuous:
                self._feed(lease_thread)
            else:
                self._batches(lease_thread)
        except EngineFatalError as exc:
            self._fatal = str(exc)
            logger.error("engine fatal worker=%s: %s", self.worker_id, exc)
            self._stopping.set()
        except Exception as exc:
            self._die(f"engine loop failed: {exc!r}")
        finally:
            self._draining.set()
            lease_thread.join()
            cause = "engine_fatal" if self._fatal else "drained"
            unstarted = self.batcher.drain() + (self._engine_abort() if self.continuous else [])
            unstarted += self._take_suspects()
            if self._failure is None:
                self._release(unstarted, cause)
            self._writer_stop.set()
            writer_thread.join()
            if self._failure is not None:
                self._fail_held(self._failure)
            elif self._fatal:
                self._release_held("engine_fatal")  # e.g. the batch the engine died under
            self._close_engine()
            self._state = "failed" if self._failure else "stopped"
        if self._failure is not None:
            raise WorkerError(self._failure)
        if self._fatal:
            raise EngineFatalError(self._fatal)
        return self.info()

    def _batches(self, lease_thread: threading.Thread) -> None:
        """Batch at a time: the fullest batch the buffer gives, run in isolation."""
        while not self._stopping.is_set():
            if self._suspects:
                self._isolate()
                continue
            batch = self.batcher.take()
            if batch:
                self._state = "busy"
                self._run_batch(batch)
                continue
            self._state = "leasing"
            if self._draining.is_set() and not lease_thread.is_alive() and not self._suspects:
                break
            if self._queue_empty.is_set():
                self._flush_now.set()  # nothing more is coming soon: commit what we have

    def _feed(self, lease_thread: threading.Thread) -> None:
        """Continuous feeding: top the engine up to its in-flight limits between steps, and
        take each result as soon as its step reports it."""
        engine: ContinuousEngine = self.engine  # type: ignore[assignment]
        wait_s = self.batcher.max_wait_s
        unassigned_s = 0.0  # engine time not yet charged to a finished item
        while not self._stopping.is_set():
            in_flight = engine.in_flight()
            # A continuous engine's in-flight limits are the batcher's batch limits.
            if self._suspects and not in_flight:
                self._isolate()
                continue
            room = self.batcher.max_batch_size - in_flight
            budget = self.batcher.max_batch_tokens - engine.in_flight_tokens()
            if not self._suspects and room > 0 and (budget > 0 or not in_flight):
                new = self.batcher.take_fill(room, budget, 0.0 if in_flight else wait_s)
                if new:
                    refused = engine.submit(new)
                    if refused:
                        self._fail([(item.key, error) for item, error in refused])
            if not engine.in_flight():
                self._state = "leasing"
                if (
                    self._draining.is_set()
                    and not lease_thread.is_alive()
                    and not self.batcher
                    and not self._suspects
                ):
                    return
                if self._queue_empty.is_set():
                    self._flush_now.set()
                continue
            self._state = "busy"
            started = time.monotonic()
            in_flight = engine.in_flight()
            finished = engine.step()
            elapsed = time.monotonic() - started
            self._counters["busy_s"] += elapsed
            unassigned_s += elapsed
            if not finished:
                continue
            self._counters["batches"] += 1
            self._counters["items"] += len(finished)
            self._counters["last_batch_size"] = in_flight
            self._counters["last_batch_tokens"] = engine.in_flight_tokens()
            self._settle(finished, unassigned_s / len(finished))
            unassigned_s = 0.0

    def _close_engine(self) -> None:
        """Let the engine end its own processes (vLLM's core) before the actor is killed."""
        try:
            self.engine.close()
        except Exception as exc:
            logger.warning("engine close failed worker=%s: %s", self.worker_id, exc)

    # ------------------------------------------------------------------ suspects
    def _take_suspects(self) -> list[Prepared]:
        taken: list[Prepared] = []
        while self._suspects:
            taken.append(self._suspects.popleft())
        return taken

    def _isolate(self) -> None:
        """Run the next suspect with nothing else held: what was waiting goes back uncharged
        (other suspects too: the queue leases a suspect alone, but a worker does not count on
        it) and every result is committed first, so a suspect that kills the process takes
        only itself down; its own result is committed before anything else is leased."""
        self._isolating.set()  # before the suspect leaves the deque the lease thread watches
        try:
            item = self._suspects.popleft()
            self._release(self.batcher.drain() + self._take_suspects())
            if not self._settle_held(keep={item.key.token}):
                self._suspects.appendleft(item)  # stopping: run() hands it back with the rest
                return
            logger.info(
                "running a suspect alone worker=%s item=%s", self.worker_id, item.extra["item_id"]
            )
            self._state = "busy"
            if self.continuous:
                self._run_alone(item)
            else:
                self._run_batch([item])
            self._settle_held(keep=set())
        finally:
            self._isolating.clear()

    def _settle_held(self, keep: set[LeaseToken]) -> bool:
        """Wait until the writer has committed every result: nothing is held but ``keep``.
        False when the worker stops first."""
        while not self._stopping.is_set():
            with self._held_lock:
                if set(self._held) <= keep:
                    return True
            self._flush_now.set()
            time.sleep(0.01)
        return False

    def _run_alone(self, item: Prepared) -> None:
        """A continuous engine with one request in it, stepped until it is done."""
        engine: ContinuousEngine = self.engine  # type: ignore[assignment]
        refused = engine.submit([item])
        if refused:
            self._fail([(it.key, error) for it, error in refused])
            return
        started = time.monotonic()
        finished: list[tuple[Prepared, Result | ItemError]] = []
        while engine.in_flight() and not self._stopping.is_set():
            finished += engine.step()
        elapsed = time.monotonic() - started
        self._counters["busy_s"] += elapsed
        if finished:
            self._counters["batches"] += 1
            self._counters["items"] += len(finished)
            self._settle(finished, elapsed / len(finished))

    def _engine_abort(self) -> list[Prepared]:
        engine: ContinuousEngine = self.engine  # type: ignore[assignment]
        try:
            return engine.abort()
        except Exception as exc:
            logger.warning("engine abort failed worker=%s: %s", self.worker_id, exc)
            return []

    def _settle(self, finished: list[tuple[Prepared, Result | ItemError]], busy_s: float) -> None:
        """Results to their job's pending shard, errors to the queue."""
        now = datetime.now(UTC)
        failures: list[tuple[LeasedItem, ItemError]] = []
        with self._pending_lock:
            for item, result in finished:
                leased: LeasedItem = item.key
                if isinstance(result, ItemError):
                    failures.append((leased, result))
                    continue
                self._add_row(leased, result, item, now, busy_s)
        if failures:
            self._fail(failures)

    def _run_batch(self, batch: list[Prepared]) -> None:
        start = time.monotonic()
        results = run_packed(self.engine, batch, self._pack_size)
        elapsed = time.monotonic() - start
        self._counters["batches"] += 1
        self._counters["items"] += len(batch)
        self._counters["busy_s"] += elapsed
        self._counters["last_batch_size"] = len(batch)
        self._counters["last_batch_tokens"] = sum(it.cost_tokens for it in batch)
        self._settle(list(zip(batch, results, strict=True)), elapsed / len(batch))

    def _add_row(
        self, leased: LeasedItem, result: Result, item: Prepared, now: datetime, busy_s: float
    ) -> None:
        pending = self._pending[leased.job_id]
        if not pending.rows:
            pending.since = time.monotonic()
        pending.rows.append(
            {
                "job_id": leased.job_id,
                "custom_id": leased.item_id,
                "output_text": result.output_text,
                "embedding": result.embedding,
                "choices": choices_column(result),
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "model": item.extra.get("model", self.engine.model_name),  # or its adapter
                "attempts": leased.attempts + 1,
                "worker": self.worker_id,
                "latency_ms": (time.monotonic() - item.extra["leased_at"]) * 1000.0,
                "completed_at": now,
                "url": item.extra.get("url"),
            }
        )
        pending.tokens.append(leased.token)
        pending.prompt_tokens += result.prompt_tokens
        pending.completion_tokens += result.completion_tokens
        pending.busy_s += busy_s

    # ------------------------------------------------------------------ leasing
    def _lease_loop(self) -> None:
        poll_s = _IDLE_POLL_S[0]
        last_beat = time.monotonic()
        try:
            while not self._draining.is_set():
                if time.monotonic() - last_beat > self.lease_s / 3:
                    self._heartbeat()
                    last_beat = time.monotonic()
                room = self.prefetch_items - len(self.batcher)
                if room <= 0 or self._suspects or self._isolating.is_set():
                    time.sleep(0.005)  # full, or a suspect runs with nothing else held
                    continue
                leased = ray.get(
                    self.queue.lease.remote(self.worker_id, room, None, self.lease_s, self.pool)
                )
                if not leased:
                    self._queue_empty.set()
                    time.sleep(poll_s)
                    poll_s = min(poll_s * 2, _IDLE_POLL_S[1])
                    continue
                self._queue_empty.clear()
                poll_s = _IDLE_POLL_S[0]
                self._accept(leased)
                fault("after_lease")
            # Drain: keep heartbeating until the engine loop has settled what we hold.
            while not self._stopping.is_set() and (
                len(self.batcher) or self._suspects or self._holding()
            ):
                if time.monotonic() - last_beat > self.lease_s / 3:
                    self._heartbeat()
                    last_beat = time.monotonic()
                self._flush_now.set()
                time.sleep(0.05)
        except Exception as exc:
            # Not a drain: the pool must see a lost worker and replace it.
            self._die(f"lease thread failed: {exc!r}")

    def _holding(self) -> bool:
        with self._held_lock:
            return bool(self._held)

    def _accept(self, leased: list[LeasedItem]) -> None:
        now = time.monotonic()
        prepared: list[Prepared] = []
        suspects: list[Prepared] = []
        refused: list[tuple[LeasedItem, ItemError]] = []
        with self._held_lock:
            for item in leased:
                self._held[item.token] = item.job_id
        for item in leased:
            self._job_settings(item.job_id)
            try:
                url, request = decode_item(item.payload)
                p = self.engine.prepare(request)
            except ItemError as exc:
                refused.append((item, exc))
                continue
            except Exception as exc:  # a tokenizer crash on odd input is the input's fault
                refused.append((item, PermanentError(f"cannot prepare: {exc}", "invalid_request")))
                continue
            p.key = item
            p.extra["url"] = url
            p.extra["leased_at"] = now
            p.extra["job"] = item.job_id
            p.extra["item_id"] = item.item_id
            (suspects if item.suspect and self._isolate_suspects else prepared).append(p)
        if refused:
            self._fail(refused)
        self.batcher.add(prepared)
        # After the others: the engine loop, seeing a suspect, gives back what the buffer holds.
        self._suspects.extend(suspects)

    def _heartbeat(self) -> None:
        with self._held_lock:
            tokens = list(self._held)
        if not tokens:
            return
        refused = ray.get(self.queue.extend.remote(tokens, self.lease_s))
        if refused:
            logger.warning("heartbeat: %d lease(s) lost worker=%s", len(refused), self.worker_id)

    def _fail(self, failures: list[tuple[LeasedItem, ItemError]]) -> None:
        groups: dict[tuple[str, str, str], list[LeaseToken]] = defaultdict(list)
        for leased, error in failures:
            groups[(error.kind, error.code, error.message)].append(leased.token)
        self._counters["errors"] += len(failures)
        for (kind, code, message), tokens in groups.items():
            ray.get(self.queue.fail.remote(tokens, kind, code, message))
        self._forget(t for group in groups.values() for t in group)

    def _release(self, items: list[Prepared], cause: str = "drained") -> None:
        tokens = [it.key.token for it in items]
        if tokens:
            ray.get(self.queue.release.remote(tokens, cause))
            self._forget(tokens)

    def _fail_held(self, reason: str) -> None:
        """Everything the worker holds goes back with an attempt charged and the reason (so
        the dead letter of an item that keeps failing this way says why)."""
        with self._held_lock:
            tokens = list(self._held)
        if not tokens:
            return
        try:
            ray.get(self.queue.fail.remote(tokens, "transient", "worker_error", reason))
        except Exception as exc:  # the queue is unreachable: the pool's release_worker charges
            logger.error("cannot fail the leases of worker=%s: %s", self.worker_id, exc)
            return
        self._forget(tokens)

    def _release_held(self, cause: str) -> None:
        with self._held_lock:
            tokens = list(self._held)
        if tokens:
            ray.get(self.queue.release.remote(tokens, cause))
            self._forget(tokens)

    def _forget(self, tokens: Any) -> None:
        with self._held_lock:
            for token in tokens:
                self._held.pop(token, None)

    # ------------------------------------------------------------------ shards
    def _job_settings(self, job_id: str) -> dict[str, Any]:
        if job_id not in self._settings:
            spec = ray.get(self.queue.job_spec.remote(job_id))
            self._settings[job_id] = spec.settings
            if self.continuous and int(spec.settings.get("pack_items", 1)) > 1:
                logger.warning(
                    "job=%s: batching.pack_items is ignored by an engine fed continuously "
                    "(its scheduler batches requests itself)",
                    job_id,
                )
            self._outputs[job_id] = JobOutput(
                spec.settings["output_path"], job_id, spec.settings.get("output_format", "parquet")
            )
        return self._settings[job_id]

    def _pack_size(self, item: Prepared) -> int:
        return int(self._settings[item.extra["job"]].get("pack_items", 1))

    def _writer_loop(self) -> None:
        try:
            self._write_until_stopped()
        except Exception as exc:
            self._die(f"writer thread failed: {exc!r}")

    def _write_until_stopped(self) -> None:
        while True:
            stop = self._writer_stop.is_set()
            if not stop:
                self._flush_now.wait(0.05)
            flush_all = stop or self._flush_now.is_set()
            self._flush_now.clear()
            with self._pending_lock:
                ready = [
                    (job_id, self._pending.pop(job_id))
                    for job_id, p in list(self._pending.items())
                    if p.rows and (flush_all or self._due(job_id, p))
                ]
            for job_id, pending in ready:
                self._commit(job_id, pending)
            if stop:
                with self._pending_lock:
                    if not any(p.rows for p in self._pending.values()):
                        return

    def _due(self, job_id: str, pending: _Pending) -> bool:
        settings = self._settings[job_id]
        if len(pending.rows) >= settings.get("rows_per_shard", 1000):
            return True
        return time.monotonic() - pending.since >= settings.get("max_shard_age_s", 30.0)

    def _commit(self, job_id: str, pending: _Pending) -> None:
        """Declare, write, fsync; the queue publishes and completes, or refuses if our leases
        are gone (then nothing is visible and the items belong to whoever holds them now).
        An unexpected exception leaves the items held: the worker fails them with its reason."""
        self._write_shard(job_id, pending)
        self._forget(pending.tokens)

    def _write_shard(self, job_id: str, pending: _Pending) -> None:
        output = self._outputs[job_id]
        declared = ray.get(self.queue.declare_shard.remote(job_id, pending.tokens, self.worker_id))
        lost = {r.token for r in declared.refused}
        keep = [i for i, t in enumerate(pending.tokens) if t not in lost]
        rows = [pending.rows[i] for i in keep]
        if not rows:
            ray.get(self.queue.abort_shard.remote(job_id, declared.n))
            return
        table = results_table(rows)
        fault("before_write")
        try:
            nbytes = output.write_table(table, declared.tmp_path)
        except (OSError, InferenceError) as exc:
            with contextlib.suppress(OSError):
                output.remove(declared.tmp_path)  # never leave a partial file behind
            ray.get(self.queue.abort_shard.remote(job_id, declared.n))
            tokens = [pending.tokens[i] for i in keep]
            logger.error("shard write failed job=%s: %s", job_id, exc)
            ray.get(self.queue.fail.remote(tokens, "transient", "output_error", str(exc)))
            return
        fault("after_write")
        result = ray.get(
            self.queue.commit_shard.remote(
                job_id,
                declared.n,
                len(rows),
                nbytes,
                {
                    "prompt_tokens": pending.prompt_tokens,
                    "completion_tokens": pending.completion_tokens,
                    "busy_s": pending.busy_s,
                },
            )
        )
        if result.committed:
            self._counters["shards"] += 1
        else:
            logger.warning("shard %s/%d refused: %s", job_id, declared.n, result.reason)
