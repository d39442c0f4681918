"""The scaling policy: how many workers a pool should have.

Pure functions and small frozen dataclasses, no Ray and no clock of their own, so the policy is
tested on tables of cases (``tests/unit/test_scaler.py``). :mod:`inference.autoscale` feeds it
from the WorkQueue's stats and applies its :class:`Decision` on the cluster.

How the count is found:

- **Drain target.** Every job should be drained within ``target_drain_s`` of its oldest pending
  item's arrival: a job needs ``tokens / (tokens_per_s x time left)`` workers. The time left
  shrinks as the backlog ages, so a pool that started late (nodes and models take minutes)
  catches up instead of re-planning a fresh ``target_drain_s`` at every step (which would only
  ever drain the backlog exponentially). A backlog older than the target is given a quarter of
  it (``LATE_HORIZON_FRACTION``).
- **Deadlines.** A job with a deadline needs its own tokens, those of higher priorities and its
  fair share of equal priorities (the queue's order) done in the time left; if that takes more
  than the pool may have (``max_workers``, the cost ceiling), the job is reported at risk.
- **Bounds.** ``min_workers`` <= count <= ``max_workers`` and the cost ceiling.
- **No flapping.** Within a band of ``hysteresis`` around the current count the pool holds; it
  drains only ``cooldown_s`` after its last change, and an empty queue drains to ``min_workers``
  only after ``idle_timeout_s`` (scale to zero when ``min_workers`` is 0). Adding workers is
  never delayed.
- **Cold start.** Until one worker's throughput is measured (``assumed_tokens_per_s`` unset)
  a pool with work runs one worker.
- **Overflow.** With ``scaling.overflow``, a job at risk has the share of its pending items
  that the pool cannot do in time even at its cap moved to the overflow pool (a remote engine);
  once the pool could take more than it has within ``hysteresis`` of its cap, they come back
  (:func:`overflow_moves`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from inference.config import ScalingConfig

LATE_HORIZON_FRACTION = 0.25  # a backlog past its drain target aims to drain in this share of it
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Backlog:
    """Work of one job at one priority, in one pool. Tokens are estimates in the units of the
    measured throughput (prompt plus completion tokens)."""

    job_id: str
    priority: int
    pending_items: int
    pending_tokens: float
    leased_items: int = 0
    leased_tokens: float = 0.0
    oldest_pending_s: float | None = None  # age of the oldest pending item
    deadline_in_s: float | None = None  # time left until the job's deadline

    @property
    def tokens(self) -> float:
        return self.pending_tokens + self.leased_tokens

    @property
    def busy(self) -> bool:
        return self.pending_items > 0 or self.leased_items > 0


@dataclass(frozen=True, slots=True)
class ScalerInput:
    backlog: tuple[Backlog, ...]
    workers: int  # workers the pool has or awaits capacity for, not counting those draining
    tokens_per_s: float | None  # measured throughput of one busy worker, smoothed
    idle_s: float = 0.0  # how long the pool's queue has been empty (0 while there is work)
    since_change_s: float = math.inf  # time since the worker count last changed


@dataclass(frozen=True, slots=True)
class Policy:
    """The config the policy reads (``ScalingConfig`` with ``max_workers`` resolved)."""

    min_workers: int = 0
    max_workers: int = 1
    target_drain_s: float = 3600.0
    worker_cost_per_hour: float = 0.0
    cost_ceiling_per_hour: float | None = None
    assumed_tokens_per_s: float = 0.0
    cooldown_s: float = 60.0
    hysteresis: float = 0.2
    idle_timeout_s: float = 300.0

    @classmethod
    def from_config(cls, scaling: ScalingConfig, max_workers: int | None = None) -> Policy:
        """``max_workers`` overrides the config's (its 0 means "the cluster's slots")."""
        return cls(
            min_workers=scaling.min_workers,
            max_workers=max_workers if max_workers is not None else scaling.max_workers,
            target_drain_s=scaling.target_drain_s,
            worker_cost_per_hour=scaling.worker_cost_per_hour,
            cost_ceiling_per_hour=scaling.cost_ceiling_per_hour,
            assumed_tokens_per_s=scaling.assumed_tokens_per_s,
            cooldown_s=scaling.cooldown_s,
            hysteresis=scaling.hysteresis,
            idle_timeout_s=scaling.idle_timeout_s,
        )

    @property
    def cap(self) -> int:
        """The most workers allowed: ``max_workers``, lowered by the cost ceiling (never below
        ``min_workers``; the config refuses a ceiling under the minimum's cost)."""
        cap = self.max_workers
        if self.cost_ceiling_per_hour is not None and self.worker_cost_per_hour > 0:
            cap = min(cap, math.floor(self.cost_ceiling_per_hour / self.worker_cost_per_hour))
        return max(cap, self.min_workers)

    @property
    def cap_reason(self) -> str:
        if (
            self.cost_ceiling_per_hour is not None
            and self.worker_cost_per_hour > 0
            and self.cost_ceiling_per_hour / self.worker_cost_per_hour < self.max_workers
        ):
            return "cost_ceiling"
        return "max_workers"


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int  # workers the pool should have
    needed: float  # workers the backlog and deadlines ask for, before bounds and hysteresis
    reason: str  # why: backlog, deadline, band, cooldown, steady, idle, idle_wait, unmeasured,
    #              min_workers, max_workers, cost_ceiling
    at_risk: tuple[str, ...] = ()  # jobs whose deadline the pool cannot meet
    eta_s: float | None = None  # time to drain everything at ``desired`` workers
    cost_per_hour: float = 0.0  # of ``desired`` workers


