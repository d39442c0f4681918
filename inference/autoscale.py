"""The autoscaling loop of one worker pool: the queue's backlog in, Ray's autoscaler and the
pool's workers out.

Each :meth:`Autoscaler.step` (every ``scaling.interval_s``; the Controller and ``inference run``
drive it):

1. reads the WorkQueue's stats for the pool's jobs and turns them into per-job, per-priority
   :class:`~inference.scaler.Backlog` entries (estimated tokens calibrated by what the job's
   completed items really cost), and feeds the :class:`~inference.scaler.ThroughputMeter`;
2. asks the policy (:func:`inference.scaler.decide`) for the worker count;
3. asks Ray's autoscaler for one bundle per worker
   (``ray.autoscaler.sdk.request_resources``), which adds nodes and keeps them;
4. starts ``InferenceWorker`` actors as that capacity arrives (never more than fit now, so no
   actor waits unplaced), and on a scale down **drains** workers: they stop leasing, finish and
   commit what they hold, hand back what they could not finish within ``drain_timeout_s`` (no
   attempt charged) and exit. Only once a worker has exited is the demand lowered, so Ray never
   removes a node under a worker that is still committing; idle nodes then go after the
   cluster's own ``idle_timeout_minutes``.

``request_resources`` replaces the cluster's previous request, so every pool of one process
shares one :class:`ResourceDemand`; run one scaling process per cluster (the Controller).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import ray

from inference.config import Config, ScalingConfig, overflow_pool
from inference.pool import STOP_GRACE_S, WorkerPool, free_placement, placement_bundles
from inference.scaler import (
    Backlog,
    Decision,
    OverflowShare,
    Policy,
    ScalerInput,
    ThroughputMeter,
    backlog_entries,
    deadline_needs,
    decide,
    jobs_of_pool,
    overflow_moves,
)

logger = logging.getLogger(__name__)

PLACEMENT_GRACE_S = 2.0  # a worker this young may not show in the available resources yet
THROUGHPUT_HALFLIFE_S = 60.0

Bundle = dict[str, float]


def _with_overflow(local: dict[str, Any] | None, remote: dict[str, Any] | None) -> dict[str, Any]:
    """A job's stats in a pool with its overflow items' pending figures added (what the pool
    would have to do were they back)."""
    base = dict(local or remote or {})
    if local is None or remote is None:
        if local is None:
            base["leased"] = 0  # those are being done remotely
        return base
    base["pending"] = int(local["pending"]) + int(remote["pending"])
    base["pending_tokens"] = int(local["pending_tokens"]) + int(remote["pending_tokens"])
    by_priority = dict(local.get("pending_by_priority") or {})
    for priority, n in (remote.get("pending_by_priority") or {}).items():
        by_priority[priority] = by_priority.get(priority, 0) + n
    base["pending_by_priority"] = by_priority
    return base


def worker_bundle(scaling: ScalingConfig) -> Bundle:
    """The resources of one worker, as a bundle for Ray's autoscaler."""
    bundle: Bundle = {}
    if scaling.gpus_per_worker > 0:
        bundle["GPU"] = scaling.gpus_per_worker
    if scaling.cpus_per_worker > 0:
        bundle["CPU"] = scaling.cpus_per_worker
    return bundle or {"CPU": 1.0}


def worker_demand(config: Config) -> list[Bundle]:
    """What one worker asks of Ray's autoscaler. A multi-GPU worker (one GPU per rank) is
    ``scaling.gpus_per_worker`` = tensor x pipeline parallel GPUs: with ``STRICT_PACK`` one
    bundle of them all (its ranks need one node that has them), otherwise its placement group's
    bundles, which may land on several nodes."""
    bundles = placement_bundles(config)
    if bundles is None or config.scaling.placement_strategy == "STRICT_PACK":
        return [worker_bundle(config.scaling)]
    return bundles


