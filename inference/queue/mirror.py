"""What the store keeps in memory, so that its hot paths cost no query: per job (and per engine
pool of the job) the counts by state, pending tokens and attempts by cause; the leasable items by
priority and lane (a job's items for one pool: what a lease plans from); and the outstanding
leases (what fencing checks and sweeps read).

The database is the truth: the mirror is loaded from it at start (and again if the two are ever
found to differ), and the store changes it only after a transaction that made the same change
has committed.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from inference.errors import QueueError
from inference.queue.db import LEASED, PENDING, WAITING
from inference.queue.records import JobSpec
from inference.schedule import Schedule

BACKLOG = (PENDING, WAITING)
CAUSES = ("error", "lease_expired", "worker_lost")


@dataclass(slots=True)
class Tally:
    """Counts by state, backlog tokens and usage: of a whole job, or of its items for one pool."""

    counts: Counter[int] = field(default_factory=Counter)
    pending_tokens: int = 0
    pending_by_priority: Counter[int] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0

    def shift(self, old: int | None, new: int, priority: int, n: int, tokens: int) -> None:
        if old is not None:
            self.counts[old] -= n
        self.counts[new] += n
        if old in BACKLOG:
            self.pending_tokens -= tokens
            self.pending_by_priority[priority] -= n
        if new in BACKLOG:
            self.pending_tokens += tokens
            self.pending_by_priority[priority] += n

    def use(self, prompt: int, completion: int, busy_s: float) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.busy_s += busy_s


@dataclass(slots=True, kw_only=True)
class Job(Tally):
    spec: JobSpec
    state: str  # active | paused | cancelled
    created_at: float
    attempts_by_cause: Counter[str] = field(default_factory=Counter)
    next_shard: int = 0
    end_code: str = "cancelled"  # the dead letters' code once cancelled: cancelled or expired
    pools: dict[str, Tally] = field(default_factory=dict)  # the job's items by engine pool
    schedule: Schedule = field(init=False)

    def __post_init__(self) -> None:
        spec = self.spec
        self.schedule = Schedule(spec.not_before, spec.windows, spec.timezone)

    def pool(self, name: str) -> Tally:
        tally = self.pools.get(name)
        if tally is None:
            tally = self.pools[name] = Tally()
        return tally


@dataclass(slots=True)
class Lease:
    """An outstanding lease, as committed."""

    epoch: int
    deadline: float  # on the queue's monotonic clock
    lease_s: float | None
    job_id: str
    priority: int
    tokens: int
    attempts: int
    worker: str | None
    pool: str


Lane = tuple[str, str]  # (job_id, pool): a job's items for one engine pool
Head = tuple[str, str, int]  # (job_id, pool, priority): where a lease starts reading
Held = tuple[int, Lease]  # (item rowid, its lease)
Move = tuple[int, Lease, int]  # (item rowid, its lease, the state it moved to)


class Mirror:
    """Counters, leasable items and leases of one queue database."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        # {priority: {(job_id, pool): leasable}}, no zeros
        self.ready: dict[int, dict[Lane, int]] = {}
        self.leases: dict[int, Lease] = {}
        # {(job_id, pool, priority): id}: every pending item of that lane and priority has an
        # id at least this. A lease reads from there (the ids below it are the lane's leased,
        # done or dead items, and on PostgreSQL the dead index entries their updates left), and
        # moves it past what it took; an item that comes back to pending moves it back to its
        # id. A lane without an entry is read from its first id.
        self.heads: dict[Head, int] = {}

    def load(self, db: Any) -> None:
        """Rebuild everything from the database (one pass over the items)."""
        self.jobs.clear()
        self.ready.clear()
        self.leases.clear()
        self.heads.clear()
        for row in db.execute(
            "SELECT job_id, pool, priority, state, spec, not_before, created_at, prompt_tokens,"
            " completion_tokens, busy_s, next_shard FROM jobs"
        ):
            extra = json.loads(row[4])
            spec = JobSpec(
                job_id=row[0],
                pool=row[1],
                priority=row[2],
                not_before=row[5],
                max_attempts=extra["max_attempts"],
                backoff_base_s=extra["backoff_base_s"],
                backoff_max_s=extra["backoff_max_s"],
                settings=extra["settings"],
                windows=tuple(extra.get("windows", ())),
                timezone=extra.get("timezone", "UTC"),
            )
            self.jobs[row[0]] = Job(
                spec=spec,
                state=row[3],
                created_at=row[6],
                prompt_tokens=row[7],
                completion_tokens=row[8],
                busy_s=row[9],
                next_shard=row[10],
            )
        for job_id, pool, state, priority, n, tokens, n_error, n_expired, n_lost in db.execute(
            "SELECT job_id, pool, state, priority, COUNT(*), CAST(SUM(tokens) AS BIGINT),"
            " CAST(SUM(n_error) AS BIGINT), CAST(SUM(n_expired) AS BIGINT),"
            " CAST(SUM(n_lost) AS BIGINT) FROM items GROUP BY job_id, pool, state, priority"
        ):
            job = self.jobs[job_id]
            self.shift(job, None, state, priority, n, tokens, pool)
            job.attempts_by_cause.update(
                dict(zip(CAUSES, (n_error, n_expired, n_lost), strict=True))
            )
        for job_id, pool, *usage in db.execute(
            "SELECT job_id, pool, prompt_tokens, completion_tokens, busy_s FROM pool_usage"
        ):
            if job_id in self.jobs:
                self.jobs[job_id].pool(pool).use(*usage)
        for item_id, epoch, deadline, *rest in db.execute(
            "SELECT id, epoch, deadline, lease_s, job_id, priority, tokens, attempts, worker, pool"
            " FROM items WHERE state = 1"
        ):
            self.leases[item_id] = Lease(epoch, -math.inf if deadline is None else deadline, *rest)

    def job(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise QueueError(f"unknown job {job_id!r}") from None

    def shift(
        self,
        job: Job,
        old: int | None,
        new: int,
        priority: int,
        n: int,
        tokens: int,
        pool: str,
        lowest: int = 0,
    ) -> None:
        """Move ``n`` items (``tokens`` in all) of one job, pool and priority between states.
        ``old`` None: new items (their ids above every other's: a lane's head stays).
        ``lowest``: the lowest id of the items, for those back in pending (0: not known)."""
        job.shift(old, new, priority, n, tokens)
        job.pool(pool).shift(old, new, priority, n, tokens)
        if old == PENDING:
            self._add_ready((job.spec.job_id, pool), priority, -n)
        if new == PENDING:
            self._add_ready((job.spec.job_id, pool), priority, n)
            if old is not None:
                self._lower_head((job.spec.job_id, pool, priority), lowest)

    def _lower_head(self, key: Head, lowest: int) -> None:
        if key in self.heads:
            self.heads[key] = min(self.heads[key], lowest)

    def head(self, job_id: str, pool: str, priority: int) -> int:
        return self.heads.get((job_id, pool, priority), 0)

    def pending_lanes(self, job_id: str) -> list[tuple[str, int, int]]:
        """``(pool, priority, head)`` of each of the job's lanes that holds pending items."""
        return [
            (pool, priority, self.head(job_id, pool, priority))
            for priority, lanes in self.ready.items()
            for (job, pool) in lanes
            if job == job_id
        ]

    def advance(self, job_id: str, pool: str, priority: int, taken: int) -> None:
        """A lease took the lane's pending items up to id ``taken``: it was the first of them."""
        self.heads[(job_id, pool, priority)] = taken + 1

    def repool(
        self, job: Job, source: str, target: str, priority: int, n: int, tokens: int, lowest: int
    ) -> None:
        """``n`` pending items (``tokens`` in all, ``lowest`` the lowest id) of a job moved from
        one pool to another."""
        for tally, sign in ((job.pool(source), -1), (job.pool(target), 1)):
            tally.counts[PENDING] += sign * n
            tally.pending_tokens += sign * tokens
            tally.pending_by_priority[priority] += sign * n
        self._add_ready((job.spec.job_id, source), priority, -n)
        self._add_ready((job.spec.job_id, target), priority, n)
        self._lower_head((job.spec.job_id, target, priority), lowest)

    def _add_ready(self, lane: Lane, priority: int, n: int) -> None:
        lanes = self.ready.setdefault(priority, {})
        left = lanes.get(lane, 0) + n
        if left > 0:
            lanes[lane] = left
        else:
            lanes.pop(lane, None)

    def tally(self, moves: Iterable[tuple[str, int, int, str, int]], old: int, new: int) -> None:
        """Moves ``(job_id, priority, tokens, pool, id)`` from ``old`` to ``new``, counted with
        one update per job, pool and priority."""
        groups: dict[tuple[str, int, str], list[int]] = {}
        for job_id, priority, tokens, pool, item_id in moves:
            group = groups.get((job_id, priority, pool))
            if group is None:
                groups[(job_id, priority, pool)] = [1, tokens, item_id]
            else:
                group[0] += 1
                group[1] += tokens
                group[2] = min(group[2], item_id)
        for (job_id, priority, pool), (n, tokens, lowest) in groups.items():
            self.shift(self.jobs[job_id], old, new, priority, n, tokens, pool, lowest)

    def settle(self, moves: list[Move], cause: str | None) -> None:
        """Moves out of ``leased``: drop the leases, count the moves and the attempts they
        cost (by cause; ``None`` or ``drained``: none)."""
        for item_id, _, _ in moves:
            del self.leases[item_id]
        for new in {m[2] for m in moves}:
            self.tally(
                ((h.job_id, h.priority, h.tokens, h.pool, i) for i, h, s in moves if s == new),
                LEASED,
                new,
            )
        if cause in CAUSES:
            for _, held, _ in moves:
                self.jobs[held.job_id].attempts_by_cause[cause] += 1

    def earliest_deadline(self) -> float:
        return min((h.deadline for h in self.leases.values()), default=math.inf)
