"""The Controller's workers: one pool per engine pool (model) that has work, sized by the
``scaling.mode`` of the first job that needed it.

- ``fixed``: every slot of the cluster (or ``max_workers``) while the pool has work; after
  ``IDLE_GRACE_S`` without any, ``min_workers`` (the pool is drained and dropped at zero).
- ``autoscale``: the backlog-driven :class:`~inference.autoscale.Autoscaler`, stepped every
  ``scaling.interval_s``: it asks Ray's autoscaler for one bundle per worker (one
  :class:`~inference.autoscale.ResourceDemand` for all pools, since each ``request_resources``
  replaces the last), starts workers as nodes arrive and drains them on the way down.

Work counts for sizing only when it can be leased: a paused job, or one before ``not_before`` or
outside its run windows, adds its leased items only. Every worker started is written to the
registry before anything else happens to it, so a restarted Controller can hand its leases back.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from inference.autoscale import Autoscaler, ResourceDemand, deadline_ts
from inference.cluster import cluster_slots
from inference.config import Config, ScalingConfig
from inference.pool import WorkerPool
from inference.scaler import can_lease, jobs_of_pool

logger = logging.getLogger(__name__)

IDLE_GRACE_S = 15.0  # a fixed pool idle this long drains to min_workers


class WorkerRegistry(Protocol):
    def add_workers(self, pool: str, worker_ids: list[str]) -> None: ...

    def remove_workers(self, worker_ids: list[str]) -> None: ...


def desired_workers(
    scaling: ScalingConfig, backlog: int, slots: int, have: int, idle_s: float
) -> int:
    """Workers a fixed pool should have: the cluster's slots (or ``max_workers``) while it has
    work, ``min_workers`` once it has been idle for ``IDLE_GRACE_S``."""
    if backlog > 0:
        return max(scaling.max_workers or slots, scaling.min_workers, 1)
    if idle_s < IDLE_GRACE_S:
        return max(have, scaling.min_workers)
    return scaling.min_workers


def runnable_backlog(st: dict[str, Any], wall: float) -> int:
    """Items of one job (queue stats) a pool should have workers for."""
    return (int(st["pending"]) if can_lease(st, wall) else 0) + int(st["leased"])


class Fleet:
    """Fixed pools and autoscaled pools of one Controller. Not thread-safe: the Controller's
    loop calls :meth:`size`; :meth:`snapshot` reads figures that are replaced whole."""

    def __init__(self, queue: Any, registry: WorkerRegistry) -> None:
        self._queue = queue
        self._registry = registry
        self.fixed: dict[str, WorkerPool] = {}
        self.scalers: dict[str, Autoscaler] = {}
        self.errors: dict[str, str] = {}
        self.demand = ResourceDemand()
        self._next_step: dict[str, float] = {}
        self._idle_since: dict[str, float] = {}
        self._snapshot: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ one tick
    def size(
        self,
        stats: dict[str, dict[str, Any]],
        configs: dict[str, Config],
        deadlines: dict[str, float],
        now: float,
        wall: float,
    ) -> None:
        """``stats``: the queue's stats by job; ``configs``: a config per pool name (from its
        jobs); ``deadlines``: Unix deadlines by job; ``now`` monotonic, ``wall`` Unix seconds."""
        backlog: dict[str, int] = {}
        for name in {p for st in stats.values() for p in st.get("pools", [st.get("pool")])}:
            n = sum(runnable_backlog(st, wall) for st in jobs_of_pool(stats, name))
            if n:
                backlog[name] = n
        names = set(self.fixed) | set(self.scalers) | set(backlog)
        for name in sorted(names):
            config = configs.get(name)
            if name in self.scalers:
                self._autoscale(name, stats, deadlines, now)
            elif name in self.fixed:
                self._size_fixed(name, backlog.get(name, 0), config, now)
            elif config is None:
                continue
            elif config.scaling.mode == "autoscale":
                self.scalers[name] = Autoscaler(config, self._queue, name, demand=self.demand)
                logger.info("pool %s: autoscaled (%s)", name, _bounds(config.scaling))
                self._autoscale(name, stats, deadlines, now)
            else:
                self._size_fixed(name, backlog.get(name, 0), config, now)
        self._take_snapshot()

    def _autoscale(
        self,
        name: str,
        stats: dict[str, dict[str, Any]],
        deadlines: dict[str, float],
        now: float,
    ) -> None:
        if now < self._next_step.get(name, 0.0):
            return
        scaler = self.scalers[name]
        self._next_step[name] = now + scaler.scaling.interval_s
        report = scaler.step(now, stats, deadlines)
        if report.started:
            self._registry.add_workers(name, report.started)
        if report.ended:
            self._registry.remove_workers(report.ended)
        if scaler.failed:
            self.errors[name] = scaler.failed

    def _size_fixed(self, name: str, backlog: int, config: Config | None, now: float) -> None:
        pool = self.fixed.get(name)
        if pool is not None:
            healthy = pool.lost <= 3 * max(1, len(pool.members)) + 10
            if not healthy and name not in self.errors:
                self.errors[name] = pool.fatal_errors[-1] if pool.fatal_errors else "lost"
                logger.error("pool %s: too many workers lost; not replacing them", name)
            before = set(pool.members)
            ended = pool.check(replace=healthy)
            if ended:
                self._registry.remove_workers(ended)
                self._registry.add_workers(name, sorted(set(pool.members) - before))
            config = config or pool.config
        if config is None:
            return
        if backlog > 0:
            self._idle_since.pop(name, None)
        idle_s = now - self._idle_since.setdefault(name, now) if backlog == 0 else 0.0
        have = len(pool.members) if pool else 0
        s = config.scaling
        slots = cluster_slots(s.cpus_per_worker, s.gpus_per_worker) if backlog else 0
        want = desired_workers(s, backlog, slots, have, idle_s)
        if want > have and name not in self.errors:
            if pool is None:
                pool = self.fixed[name] = WorkerPool(config, name, self._queue)
            before = set(pool.members)
            pool.start(want - have)
            self._registry.add_workers(name, sorted(set(pool.members) - before))
            logger.info("pool %s: %d -> %d workers (backlog %d)", name, have, want, backlog)
        elif want == 0 and pool is not None:
            ids = list(pool.members)
            pool.drain()
            self._registry.remove_workers(ids)
            del self.fixed[name]
            self.errors.pop(name, None)
            logger.info("pool %s: idle, drained %d workers", name, len(ids))

    # ------------------------------------------------------------------ reads
    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Figures per pool as of the last tick (safe to call from other threads)."""
        return self._snapshot

    def _take_snapshot(self) -> None:
        pools: dict[str, dict[str, Any]] = {
            name: {"mode": "fixed", "workers": len(p.members), "lost": p.lost}
            for name, p in self.fixed.items()
        }
        for name, scaler in self.scalers.items():
            pools[name] = {"mode": "autoscale", **scaler.snapshot()}
        self._snapshot = pools

    # ------------------------------------------------------------------ stop
    def shutdown(self) -> None:
        """Drain every worker of every pool and withdraw the resource demand."""
        for name, pool in list(self.fixed.items()):
            ids = list(pool.members)
            pool.drain()
            self._registry.remove_workers(ids)
            del self.fixed[name]
        for name, scaler in list(self.scalers.items()):
            ids = list(scaler.pool.members)
            scaler.close()
            self._registry.remove_workers(ids)
            del self.scalers[name]
        self._take_snapshot()


def job_deadlines(records: list[dict[str, Any]]) -> dict[str, float]:
    """Unix deadlines of the jobs whose config sets ``scaling.deadline``."""
    out = {}
    for rec in records:
        scaling = ScalingConfig.model_validate(rec["config"]["scaling"])
        due = deadline_ts(scaling)
        if due is not None:
            out[rec["id"]] = due
    return out


def _bounds(s: ScalingConfig) -> str:
    return f"min_workers={s.min_workers} max_workers={s.max_workers or 'slots'}"