def deadline_ts(scaling: ScalingConfig) -> float | None:
    """``scaling.deadline`` as a Unix timestamp (a time without an offset is UTC)."""
    if scaling.deadline is None:
        return None
    deadline = scaling.deadline
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=UTC)
    return deadline.timestamp()


def _request_resources(bundles: list[Bundle]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


class ResourceDemand:
    """The process's one standing request to Ray's autoscaler, summed over pools.

    ``request_resources`` overrides the previous call, so two pools calling it on their own would
    erase each other's demand. Thread-safe; sends only when the total changes."""

    def __init__(self, request: Callable[[list[Bundle]], None] | None = None) -> None:
        self._request = request or _request_resources
        self._by_key: dict[str, list[Bundle]] = {}
        self._sent: list[Bundle] | None = None
        self._lock = threading.Lock()

    def set(self, key: str, bundle: Bundle | list[Bundle], count: int) -> None:
        """``count`` workers of ``key``, each ``bundle`` (or each those bundles)."""
        per_worker = [bundle] if isinstance(bundle, dict) else bundle
        with self._lock:
            self._by_key[key] = [dict(b) for _ in range(max(0, count)) for b in per_worker]
            self._flush()

    def clear(self, key: str) -> None:
        with self._lock:
            self._by_key.pop(key, None)
            self._flush()

    def bundles(self) -> list[Bundle]:
        with self._lock:
            return [b for bundles in self._by_key.values() for b in bundles]

    def _flush(self) -> None:
        total = [b for bundles in self._by_key.values() for b in bundles]
        if total != self._sent:
            self._request(total)
            self._sent = total
            logger.info("resource request: %d bundle(s) %s", len(total), total[:1])


@dataclass
class _Draining:
    since: float
    stopped_at: float | None = None


class ElasticPool(WorkerPool):
    """A :class:`WorkerPool` that grows one worker at a time and shrinks by draining.

    Adds to the base pool: which workers have loaded their engine (``ready``), and workers in
    drain, which are reaped when their ``run`` returns, told to ``stop`` after the drain timeout
    and killed (their leases handed back, no attempt charged) after a grace period."""

    def __init__(self, config: Config, pool: str, queue: Any) -> None:
        super().__init__(config, pool, queue)
        self.draining: dict[str, _Draining] = {}
        self.started_at: dict[str, float] = {}
        self.ready: set[str] = set()
        self._ready_refs: dict[Any, str] = {}

    def active(self) -> list[str]:
        """Workers not draining, oldest first."""
        return [w for w in self.members if w not in self.draining]

    def start_one(self, now: float) -> str:
        before = set(self.members)
        self._start_one()
        (worker_id,) = set(self.members) - before
        self.started_at[worker_id] = now
        self._ready_refs[self.members[worker_id].handle.pid.remote()] = worker_id
        return worker_id

    def poll_ready(self) -> list[str]:
        """Workers whose engine has loaded since the last call."""
        if not self._ready_refs:
            return []
        refs = list(self._ready_refs)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        became = []
        for ref in done:
            worker_id = self._ready_refs.pop(ref)
            if worker_id in self.members:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError:
                    continue  # it died starting; check() reaps it
                self.ready.add(worker_id)
                became.append(worker_id)
        return became

    def young(self, now: float) -> int:
        """Workers started so recently that Ray may not count their resources as used yet."""
        return sum(
            1
            for w in self.active()
            if w not in self.ready and now - self.started_at.get(w, 0.0) < PLACEMENT_GRACE_S
        )

    def shrink(self, count: int, now: float) -> list[str]:
        """Take ``count`` workers out: those still loading are stopped at once (they hold
        nothing yet), then the youngest ready ones drain."""
        active = self.active()
        loading = [w for w in reversed(active) if w not in self.ready]
        ready = [w for w in reversed(active) if w in self.ready]
        chosen = (loading + ready)[:count]
        for worker_id in chosen:
            if worker_id in self.ready:
                self.draining[worker_id] = _Draining(now)
                self.members[worker_id].handle.drain.remote()
                logger.info("worker draining worker=%s", worker_id)
            else:
                self._kill(worker_id, "stopped while loading")
        return chosen

    def drain_all(self, now: float) -> None:
        self.shrink(len(self.active()), now)

    def reap(self, now: float, drain_timeout_s: float) -> list[str]:
        """Settle draining workers and reap lost ones (released with an attempt charged, as in
        :meth:`WorkerPool.check`). Returns the ids of the workers that are gone."""
        gone: list[str] = []
        for worker_id, state in list(self.draining.items()):
            member = self.members[worker_id]
            finished, _ = ray.wait([member.run_ref], timeout=0)
            if finished:
                try:
                    ray.get(member.run_ref)
                    self._kill(worker_id, "drained")
                except ray.exceptions.RayError as exc:
                    self._kill(worker_id, f"ended draining with {type(exc).__name__}")
                gone.append(worker_id)
            elif state.stopped_at is None and now - state.since >= drain_timeout_s:
                state.stopped_at = now
                member.handle.stop.remote()
                logger.warning(
                    "worker drain timed out worker=%s: handing back what it holds", worker_id
                )
            elif state.stopped_at is not None and now - state.stopped_at >= STOP_GRACE_S:
                self._kill(worker_id, "did not stop")
                gone.append(worker_id)
        draining = {w: self.members.pop(w) for w in self.draining if w in self.members}
        try:  # the base check reaps lost workers; draining ones are settled above
            ended = self.check(replace=False)
        finally:
            self.members.update(draining)
        for worker_id in ended:
            self._forget(worker_id)
        return gone + ended

    def _kill(self, worker_id: str, why: str) -> None:
        """End a worker on purpose: kill the actor (freeing its resources) and hand back any
        leases it still has, with no attempt charged (a drain, not a failure)."""
        member = self.members.pop(worker_id)
        ray.kill(member.handle, no_restart=True)
        free_placement(member)
        released = ray.get(self.queue.release_worker.remote(worker_id, "drained"))
        self._forget(worker_id)
        logger.info("worker gone worker=%s (%s) released=%d", worker_id, why, released)

    def _forget(self, worker_id: str) -> None:
        self.draining.pop(worker_id, None)
        self.started_at.pop(worker_id, None)
        self.ready.discard(worker_id)


@dataclass
class StepReport:
    """What one step saw and did."""

    decision: Decision
    workers: int  # active (not draining), loading included
    ready: int
    draining: int
    demand: int  # bundles requested from Ray's autoscaler
    tokens_per_s: float | None
    started: list[str] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)  # asked to drain (or stopped) this step
    ended: list[str] = field(default_factory=list)  # gone this step (forget their ids)