def horizon_s(entry: Backlog, target_drain_s: float) -> float:
    """Time left to drain this backlog within the target, from its oldest item's age."""
    age = entry.oldest_pending_s or 0.0
    return max(target_drain_s - age, target_drain_s * LATE_HORIZON_FRACTION)


def drain_need(backlog: tuple[Backlog, ...], tokens_per_s: float, target_drain_s: float) -> float:
    """Workers that drain every job within its drain target (fractional)."""
    return sum(
        b.pending_tokens / (tokens_per_s * horizon_s(b, target_drain_s))
        for b in backlog
        if b.pending_items > 0
    )


def deadline_needs(backlog: tuple[Backlog, ...], tokens_per_s: float) -> dict[str, float]:
    """Workers each job with a deadline needs (``inf`` once the deadline has passed): its work
    and the work the queue serves before it (higher priorities, and a fair share of equal ones)
    done in the time left."""
    needs: dict[str, float] = {}
    for b in backlog:
        if b.deadline_in_s is None or not b.busy:
            continue
        ahead = sum(
            o.tokens if o.priority > b.priority else min(o.tokens, b.tokens)
            for o in backlog
            if o.priority >= b.priority and o is not b
        )
        work = ahead + b.tokens
        need = math.inf if b.deadline_in_s <= 0 else work / (tokens_per_s * b.deadline_in_s)
        needs[b.job_id] = max(needs.get(b.job_id, 0.0), need)
    return needs


@dataclass(frozen=True, slots=True)
class OverflowShare:
    """One job as the overflow routing sees it (workers are fractional)."""

    pending: int  # its leasable items in the pool
    overflow_pending: int  # its items in the overflow pool, not leased there yet
    need: float  # workers the pool needs for its deadline (deadline_needs), 0 without one
    need_with_overflow: float  # the same, were its overflow items back in the pool


def overflow_moves(
    shares: dict[str, OverflowShare], cap: float, hysteresis: float
) -> dict[str, int]:
    """Pending items to move for each job: > 0 from the pool to its overflow, < 0 back.

    A job that needs more than ``cap`` workers for its deadline keeps the share of its pending
    items the cap can do and the rest go (all of them once the deadline has passed). A job
    that needs less than ``cap x (1 - hysteresis)`` takes back as many of its overflow items
    as keep it within that (the band keeps items from going back and forth)."""
    out: dict[str, int] = {}
    room = cap * (1.0 - hysteresis)
    for job_id, s in shares.items():
        if s.need > cap + _EPS:
            n = s.pending if math.isinf(s.need) else math.ceil(s.pending * (1 - cap / s.need))
            if n > 0:
                out[job_id] = n
            continue
        if not s.overflow_pending or s.need >= room:
            continue
        extra = s.need_with_overflow - s.need  # what the overflow items would add here
        back = (
            s.overflow_pending
            if extra <= _EPS
            else math.floor(s.overflow_pending * min(1.0, (room - s.need) / extra))
        )
        if back > 0:
            out[job_id] = -back
    return out


def decide(inp: ScalerInput, policy: Policy) -> Decision:
    """The worker count for a pool now. See the module docstring for the rules."""
    cap, floor_ = policy.cap, policy.min_workers
    workers = inp.workers
    busy = any(b.busy for b in inp.backlog)
    rate = inp.tokens_per_s or policy.assumed_tokens_per_s or None

    def done(desired: int, needed: float, reason: str, at_risk: tuple[str, ...] = ()) -> Decision:
        tokens = sum(b.tokens for b in inp.backlog)
        eta = None
        if rate and desired:
            eta = tokens / (rate * desired)
        elif not busy:
            eta = 0.0
        cost = desired * policy.worker_cost_per_hour
        return Decision(desired, needed, reason, at_risk, eta, cost)

    if workers > cap:  # the ceiling is hard: no band, no cooldown
        return done(cap, float(workers), policy.cap_reason)
    if not busy:
        if workers <= floor_:
            return done(floor_, 0.0, "min_workers" if workers < floor_ else "idle")
        if inp.idle_s >= policy.idle_timeout_s and inp.since_change_s >= policy.cooldown_s:
            return done(floor_, 0.0, "idle")
        return done(workers, 0.0, "idle_wait")
    if rate is None:
        start = max(1, floor_)
        return done(max(workers, min(cap, start)), float(start), "unmeasured")

    needs = deadline_needs(inp.backlog, rate)
    at_risk = tuple(sorted(job for job, need in needs.items() if need > cap + _EPS))
    deadline = max(needs.values(), default=0.0)
    drain = drain_need(inp.backlog, rate, policy.target_drain_s)
    needed = max(drain, deadline, 1.0)
    target = min(cap, max(floor_, math.ceil(min(needed, cap + 1.0) - _EPS)))

    if workers < floor_:
        return done(max(target, floor_), needed, "min_workers", at_risk)
    if target > workers:
        urgent = deadline > workers + _EPS  # a deadline is never held by the band
        if workers == 0 or urgent or needed > workers * (1 + policy.hysteresis) + _EPS:
            reason = "deadline" if deadline >= drain else "backlog"
            if target == cap and needed > cap + _EPS:
                reason = policy.cap_reason
            return done(target, needed, reason, at_risk)
        return done(workers, needed, "band", at_risk)
    if target < workers:
        if needed >= workers * (1 - policy.hysteresis) - _EPS:
            return done(workers, needed, "band", at_risk)
        if inp.since_change_s < policy.cooldown_s:
            return done(workers, needed, "cooldown", at_risk)
        return done(target, needed, "backlog", at_risk)
    return done(workers, needed, "steady", at_risk)


def jobs_of_pool(stats: dict[str, dict[str, Any]], pool: str) -> list[dict[str, Any]]:
    """Each job's stats (``WorkQueue.stats()["jobs"]``) as that pool sees them: the job's
    figures for its items of the pool (a job of several models has items in several pools).
    Jobs without items in the pool are left out."""
    out = []
    for st in stats.values():
        mine = st.get("pools", {}).get(pool)
        if mine is not None:
            out.append({**st, **mine, "pool": pool})
        elif "pools" not in st and st.get("pool") == pool:
            out.append(st)
    return out