class Autoscaler:
    """Sizes one worker pool from the WorkQueue's backlog; see the module docstring.

    ``step`` is not thread-safe: call it from one loop. ``clock`` is monotonic seconds, ``wall``
    Unix seconds (deadlines); both are injectable."""

    def __init__(
        self,
        config: Config,
        queue: Any,
        pool: str | None = None,
        *,
        demand: ResourceDemand | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.queue = queue
        self.pool = ElasticPool(config, pool or config.engine.model, queue)
        self.demand = demand or ResourceDemand()
        self.meter = ThroughputMeter(THROUGHPUT_HALFLIFE_S)
        self.clock = clock
        self.wall = wall
        self.deadlines: dict[str, float] = {}
        self.last: StepReport | None = None
        self.failed: str | None = None
        self.events: deque[tuple[float, str, str]] = deque(maxlen=10_000)  # (t, event, worker)
        self._target: int | None = None
        self._changed_at = -math.inf
        self._idle_since: float | None = None

    @property
    def name(self) -> str:
        return self.pool.pool

    @property
    def scaling(self) -> ScalingConfig:
        return self.config.scaling

    def update_scaling(self, **fields: Any) -> None:
        """Change the pool's scaling settings on the fly (validated); the next step applies
        them. Workers already running keep their engine config."""
        self.config = self.config.with_updates(scaling=fields)
        self.pool.config = self.config

    # ------------------------------------------------------------------ one step
    def step(
        self,
        now: float | None = None,
        stats: dict[str, dict[str, Any]] | None = None,
        deadlines: dict[str, float] | None = None,
    ) -> StepReport:
        """Look at the queue, decide, and act. ``stats`` is ``WorkQueue.stats()["jobs"]`` when
        the caller has it already; ``deadlines`` maps job ids to Unix times."""
        now = self.clock() if now is None else now
        wall = self.wall()
        if stats is None:
            stats = ray.get(self.queue.stats.remote(), timeout=60)["jobs"]
        if deadlines:
            self.deadlines.update(deadlines)
        jobs = jobs_of_pool(stats, self.name)
        rate = self.meter.update(
            now,
            sum(j["prompt_tokens"] + j["completion_tokens"] for j in jobs),
            sum(float(j["busy_s"]) for j in jobs),
        )
        backlog = tuple(
            entry
            for j in jobs
            for entry in backlog_entries(j, wall, self.deadlines.get(j["job_id"]))
        )
        ended = self.pool.reap(now, self.scaling.drain_timeout_s)
        for worker_id in ended:
            self.events.append((now, "ended", worker_id))
        for worker_id in self.pool.poll_ready():
            self.events.append((now, "ready", worker_id))
        busy = any(b.busy for b in backlog)
        if busy:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
        active = self.pool.active()
        max_workers = self.scaling.max_workers or self._cluster_slots()
        policy = Policy.from_config(self.scaling, max_workers)
        if self.scaling.overflow is not None and rate:
            self._route_overflow(stats, backlog, rate, policy.cap, now, wall)
        decision = decide(
            ScalerInput(
                backlog=backlog,
                # The count the pool is committed to: workers still waiting for a node count,
                # so a slow cloud does not make the target flap.
                workers=max(len(active), self._target or 0),
                tokens_per_s=rate,
                idle_s=0.0 if self._idle_since is None else now - self._idle_since,
                since_change_s=now - self._changed_at,
            ),
            policy,
        )
        if decision.desired != self._target:
            logger.info(
                "pool=%s desired %s -> %d (%s) needed=%.2f workers=%d tokens_per_s=%s at_risk=%s",
                self.name,
                self._target,
                decision.desired,
                decision.reason,
                decision.needed,
                len(active),
                None if rate is None else round(rate),
                list(decision.at_risk),
            )
            self._target = decision.desired
            self._changed_at = now
        started, drained = self._apply(decision.desired, now)
        ended += [w for w in drained if w not in self.pool.members]  # stopped while loading
        workers = len(self.pool.active())
        draining = len(self.pool.draining)
        demand = max(decision.desired, workers) + draining
        self.demand.set(self.name, worker_demand(self.config), demand)
        self.last = StepReport(
            decision=decision,
            workers=workers,
            ready=len(self.pool.ready - set(self.pool.draining)),
            draining=draining,
            demand=demand,
            tokens_per_s=rate,
            started=started,
            drained=drained,
            ended=ended,
        )
        return self.last

    def _route_overflow(
        self,
        stats: dict[str, dict[str, Any]],
        backlog: tuple[Backlog, ...],
        rate: float,
        cap: float,
        now: float,
        wall: float,
    ) -> None:
        """Move the pending items this pool cannot do by their job's deadline to the overflow
        pool, and back once it can (:func:`~inference.scaler.overflow_moves`). Only pending
        items move, in one queue call each, so every item is in one pool at every moment."""
        target = overflow_pool(self.name)
        local = {j["job_id"]: j for j in jobs_of_pool(stats, self.name)}
        remote = {j["job_id"]: j for j in jobs_of_pool(stats, target)}
        needs = deadline_needs(backlog, rate)
        shares = {}
        for job_id in set(local) | set(remote):
            deadline = self.deadlines.get(job_id)
            if deadline is None:
                continue  # no deadline: nothing to route for
            mine, theirs = local.get(job_id), remote.get(job_id)
            merged = _with_overflow(mine, theirs)
            others = tuple(b for b in backlog if b.job_id != job_id)
            with_overflow = deadline_needs(
                others + tuple(backlog_entries(merged, wall, deadline)), rate
            )
            shares[job_id] = OverflowShare(
                pending=int(mine["pending"]) if mine else 0,
                overflow_pending=int(theirs["pending"]) if theirs else 0,
                need=needs.get(job_id, 0.0),
                need_with_overflow=with_overflow.get(job_id, 0.0),
            )
        for job_id, n in overflow_moves(shares, cap, self.scaling.hysteresis).items():
            source, dest = (self.name, target) if n > 0 else (target, self.name)
            moved = ray.get(self.queue.move_pending.remote(job_id, source, dest, abs(n)))
            if moved:
                self.events.append((now, "overflow" if n > 0 else "overflow_back", job_id))
                logger.info("job=%s: %d items %s -> %s (deadline)", job_id, moved, source, dest)

    def _apply(self, desired: int, now: float) -> tuple[list[str], list[str]]:
        active = self.pool.active()
        if desired > len(active):
            if self._too_many_lost():
                return [], []
            room = self._free_slots() - self.pool.young(now)
            started = []
            for _ in range(max(0, min(desired - len(active), room))):
                worker_id = self.pool.start_one(now)
                self.events.append((now, "started", worker_id))
                started.append(worker_id)
            return started, []
        if desired < len(active):
            drained = self.pool.shrink(len(active) - desired, now)
            for worker_id in drained:
                self.events.append((now, "drain", worker_id))
            return [], drained
        return [], []

    def _too_many_lost(self) -> bool:
        limit = 3 * max(1, self.scaling.max_workers) + 10
        if self.pool.lost > limit and self.failed is None:
            last = self.pool.fatal_errors[-1] if self.pool.fatal_errors else "lost"
            self.failed = f"{self.pool.lost} workers lost; last error: {last}"
            logger.error("pool=%s: %s; not starting more", self.name, self.failed)
        return self.failed is not None

    def _free_slots(self) -> int:
        available = ray.available_resources()
        bundle = worker_bundle(self.scaling)
        return int(min(available.get(k, 0.0) // v for k, v in bundle.items()))

    def _cluster_slots(self) -> int:
        total = ray.cluster_resources()
        bundle = worker_bundle(self.scaling)
        return max(1, int(min(total.get(k, 0.0) // v for k, v in bundle.items())))

    # ------------------------------------------------------------------ lifecycle
    def close(self, timeout_s: float | None = None, poll_s: float = 0.2) -> None:
        """Drain every worker, wait for them to exit, and withdraw the pool's demand."""
        timeout_s = timeout_s or self.scaling.drain_timeout_s + STOP_GRACE_S + 5
        start = self.clock()
        self.pool.drain_all(start)
        while self.pool.members and self.clock() - start < timeout_s:
            self.pool.reap(self.clock(), self.scaling.drain_timeout_s)
            time.sleep(poll_s)
        for worker_id in list(self.pool.members):
            self.pool._kill(worker_id, "close timed out")
        self.demand.clear(self.name)

    def snapshot(self) -> dict[str, Any]:
        """Figures for the Controller and the dashboard."""
        report = self.last
        if report is None:
            return {"pool": self.name, "workers": len(self.pool.members)}
        d = report.decision
        return {
            "pool": self.name,
            "workers": report.workers,
            "ready": report.ready,
            "draining": report.draining,
            "desired": d.desired,
            "needed": d.needed,
            "reason": d.reason,
            "at_risk": list(d.at_risk),
            "eta_s": d.eta_s,
            "cost_per_hour": d.cost_per_hour,
            "demand": report.demand,
            "tokens_per_s": report.tokens_per_s,
            "lost": self.pool.lost,
            "failed": self.failed,
            "at": datetime.now(UTC).isoformat(),
        }