def can_lease(job: dict[str, Any], wall: float) -> bool:
    """Whether a job's pending items may be leased at ``wall`` (from ``WorkQueue.stats``): the
    job is active and due (``next_run_at``, 0 meaning now; without it, ``not_before``)."""
    due = float(job.get("next_run_at", job.get("not_before")) or 0.0)
    return job.get("state", "active") == "active" and due <= wall


def backlog_entries(
    job: dict[str, Any], wall: float, deadline: float | None = None
) -> list[Backlog]:
    """One job's stats (``WorkQueue.stats``) as backlog entries, one per priority.

    Pending tokens are the queue's estimates (prompt length plus ``max_tokens``); they are
    scaled by what the job's completed items really cost per item, so they are in the units of
    the measured throughput. Items of a job that is not active, or not due yet (``not_before``),
    do not count, nor those of a job outside its run windows (``next_run_at``); its leased
    items do."""
    pending = int(job["pending"]) if can_lease(job, wall) else 0
    leased = int(job["leased"])
    if pending == 0 and leased == 0:
        return []
    done = int(job.get("done", 0))
    used = int(job.get("prompt_tokens", 0)) + int(job.get("completion_tokens", 0))
    actual_per_item = used / done if done and used else None
    estimate_per_item = float(job["pending_tokens"]) / job["pending"] if job["pending"] else None
    ratio = 1.0
    if actual_per_item and estimate_per_item:
        ratio = min(max(actual_per_item / estimate_per_item, 0.05), 4.0)
    per_item = actual_per_item or estimate_per_item or 1.0
    pending_tokens = float(job["pending_tokens"]) * ratio if pending else 0.0
    left = None if deadline is None else deadline - wall
    by_priority = {int(p): int(n) for p, n in (job.get("pending_by_priority") or {}).items() if n}
    if not pending or not by_priority:
        by_priority = {int(job.get("priority", 0)): pending}
    own = int(job.get("priority", 0))
    if own not in by_priority:
        own = max(by_priority)
    total = sum(by_priority.values()) or 1
    return [
        Backlog(
            job_id=job["job_id"],
            priority=priority,
            pending_items=count,
            pending_tokens=pending_tokens * count / total,
            leased_items=leased if priority == own else 0,
            leased_tokens=leased * per_item if priority == own else 0.0,
            oldest_pending_s=job.get("oldest_pending_s"),
            deadline_in_s=left,
        )
        for priority, count in sorted(by_priority.items(), reverse=True)
    ]


class ThroughputMeter:
    """Tokens per second of one busy worker, from the queue's cumulative counters: completed
    tokens over engine-busy seconds between samples, smoothed exponentially with a half-life in
    wall seconds. Busy seconds, not wall seconds, so workers that are loading a model or
    starved of work do not drag the figure down."""

    def __init__(self, halflife_s: float = 60.0, min_busy_s: float = 1.0) -> None:
        self.halflife_s = halflife_s
        self.min_busy_s = min_busy_s
        self.value: float | None = None
        self._base: tuple[float, float, float] | None = None  # (t, tokens, busy_s)

    def update(self, t: float, tokens: float, busy_s: float) -> float | None:
        """Feed the cumulative tokens and busy seconds at time ``t``; returns the estimate."""
        if self._base is None or tokens < self._base[1] or busy_s < self._base[2]:
            self._base = (t, tokens, busy_s)  # first sample, or a job left the counters
            return self.value
        t0, tokens0, busy0 = self._base
        d_busy = busy_s - busy0
        if d_busy < self.min_busy_s:
            return self.value
        sample = (tokens - tokens0) / d_busy
        if self.value is None:
            self.value = sample
        else:
            weight = 1.0 - 0.5 ** (max(t - t0, 0.0) / self.halflife_s)
            self.value += weight * (sample - self.value)
        self._base = (t, tokens, busy_s)
        return self.value
