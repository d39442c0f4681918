"""The durable store behind the WorkQueue: SQLite in WAL mode, ``synchronous=FULL``.

Pure Python, no Ray: the actor in :mod:`inference.queue.actor` wraps one :class:`QueueStore`, and
unit tests drive a store directly with injected clocks. Every public method that changes state
is one transaction. What the hot paths need is mirrored in memory: counts per job and state,
leasable items per priority and job, and the outstanding leases (epoch, deadline, holder). The
mirror is rebuilt from the database at start and changed only after a transaction commits, so
fencing checks, sweeps and counters cost no query.

States of an item::

    pending ──lease──> leased ──complete──> done
       ^                 │  ──fail (permanent, or attempts spent)──> dead ──redrive──> pending
       │                 │  ──fail (transient)──> waiting (backoff) ──retry_at──> pending
       └─expire/release──┘

``waiting`` is reported as pending (it is backlog); it is a state of its own only so that a lease
never scans past items that are backing off. A lease token is ``(item rowid, epoch)``; the epoch
grows with every lease of that item, so a call carrying an older epoch is refused (fencing).

Lease deadlines are on the queue's own monotonic clock; retry backoffs and scheduled jobs are on
the wall clock (they must mean the same thing after a restart).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from inference.errors import JobConflict, QueueError, StorageError
from inference.queue import pg, reports
from inference.queue.admission import admit
from inference.queue.backoff import backoff_s
from inference.queue.db import (
    DB_ERRORS,
    DEAD,
    DONE,
    LEASED,
    PENDING,
    STATE_NAMES,
    WAITING,
    Transaction,
    connect,
    connect_read_only,
    hold_owner_lock,
    json_checker,
)
from inference.queue.dialect import ITEM_COLUMNS, dialect_of
from inference.queue.fairness import fair_shares, fit_token_budget
from inference.queue.mirror import BACKLOG, CAUSES, Held, Job, Lease, Mirror, Move, Tally
from inference.queue.records import (
    EnqueueResult,
    JobSpec,
    LeasedItem,
    LeaseToken,
    NewItem,
    Packed,
    Refusal,
    TokenCheck,
    resume_conflicts,
)
from inference.schema import CUSTOM_ID
from inference.shards import fill_shard_number

__all__ = [
    "DEAD",
    "DONE",
    "LEASED",
    "PENDING",
    "STATE_NAMES",
    "WAITING",
    "EnqueueResult",
    "JobSpec",
    "LeaseToken",
    "LeasedItem",
    "NewItem",
    "QueueStore",
    "Refusal",
    "TokenCheck",
]

logger = logging.getLogger(__name__)

_CAUSE_COLUMN = {"error": "n_error", "lease_expired": "n_expired", "worker_lost": "n_lost"}
_FREE_CAUSES = ("drained", "engine_fatal")  # returned without charging an attempt
_MESSAGE_MAX = 2000
_INSERT_CHUNK = 128  # rows per multi-row INSERT (one statement binds them all in C)

# Both read from the lane's head (see Mirror.heads): without the lower bound PostgreSQL's
# planner takes the primary key for `ORDER BY id LIMIT` (it expects the lane's rows spread over
# the table) and walks every done row of older jobs first: 40 ms a lease at 260,000 of them.
_PICK_SQL = (
    "SELECT id, epoch, item_id, payload, attempts, tokens, n_lost + n_expired > 0 FROM items"
    " WHERE job_id = ? AND pool = ? AND priority = ? AND state = 0 AND id >= ?"
    " ORDER BY id LIMIT ?"
)
# The picked rows are exactly the first ones of the partial index, so a range takes them all.
_TAKE_SQL = (
    "UPDATE items SET state = 1, epoch = epoch + 1, deadline = ?, lease_s = ?, worker = ?"
    " WHERE job_id = ? AND pool = ? AND priority = ? AND state = 0 AND id >= ? AND id <= ?"
)
RECONNECT_S = 60.0  # how long a store waits for a lost PostgreSQL to take connections again


class _Diverged(QueueError):
    """The database did not match the in-memory mirror (another writer on the file?). The
    transaction is rolled back; the store reloads its mirror and retries once."""


def _reconnecting(method: Callable[..., Any]) -> Callable[..., Any]:
    """On PostgreSQL, a call that met a lost connection reconnects, reloads the mirror (a cut
    ``COMMIT`` may or may not have committed: the database says which) and runs once more.
    Only for calls whose second run is safe after an unknown outcome: the idempotent ones,
    and those whose first run, had it committed, leaves the second to be fenced off (a lease
    taken twice lets the first lease expire: it is never lost)."""

    @functools.wraps(method)
    def call(self: QueueStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (StorageError, *DB_ERRORS):
            if not self._reconnect():
                raise
        return method(self, *args, **kwargs)

    return call


class QueueStore:
    """All queue state transitions, each one database transaction (SQLite, or PostgreSQL when
    ``path`` is a ``postgresql://`` URL), with one writer per database (see
    :mod:`inference.queue.shared` for several)."""

    shared = False

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        read_only: bool = False,
        owner_wait_s: float | None = None,
    ) -> None:
        """``read_only``: for looking (``inference status``): no migration, no sweep, and any
        call that would change the database fails with :class:`StorageError`.
        ``owner_wait_s``: become the database's one writer first (what a WorkQueue and an
        operator command without a cluster do), waiting up to that long for another owner to
        end; raises :class:`DatabaseOwned` when it does not."""
        self.read_only = read_only
        self._clock = clock
        self._wall = wall
        self._rng = rng or random.Random()
        self._owner_fd: int | None = None
        self._owner_wait_s = owner_wait_s
        if pg.is_postgres_url(str(path)):
            self.path = pg.redact(str(path))
            self._db: Any = pg.connect(str(path), read_only=read_only, owner_wait_s=owner_wait_s)
        elif read_only:
            self.path = str(path)
            self._db = connect_read_only(Path(path))
        else:
            self.path = str(path)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if owner_wait_s is not None:
                self._owner_fd = hold_owner_lock(Path(path), wait_s=owner_wait_s)
            self._db = connect(Path(path), wall())
        self._d = dialect_of(self._db)
        self._all_json = json_checker(self._db)
        self._m = Mirror()
        self._rr: Counter[int] = Counter()  # round-robin cursor per priority
        # Lower bounds of the earliest lease deadline and retry time: a sweep runs only when a
        # clock has passed one of them, so most calls cost no sweep at all.
        self._next_expiry = -math.inf
        self._next_wake = -math.inf
        self._m.load(self._db)

    # ----------------------------------------------------------------- startup and recovery
    def _reconnect(self) -> bool:
        """After a :class:`StorageError`: when its cause was a lost PostgreSQL session, a new
        one (the owner lock again) and the mirror reloaded; False when the error was another."""
        if not isinstance(self._db, pg.PgConnection) or not self._db.broken:
            return False
        self._db.reconnect(RECONNECT_S, lock_wait_s=self._owner_wait_s or 0.0)
        self._resync("the connection to the database was lost")
        return True

    def _resync(self, why: str) -> None:
        logger.error("reloading the queue state from %s: %s", self.path, why)
        self._m.load(self._db)
        self._next_expiry = self._next_wake = -math.inf

    @_reconnecting
    def rearm_leases(self, default_lease_s: float = 60.0) -> int:
        """After a restart the old monotonic deadlines mean nothing: give every outstanding lease
        a full lease period from now. Leases that were out at the crash then expire normally.
        The leased items are the ones the mirror loaded, so no scan of the table finds them."""
        now = self._clock()
        with self._tx():
            cur = self._db.execute(
                "UPDATE items SET deadline = ? + COALESCE(lease_s, ?)"
                f" WHERE id IN {self._d.ids} AND state = 1",
                (now, default_lease_s, json.dumps(list(self._m.leases))),
            )
        for lease in self._m.leases.values():
            lease.deadline = now + (default_lease_s if lease.lease_s is None else lease.lease_s)
        self._next_expiry = -math.inf  # recomputed by the next sweep
        return cur.rowcount

    def _tx(self) -> Transaction:
        return Transaction(self._db)

    @property
    def db(self) -> Any:
        """The store's connection (a :class:`sqlite3.Connection` or a
        :class:`~inference.queue.pg.PgConnection`), for ledgers that keep tables beside it
        (provider batches)."""
        return self._db

    # ----------------------------------------------------------------- sweeps
    def _sweep(self) -> float:
        """Expire passed leases and wake items whose backoff ended, when (and only when) a
        clock has passed the earliest known deadline; returns now on the monotonic clock."""
        now = self._clock()
        if self.read_only:
            return now  # a look changes nothing: leases expire when the owner sweeps
        if now >= self._next_expiry:
            self._expire(now)
        wall = self._wall()
        if wall >= self._next_wake:
            self._wake(wall)
        return now

    @_reconnecting
    def expire_leases(self) -> int:
        """Return items whose lease deadline passed to pending (or to the dead letters once
        their attempts are spent). Counted as an attempt with cause ``lease_expired``."""
        now = self._clock()
        return self._expire(now) if now >= self._next_expiry else 0

    def _expire(self, now: float) -> int:
        expired = [(i, h) for i, h in self._m.leases.items() if h.deadline < now]
        if expired:
            with self._tx():
                moves = self._return(expired, "lease_expired", self._wall())
            self._m.settle(moves, "lease_expired")
            _log_moves("leases expired", moves)
        self._next_expiry = self._m.earliest_deadline()
        return len(expired)

    def _wake(self, wall: float) -> None:
        earliest = self._earliest_retry()
        if earliest is not None and earliest <= wall:
            with self._tx():
                woken = self._db.execute(
                    "UPDATE items SET state = 0, retry_at = NULL"
                    " WHERE retry_at IS NOT NULL AND retry_at <= ? AND state = 4"
                    " RETURNING job_id, priority, tokens, pool, id",
                    (wall,),
                ).fetchall()
            self._m.tally(woken, WAITING, PENDING)
            earliest = self._earliest_retry()
        self._next_wake = math.inf if earliest is None else earliest

    def _earliest_retry(self) -> float | None:
        (earliest,) = self._db.execute(
            "SELECT MIN(retry_at) FROM items WHERE retry_at IS NOT NULL"
        ).fetchone()
        return None if earliest is None else float(earliest)

    # ----------------------------------------------------------------- jobs
    @_reconnecting
    def create_job(self, spec: JobSpec) -> bool:
        """Register a job; returns False when it exists already (a resume). A resume may change
        what :data:`RESUME_FIXED` does not name (the new values hold from now on); one that
        changes the pool, priority, schedule or output raises :class:`JobConflict`."""
        if not CUSTOM_ID.match(spec.job_id) or spec.job_id in (".", ".."):
            raise QueueError(f"job id {spec.job_id!r} must match {CUSTOM_ID.pattern}")
        if spec.max_attempts < 1:
            raise QueueError(f"max_attempts must be at least 1, not {spec.max_attempts}")
        if spec.job_id in self._m.jobs:
            self._resume(self._m.jobs[spec.job_id], spec)
            return False
        now = self._wall()
        with self._tx():
            created = self._db.execute(
                "INSERT INTO jobs(job_id, pool, priority, state, spec, not_before, created_at)"
                " VALUES (?, ?, ?, 'active', ?, ?, ?) ON CONFLICT DO NOTHING",
                (spec.job_id, spec.pool, spec.priority, spec.to_json(), spec.not_before, now),
            ).rowcount
        if not created:  # another writer of a shared database created it meanwhile
            self._resync(f"job {spec.job_id} was created by another writer")
            self._resume(self._m.job(spec.job_id), spec)
            return False
        self._m.jobs[spec.job_id] = Job(spec=spec, state="active", created_at=now)
        logger.info("job created job=%s pool=%s priority=%d", spec.job_id, spec.pool, spec.priority)
        return True

    def _resume(self, job: Job, spec: JobSpec) -> None:
        conflicts = resume_conflicts(job.spec, spec)
        if conflicts:
            raise JobConflict(spec.job_id, conflicts)
        if spec.to_json() != job.spec.to_json():
            with self._tx():
                self._db.execute(
                    "UPDATE jobs SET spec = ? WHERE job_id = ?", (spec.to_json(), spec.job_id)
                )
            job.spec = spec
            logger.info("job resumed with new settings job=%s", spec.job_id)

    @_reconnecting
    def job_spec(self, job_id: str) -> JobSpec:
        return self._m.job(job_id).spec

    def job_ids(self) -> list[str]:
        return list(self._m.jobs)

    @_reconnecting
    def set_job_state(self, job_id: str, state: str, reason: str = "cancelled") -> None:
        """``active`` (resume), ``paused`` or ``cancelled``. Cancelling dead-letters the job's
        pending items with the code ``reason`` (``cancelled``, or ``expired`` when the job's
        completion window passed) so every accepted item still ends somewhere, saying why;
        leased ones finish, or expire and then go to the dead letters too."""
        if state not in ("active", "paused", "cancelled"):
            raise QueueError(f"job state must be active, paused or cancelled, not {state!r}")
        if reason not in _END_MESSAGES:
            raise QueueError(f"a job ends cancelled or expired, not {reason!r}")
        job = self._m.job(job_id)
        if job.state == "cancelled" and state != "cancelled":
            raise QueueError(f"job {job_id!r} is cancelled")
        now = self._wall()
        moved: dict[int, list[tuple[str, int, int, str, int]]] = {}
        with self._tx():
            self._db.execute("UPDATE jobs SET state = ? WHERE job_id = ?", (state, job_id))
            if state == "cancelled":
                for old in BACKLOG:
                    moved[old] = self._db.execute(
                        "UPDATE items SET state = 3, error_kind = 'permanent',"
                        " error_code = ?, error_message = ?, retry_at = NULL,"
                        f" finished_at = ? WHERE job_id = ? AND state = {old}"
                        + (" AND retry_at IS NOT NULL" if old == WAITING else "")
                        + " RETURNING job_id, priority, tokens, pool, id",
                        (reason, _END_MESSAGES[reason], now, job_id),
                    ).fetchall()
        job.state = state
        if state == "cancelled" and job.end_code == "cancelled":  # the first reason holds
            job.end_code = reason
        for old, moves in moved.items():
            self._m.tally(moves, old, DEAD)
        logger.info("job state job=%s state=%s", job_id, state)

    # ----------------------------------------------------------------- enqueue
    @_reconnecting
    def enqueue(
        self, job_id: str, items: Sequence[NewItem], *, max_item_bytes: int = 1_000_000
    ) -> EnqueueResult:
        """Accept items durably, all or nothing: this returns after the commit. Same id and
        payload again (in the queue or in this call): a duplicate, nothing changes. Same id,
        other payload: the whole call is refused as a conflict."""
        job = self._m.job(job_id)
        if job.state == "cancelled":
            raise QueueError(f"job {job_id!r} is cancelled; it takes no more items")
        fresh, duplicates = admit(items, max_item_bytes, self._all_json)
        if not fresh:
            return EnqueueResult(accepted=0, duplicates=duplicates)
        now = self._wall()
        rows = [
            (
                job_id,
                it.item_id,
                it.payload,
                it.pool or job.spec.pool,
                job.spec.priority if it.priority is None else it.priority,
                max(1, it.tokens),
                job.spec.not_before,
                now,
            )
            for it in fresh.values()
        ]
        with self._tx():
            (last_id,) = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()
            if self._insert(rows) < len(rows):
                existing = self._existing(job_id, fresh, last_id)
                rows = [r for r in rows if r[1] not in existing]
                duplicates.extend(existing)
        groups: dict[tuple[int, str], list[int]] = {}
        for r in rows:
            group = groups.setdefault((r[4], r[3]), [0, 0])
            group[0] += 1
            group[1] += r[5]
        for (priority, pool), (n, tokens) in groups.items():
            self._m.shift(job, None, PENDING, priority, n, tokens, pool)
        logger.debug("enqueue job=%s accepted=%d duplicates=%d", job_id, len(rows), len(duplicates))
        return EnqueueResult(accepted=len(rows), duplicates=duplicates)

    def _insert(self, rows: list[tuple[Any, ...]]) -> int:
        """Insert new items, skipping ids the job has already; returns how many went in."""
        if self._d.insert_columns:
            columns = [list(column) for column in zip(*rows, strict=True)]
            return int(self._db.execute(self._d.insert_columns, columns).rowcount)
        inserted = 0
        for start in range(0, len(rows), _INSERT_CHUNK):
            chunk = rows[start : start + _INSERT_CHUNK]
            cursor = self._db.execute(_insert_sql(len(chunk)), [v for row in chunk for v in row])
            inserted += cursor.rowcount
        return inserted

    def _existing(self, job_id: str, fresh: dict[str, NewItem], last_id: int) -> list[str]:
        """Ids of this call that were in the queue before it; raises on another payload."""
        existing = self._db.execute(
            "SELECT item_id, payload FROM items WHERE job_id = ? AND id <= ?"
            f" AND item_id IN {self._d.names}",
            (job_id, last_id, json.dumps(list(fresh))),
        ).fetchall()
        conflicts = sorted(i for i, p in existing if fresh[i].payload != p)
        if conflicts:
            raise QueueError(
                "enqueue refused, nothing accepted: custom_id already holds another payload: "
                + ", ".join(conflicts[:20])
            )
        return [i for i, _ in existing]

    # ----------------------------------------------------------------- leases
    @_reconnecting
    def lease(
        self,
        worker: str,
        max_items: int,
        max_tokens: int | None = None,
        lease_s: float = 60.0,
        pool: str | None = None,
    ) -> list[LeasedItem]:
        """Lease up to ``max_items`` (and about ``max_tokens``; the first item always) pending
        items: highest priority class first; within a class, shared fairly between jobs;
        within a job, FIFO. Each item's epoch grows by one: its token is new."""
        if lease_s <= 0:
            raise QueueError(f"lease_s must be positive, not {lease_s}")
        now = self._sweep()
        worker = self.worker_key(worker)
        try:
            return self._lease(worker, max_items, max_tokens, now + lease_s, lease_s, pool)
        except _Diverged:
            self._resync("the database changed behind the store")
            return self._lease(worker, max_items, max_tokens, now + lease_s, lease_s, pool)

    def _lease(
        self,
        worker: str,
        max_items: int,
        max_tokens: int | None,
        deadline: float,
        lease_s: float,
        pool: str | None,
    ) -> list[LeasedItem]:
        plan = self._plan(max_items, pool) if max_items > 0 else []
        if not plan:
            return []
        with self._tx():
            picks = self._pick(plan)
            if max_tokens is not None:
                sizes = [[row[5] for row in rows] for rows in picks]
                keep = fit_token_budget(sizes, [p for _, _, p, _ in plan], max_tokens)
                picks = [rows[:k] for rows, k in zip(picks, keep, strict=True)]
            picks = _alone_if_suspect(picks)
            self._take(plan, picks, deadline, lease_s, worker)
        out: Packed[LeasedItem] = Packed()
        for (job_id, lane, priority, _), rows in zip(plan, picks, strict=True):
            tokens_sum = 0
            for item_id, epoch, name, payload, attempts, tokens, suspect in rows:
                lease = Lease(
                    epoch + 1, deadline, lease_s, job_id, priority, tokens, attempts, worker, lane
                )
                self._m.leases[item_id] = lease
                out.append(
                    LeasedItem(
                        (item_id, epoch + 1), job_id, name, payload, attempts, tokens, bool(suspect)
                    )
                )
                tokens_sum += tokens
            job = self._m.jobs[job_id]
            self._m.shift(job, PENDING, LEASED, priority, len(rows), tokens_sum, lane)
            if rows:
                self._m.advance(job_id, lane, priority, rows[-1][0])
        self._next_expiry = min(self._next_expiry, deadline)
        logger.debug("leased worker=%s items=%d", worker, len(out))
        return out

    def _pick(self, plan: list[tuple[str, str, int, int]]) -> list[list[Any]]:
        """Inside the lease's transaction: the first pending rows of each planned lane."""
        picks = [self._db.execute(_PICK_SQL, self._pick_params(entry)).fetchall() for entry in plan]
        if any(len(rows) < n for (*_, n), rows in zip(plan, picks, strict=True)):
            raise _Diverged("the counters promised more leasable items")
        return picks

    def _pick_params(self, entry: tuple[str, str, int, int]) -> tuple[str, str, int, int, int]:
        job_id, lane, priority, n = entry
        return (job_id, lane, priority, self._m.head(job_id, lane, priority), n)

    def _take(
        self,
        plan: list[tuple[str, str, int, int]],
        picks: list[list[Any]],
        deadline: float,
        lease_s: float,
        worker: str,
    ) -> None:
        """Inside the lease's transaction: lease the picked rows (each lane's are a prefix of
        its pending index, so one range update per lane takes them)."""
        for (job_id, lane, priority, _), rows in zip(plan, picks, strict=True):
            if rows:
                head = self._m.head(job_id, lane, priority)
                taken = self._db.execute(
                    _TAKE_SQL,
                    (deadline, lease_s, worker, job_id, lane, priority, head, rows[-1][0]),
                ).rowcount
                if taken != len(rows):
                    raise _Diverged("a lease took other rows than it picked")

    def _plan(self, max_items: int, pool: str | None) -> list[tuple[str, str, int, int]]:
        """How many items to take from each (job, pool, priority): classes from the highest,
        and within a class :func:`fair_shares` over the leasable lanes (a job's items for one
        pool; a worker leases for its own pool, so these are jobs), rotated call by call."""
        wall = self._wall()
        plan: list[tuple[str, str, int, int]] = []
        room = max_items
        for priority in sorted(self._m.ready, reverse=True):
            lanes = [
                (lane, n)
                for lane, n in self._m.ready[priority].items()
                if (pool is None or lane[1] == pool) and self._leasable(self._m.jobs[lane[0]], wall)
            ]
            if not lanes:
                continue
            start = self._rr[priority] % len(lanes)
            self._rr[priority] += 1
            lanes = lanes[start:] + lanes[:start]
            shares = fair_shares([n for _, n in lanes], room)
            for ((job_id, lane_pool), _), share in zip(lanes, shares, strict=True):
                if share:
                    plan.append((job_id, lane_pool, priority, share))
                    room -= share
            if room <= 0:
                break
        return plan

    @staticmethod
    def _leasable(job: Job, wall: float) -> bool:
        return job.state == "active" and job.schedule.runnable(wall)

    @_reconnecting
    def check_tokens(self, tokens: Iterable[LeaseToken]) -> TokenCheck:
        """Which tokens still hold their lease (right epoch, still leased, not expired)."""
        held, refused = self._fence(_tokens(tokens), self._clock())
        return TokenCheck([(i, h.epoch) for i, h in held], refused)

    def _fence(
        self, tokens: list[LeaseToken], now: float, *, check_deadline: bool = True
    ) -> tuple[list[Held], list[Refusal]]:
        """Split tokens into the leases they still hold and refusals with the reason (a plain
        empty list when there are none: Ray ships that at no cost)."""
        held: list[Held] = []
        refused: list[Refusal] = Packed()
        unclear: list[LeaseToken] = []
        for token in tokens:
            lease = self._m.leases.get(token[0])
            if lease is None or lease.epoch != token[1]:
                unclear.append(token)
            elif check_deadline and lease.deadline < now:
                refused.append(Refusal(token, "lease expired"))
            else:
                held.append((token[0], lease))
        if unclear:
            refused.extend(self._why_not_held(unclear))
        return held, refused or []

    def _why_not_held(self, tokens: list[LeaseToken]) -> list[Refusal]:
        current = {
            row[0]: row[1:]
            for row in self._db.execute(
                f"SELECT id, epoch, state FROM items WHERE id IN {self._d.ids}",
                (json.dumps([t[0] for t in tokens]),),
            )
        }
        refusals = []
        for token in tokens:
            row = current.get(token[0])
            if row is None:
                reason = "unknown item"
            elif row[0] != token[1]:
                reason = f"stale lease: epoch {token[1]}, now {row[0]}"
            else:
                reason = f"not leased (state {STATE_NAMES[row[1]]})"
            refusals.append(Refusal(token, reason))
        return refusals

    @_reconnecting
    def extend(self, tokens: Sequence[LeaseToken], lease_s: float) -> list[Refusal]:
        """Heartbeat: push the deadline of still-valid leases ``lease_s`` from now."""
        if lease_s <= 0:
            raise QueueError(f"lease_s must be positive, not {lease_s}")
        now = self._sweep()
        held, refused = self._fence(_tokens(tokens), now)
        if held:
            deadline = now + lease_s
            with self._tx():
                self._db.execute(
                    f"UPDATE items SET deadline = ?, lease_s = ? WHERE {self._d.held}"
                    " AND state = 1",
                    (deadline, lease_s, self._d.held_param(held)),
                )
            for _, lease in held:
                lease.deadline = deadline
                lease.lease_s = lease_s
        return refused

    @_reconnecting
    def release(self, tokens: Sequence[LeaseToken], cause: str = "drained") -> list[Refusal]:
        """Give leased items back to pending. ``drained`` (a planned stop) and
        ``engine_fatal`` (the worker's engine died under the item: the engine's fault, not the
        item's) cost no attempt; any other cause (``worker_lost``) counts one, and
        dead-letters the item when its attempts are spent (a poison item that kills its
        workers must end somewhere)."""
        now = self._sweep()
        held, refused = self._fence(_tokens(tokens), now)
        if cause not in _FREE_CAUSES and cause not in _CAUSE_COLUMN:
            cause = "worker_lost"  # an unplanned loss we have no name for still costs
        if held:
            with self._tx():
                moves = self._return(held, cause, self._wall())
            self._m.settle(moves, cause)
            _log_moves(f"released cause={cause}", moves)
        return refused

    @_reconnecting
    def release_worker(self, worker: str, cause: str = "worker_lost") -> int:
        """Return every item a worker holds (it died, or it was drained)."""
        self._sweep()
        key = self.worker_key(worker)
        tokens = [(i, h.epoch) for i, h in self._m.leases.items() if h.worker == key]
        self.release(tokens, cause=cause)
        return len(tokens)

    def _return(self, held: list[Held], cause: str, wall: float) -> list[Move]:
        """Inside a transaction: leased items back to pending, or to the dead letters when the
        job is cancelled or a charged attempt was the last."""
        column = _CAUSE_COLUMN.get(cause)
        moves: list[Move] = []
        params = []
        for item_id, lease in held:
            job = self._m.jobs[lease.job_id]
            code = None
            if job.state == "cancelled":
                code = job.end_code
            elif column and lease.attempts + 1 >= job.spec.max_attempts:
                code = cause
            moves.append((item_id, lease, PENDING if code is None else DEAD))
            params.append(
                {
                    "state": moves[-1][2],
                    "charged": int(column is not None),
                    "code": code,
                    "message": None if code is None else _dead_message(code, lease.attempts + 1),
                    "wall": wall,
                    "cause": cause,
                    "id": item_id,
                    "epoch": lease.epoch,
                }
            )
        count_cause = f", {column} = {column} + 1" if column else ""
        self._db.executemany(
            "UPDATE items SET state = :state, attempts = attempts + :charged,"
            " worker = NULL, deadline = NULL,"
            " error_kind = CASE WHEN CAST(:code AS TEXT) IS NULL THEN error_kind"
            " ELSE 'transient' END,"
            " error_code = COALESCE(CAST(:code AS TEXT), error_code),"
            " error_message = COALESCE(CAST(:message AS TEXT), error_message),"
            " finished_at = CASE WHEN CAST(:code AS TEXT) IS NULL THEN NULL ELSE :wall END,"
            " history = "
            + self._d.history("'at', :wall, 'cause', CAST(:cause AS TEXT), 'worker', worker")
            + f"{count_cause} WHERE id = :id AND epoch = :epoch AND state = 1",
            params,
        )
        return moves

    # ----------------------------------------------------------------- outcomes
    @_reconnecting
    def complete(self, tokens: Sequence[LeaseToken], shard: int | None = None) -> list[Refusal]:
        """Mark leased items done (for consumers whose results live elsewhere; shard writers
        go through :meth:`commit_shard`). Fenced: a token that lost its lease is refused and
        its item is left alone."""
        now = self._sweep()
        wanted = _tokens(tokens)
        try:
            return self._complete_tokens(wanted, shard, now)
        except _Diverged:
            self._resync("the database changed behind the store")
            return self._complete_tokens(wanted, shard, now)

    def _complete_tokens(
        self, tokens: list[LeaseToken], shard: int | None, now: float
    ) -> list[Refusal]:
        held, refused = self._fence(tokens, now)
        if held:
            with self._tx():
                self._complete(held, shard, self._wall())
            self._m.settle([(i, h, DONE) for i, h in held], None)
        return refused

    def _complete(self, held: list[Held], shard: int | None, wall: float) -> None:
        """Inside a transaction: these leased items to done."""
        done = self._db.execute(
            "UPDATE items SET state = 2, shard = ?, worker = NULL, deadline = NULL,"
            f" attempts = attempts + 1, finished_at = ? WHERE {self._d.held} AND state = 1",
            (shard, wall, self._d.held_param(held)),
        ).rowcount
        if done != len(held):
            raise _Diverged(f"{len(held) - done} held lease(s) were not leased in the database")

    @_reconnecting
    def fail(
        self, tokens: Sequence[LeaseToken], kind: str, code: str, message: str
    ) -> list[Refusal]:
        """An attempt failed. ``permanent``: dead letter now. Any other kind (``transient``,
        or one this queue does not know) is transient: pending again after an exponential
        backoff with full jitter, until ``max_attempts``."""
        now = self._sweep()
        kind = "permanent" if kind == "permanent" else "transient"
        held, refused = self._fence(_tokens(tokens), now)
        if not held:
            return refused
        wall = self._wall()
        moves: list[Move] = []
        params = []
        wake_at = math.inf
        for item_id, lease in held:
            job = self._m.jobs[lease.job_id]
            attempt = lease.attempts + 1
            dead = kind == "permanent" or attempt >= job.spec.max_attempts
            dead = dead or job.state == "cancelled"
            retry_at = wall if dead else wall + self._backoff_s(job.spec, attempt)
            wake_at = wake_at if dead else min(wake_at, retry_at)
            moves.append((item_id, lease, DEAD if dead else WAITING))
            params.append(
                {
                    "state": moves[-1][2],
                    "retry_at": retry_at,
                    "dead": dead,
                    "wall": wall,
                    "kind": kind,
                    "code": code,
                    "message": message[:_MESSAGE_MAX],
                    "note": message[:500],
                    "id": item_id,
                    "epoch": lease.epoch,
                }
            )
        with self._tx():
            self._db.executemany(
                "UPDATE items SET state = :state, attempts = attempts + 1, n_error = n_error + 1,"
                " worker = NULL, deadline = NULL, not_before = :retry_at,"
                " retry_at = CASE WHEN :dead THEN NULL ELSE :retry_at END, error_kind = :kind,"
                " error_code = :code, error_message = :message,"
                " finished_at = CASE WHEN :dead THEN :wall END,"
                " history = "
                + self._d.history(
                    "'at', :wall, 'cause', 'error', 'kind', CAST(:kind AS TEXT),"
                    " 'code', CAST(:code AS TEXT), 'message', CAST(:note AS TEXT),"
                    " 'worker', worker"
                )
                + " WHERE id = :id AND epoch = :epoch AND state = 1",
                params,
            )
        self._m.settle(moves, "error")
        self._next_wake = min(self._next_wake, wake_at)
        _log_moves(f"failed kind={kind} code={code}", moves)
        return refused

    def _backoff_s(self, spec: JobSpec, attempt: int) -> float:
        return backoff_s(attempt, spec.backoff_base_s, spec.backoff_max_s, self._rng)

    # ----------------------------------------------------------------- shards
    @_reconnecting
    def declare_shard(
        self, job_id: str, tokens: Sequence[LeaseToken], worker: str, path: str, tmp_path: str
    ) -> tuple[int, list[Refusal]]:
        """Reserve shard number ``n`` for the rows of these leased items. Paths may contain
        ``{n}``; the stored paths have it filled in. Refused tokens are left out."""
        now = self._sweep()
        job = self._m.job(job_id)
        held, refused = self._fence(_tokens(tokens), now)
        with self._tx():
            # Numbered by the database, not the mirror: writers of a shared database never
            # draw the same number.
            (n,) = self._db.execute(
                "UPDATE jobs SET next_shard = next_shard + 1 WHERE job_id = ?"
                " RETURNING next_shard - 1",
                (job_id,),
            ).fetchone()
            self._db.execute(
                "INSERT INTO shards(job_id, n, state, path, tmp_path, tokens, worker, created_at)"
                " VALUES (?, ?, 'declared', ?, ?, ?, ?, ?)",
                (
                    job_id,
                    n,
                    fill_shard_number(path, n),
                    fill_shard_number(tmp_path, n),
                    json.dumps([(i, h.epoch) for i, h in held]),
                    self.worker_key(worker),
                    self._wall(),
                ),
            )
        job.next_shard = n + 1
        return n, refused

    def worker_key(self, worker: str) -> str:
        """How the database names a worker (in leases and shards): its own name here; a
        shared database tells clusters' workers apart (:mod:`inference.queue.shared`)."""
        return worker

    def orphaned_shards(self) -> list[dict[str, Any]]:
        """Declared shards whose writer is gone, for the WorkQueue to settle (a publish that
        happened is completed, one that did not is aborted): at the start of the one owner,
        every declared shard. :meth:`release_orphans` once they are settled."""
        return self.declared_shards()

    def orphans_due(self) -> bool:
        """Whether the WorkQueue should look for orphaned shards now (the one owner: only at
        its start)."""
        return False

    def release_orphans(self) -> None:
        """The orphans of :meth:`orphaned_shards` are settled."""

    @_reconnecting
    def shard(self, job_id: str, n: int) -> dict[str, Any]:
        return reports.shard(self._db, job_id, n)

    @_reconnecting
    def declared_shards(self) -> list[dict[str, Any]]:
        keys = self._db.execute("SELECT job_id, n FROM shards WHERE state = 'declared'").fetchall()
        return [self.shard(job_id, n) for job_id, n in keys]

    def commit_shard(
        self,
        job_id: str,
        n: int,
        *,
        rows: int,
        nbytes: int,
        usage: dict[str, float] | None = None,
        check_leases: bool = True,
    ) -> None:
        """Complete the items of a published shard, in one transaction with the shard record.
        With ``check_leases=False`` the caller checked (under the same actor turn, before the
        publish) that the leases are held, so a deadline passed since does not count; an item
        is still completed only under the epoch the shard names."""
        try:
            self._commit_shard_fenced(job_id, n, rows, nbytes, usage or {}, check_leases)
        except (StorageError, *DB_ERRORS):
            if not self._reconnect():
                raise
            # The session was lost, maybe in the COMMIT itself: the database says whether it
            # committed. If not, it is done now, fenced again on the reloaded mirror.
            if reports.shard(self._db, job_id, n)["state"] != "committed":
                self._commit_shard_fenced(job_id, n, rows, nbytes, usage or {}, check_leases)

    def _commit_shard_fenced(
        self,
        job_id: str,
        n: int,
        rows: int,
        nbytes: int,
        usage: dict[str, float],
        check_leases: bool,
    ) -> None:
        try:
            self._commit_shard(job_id, n, rows, nbytes, usage, check_leases)
        except _Diverged as exc:
            # The file and the mirror disagree: reload from the file and fence again. The
            # shard commits only if the database, too, holds every one of its leases.
            self._resync(str(exc))
            self._commit_shard(job_id, n, rows, nbytes, usage, check_leases)

    def _commit_shard(
        self,
        job_id: str,
        n: int,
        rows: int,
        nbytes: int,
        usage: dict[str, float],
        check_leases: bool,
    ) -> None:
        tokens = self.shard(job_id, n)["tokens"]
        now = self._sweep() if check_leases else self._clock()
        held, refused = self._fence(tokens, now, check_deadline=check_leases)
        if refused:
            raise QueueError(f"shard {n} of {job_id}: {len(refused)} lease(s) no longer held")
        job = self._m.job(job_id)
        prompt = int(usage.get("prompt_tokens", 0))
        completion = int(usage.get("completion_tokens", 0))
        busy_s = float(usage.get("busy_s", 0.0))
        # A shard is one worker's, so of one pool: the usage is that pool's.
        pool = held[0][1].pool if held else None
        wall = self._wall()
        with self._tx():
            self._complete(held, n, wall)
            self._db.execute(
                "UPDATE shards SET state = 'committed', rows = ?, bytes = ?, committed_at = ?"
                " WHERE job_id = ? AND n = ?",
                (rows, nbytes, wall, job_id, n),
            )
            self._db.execute(
                "UPDATE jobs SET prompt_tokens = prompt_tokens + ?,"
                " completion_tokens = completion_tokens + ?, busy_s = busy_s + ? WHERE job_id = ?",
                (prompt, completion, busy_s, job_id),
            )
            if pool is not None:
                self._db.execute(
                    "INSERT INTO pool_usage(job_id, pool, prompt_tokens, completion_tokens,"
                    " busy_s) VALUES (?, ?, ?, ?, ?) ON CONFLICT(job_id, pool) DO UPDATE SET"
                    " prompt_tokens = pool_usage.prompt_tokens + excluded.prompt_tokens,"
                    " completion_tokens = pool_usage.completion_tokens"
                    " + excluded.completion_tokens,"
                    " busy_s = pool_usage.busy_s + excluded.busy_s",
                    (job_id, pool, prompt, completion, busy_s),
                )
        self._m.settle([(i, h, DONE) for i, h in held], None)
        job.use(prompt, completion, busy_s)
        if pool is not None:
            job.pool(pool).use(prompt, completion, busy_s)

    @_reconnecting
    def abort_shard(self, job_id: str, n: int) -> None:
        with self._tx():
            self._db.execute(
                "UPDATE shards SET state = 'aborted' WHERE job_id = ? AND n = ?", (job_id, n)
            )

    @_reconnecting
    def committed_shards(self, job_id: str) -> list[dict[str, Any]]:
        return reports.committed_shards(self._db, job_id)

    @_reconnecting
    def shards_from(self, job_id: str, low: int = 0) -> list[dict[str, Any]]:
        return reports.shards_from(self._db, job_id, low)

    # ----------------------------------------------------------------- dead letters
    @_reconnecting
    def dead_letters(self, job_id: str, limit: int = 1000, after: int = 0) -> list[dict[str, Any]]:
        """A page of a job's dead letters (``after``: the last ``id`` of the previous page),
        each with its reason, error code, message, attempts by cause and history."""
        self._m.job(job_id)
        self._sweep()
        return reports.dead_letters(self._db, job_id, limit, after)

    @_reconnecting
    def redrive(
        self, job_id: str, item_ids: Sequence[str] | None = None, batch_ok: bool = False
    ) -> int:
        """Dead letters back to pending with a fresh attempt budget (history and the counts by
        cause are kept). Only dead items move: one completed meanwhile stays completed. An
        OpenAI batch's only with ``batch_ok``: the Controller's, which keeps its files whole."""
        job = self._m.job(job_id)
        if job.state == "cancelled":
            raise QueueError(f"job {job_id!r} is cancelled; resume is not possible")
        if job.spec.settings.get("kind") == "openai_batch" and not batch_ok:
            raise QueueError(
                f"job {job_id!r} is an OpenAI batch: redrive it through the server"
                f" (POST /v1/jobs/{job_id}/redrive), which keeps its output files whole"
            )
        query = (
            "UPDATE items SET state = 0, attempts = 0, not_before = 0, error_kind = NULL,"
            " error_code = NULL, error_message = NULL, finished_at = NULL,"
            " history = "
            + self._d.history("'at', CAST(? AS DOUBLE PRECISION), 'cause', 'redrive'")
            + " WHERE job_id = ? AND error_kind IS NOT NULL AND state = 3"
        )
        params: tuple[Any, ...] = (self._wall(), job_id)
        if item_ids is not None:
            query += f" AND item_id IN {self._d.names}"
            params += (json.dumps(list(item_ids)),)
        with self._tx():
            rows = self._db.execute(
                query + " RETURNING job_id, priority, tokens, pool, id", params
            ).fetchall()
        self._m.tally(rows, DEAD, PENDING)
        logger.info("redrive job=%s items=%d", job_id, len(rows))
        return len(rows)

    def move_pending(self, job_id: str, source: str, target: str, n: int) -> int:
        """Move up to ``n`` of a job's pending items from one engine pool to another: those
        that would be leased last (lowest priority, newest). Only pending items move, in one
        transaction, so an item is in exactly one pool at every moment and no lease, epoch or
        commit is touched (what keeps overflow routing exactly once). Returns how many moved."""
        job = self._m.job(job_id)
        if n <= 0 or source == target:
            return 0
        # A priority at a time, from the lowest, each read from its newest id backwards (on
        # PostgreSQL the lane index lists done items too: a sort by priority, id DESC would
        # read every one of the lane's).
        priorities = sorted(p for p, lanes in self._m.ready.items() if (job_id, source) in lanes)
        rows: list[Any] = []
        with self._tx():
            for priority in priorities:
                if len(rows) >= n:
                    break
                rows += self._db.execute(
                    "UPDATE items SET pool = ? WHERE id IN (SELECT id FROM items WHERE job_id = ?"
                    " AND pool = ? AND priority = ? AND state = 0 ORDER BY id DESC LIMIT ?)"
                    " RETURNING priority, tokens, id",
                    (target, job_id, source, priority, n - len(rows)),
                ).fetchall()
        groups: dict[int, list[int]] = {}
        for priority, tokens, item_id in rows:
            group = groups.setdefault(priority, [0, 0, item_id])
            group[0] += 1
            group[1] += tokens
            group[2] = min(group[2], item_id)
        for priority, (count, tokens, lowest) in groups.items():
            self._m.repool(job, source, target, priority, count, tokens, lowest)
        if rows:
            logger.info("job=%s: %d pending items %s -> %s", job_id, len(rows), source, target)
        return len(rows)

    # ----------------------------------------------------------------- reads
    @_reconnecting
    def stats(self, job_id: str | None = None) -> dict[str, Any]:
        """Counts by job and state, pending tokens, age of the oldest pending item, lease
        expiries and attempts by cause: for progress and for the scaler. Without a job id:
        ``{"jobs": {...}, "totals": {...}}``."""
        self._sweep()
        wall = self._wall()
        if job_id is not None:
            return self._job_stats(job_id, wall)
        jobs = {jid: self._job_stats(jid, wall) for jid in self._m.jobs}
        return {"jobs": jobs, "totals": reports.totals(jobs.values())}

    def _job_stats(self, job_id: str, wall: float) -> dict[str, Any]:
        job = self._m.job(job_id)
        figures = _tally_stats(job)
        return {
            "job_id": job_id,
            "state": job.state,
            "pool": job.spec.pool,
            "priority": job.spec.priority,
            "created_at": job.created_at,
            **figures,
            "oldest_pending_s": reports.oldest_pending_s(
                self._db, job_id, self._m.pending_lanes(job_id), figures["waiting"] > 0, wall
            ),
            "lease_expiries": job.attempts_by_cause["lease_expired"],
            "attempts_by_cause": {c: job.attempts_by_cause[c] for c in CAUSES},
            "pools": {name: _tally_stats(t) for name, t in job.pools.items() if t.counts.total()},
            "not_before": job.spec.not_before,
            "windows": list(job.spec.windows),
            # 0: it may lease now (a time would be later than a caller's clock read before).
            "next_run_at": next_run if (next_run := job.schedule.next_run_at(wall)) > wall else 0.0,
        }

    @_reconnecting
    def item(self, job_id: str, item_id: str) -> dict[str, Any] | None:
        """One item's state and attempt record (None when the job has no such item)."""
        self._sweep()
        return reports.item(self._db, job_id, item_id)

    @_reconnecting
    def job_urls(self, job_id: str) -> list[str]:
        """The distinct endpoints of a job's items (for exports: how to shape the answers)."""
        self._m.job(job_id)
        return reports.job_urls(self._db, job_id)

    @_reconnecting
    def item_states(
        self, job_id: str, limit: int = 10_000, after: int = 0
    ) -> list[tuple[int, str, str]]:
        """A page of ``(id, custom_id, state)`` of a job's items (``after``: the last id of the
        previous page): for audits, such as checking that nothing was lost."""
        self._m.job(job_id)
        self._sweep()
        return reports.item_states(self._db, job_id, limit, after)

    def close(self) -> None:
        self._db.close()
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None


def _tokens(tokens: Iterable[Sequence[int]]) -> list[LeaseToken]:
    """Tokens as int pairs, duplicates dropped (they may arrive as JSON lists)."""
    try:
        return list(dict.fromkeys((int(t[0]), int(t[1])) for t in tokens))
    except (TypeError, ValueError, IndexError) as exc:
        raise QueueError(f"lease tokens must be (item, epoch) pairs of integers: {exc}") from None


_INSERT_SQL: dict[int, str] = {}


def _tally_stats(t: Tally) -> dict[str, Any]:
    """Counts, backlog and usage of a job, or of its items for one pool (what a scaler and a
    progress line read)."""
    counts = t.counts
    pending = counts[PENDING] + counts[WAITING]
    return {
        "pending": pending,
        "waiting": counts[WAITING],
        "leased": counts[LEASED],
        "done": counts[DONE],
        "dead": counts[DEAD],
        "total": pending + counts[LEASED] + counts[DONE] + counts[DEAD],
        "pending_tokens": t.pending_tokens,
        "pending_by_priority": {p: n for p, n in t.pending_by_priority.items() if n},
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "busy_s": t.busy_s,
    }


def _insert_sql(n_rows: int) -> str:
    """A multi-row INSERT for ``n_rows`` items (cached: SQLite caches the prepared statement
    by its text)."""
    if n_rows not in _INSERT_SQL:
        row = "(" + ", ".join("?" * len(ITEM_COLUMNS)) + ")"
        values = ", ".join([row] * n_rows)
        _INSERT_SQL[n_rows] = (
            f"INSERT INTO items({', '.join(name for name, _ in ITEM_COLUMNS)})"
            f" VALUES {values} ON CONFLICT DO NOTHING"
        )
    return _INSERT_SQL[n_rows]


def _alone_if_suspect(picks: list[list[Any]]) -> list[list[Any]]:
    """A lease stops before the first suspect item (one whose worker was lost, or whose lease
    expired: it may kill its worker), and a suspect first in line is leased alone: it never
    shares a lease, so its worker can run it beside nothing. Prefixes of each lane's rows, as
    the range update that takes them needs."""
    out: list[list[Any]] = []
    for rows in picks:
        first = next((j for j, row in enumerate(rows) if row[6]), None)
        if first is None:
            out.append(rows)
            continue
        taken = any(out)
        out.append(rows[:first] if first or taken else rows[:1])
        out.extend([] for _ in range(len(picks) - len(out)))
        break
    return out


_END_MESSAGES = {  # by JOB_END_CODES
    "cancelled": "the job was cancelled",
    "expired": "the job expired: its completion window passed before the item was done",
}


def _dead_message(code: str, attempts: int) -> str:
    if code in _END_MESSAGES:
        return _END_MESSAGES[code]
    ended = {"lease_expired": "its lease expired", "worker_lost": "its worker was lost"}
    return f"{attempts} attempt(s) spent; the last one ended because {ended.get(code, code)}"


def _log_moves(what: str, moves: list[Move]) -> None:
    """One line per transition batch, with the ids a reader needs to follow an item."""
    dead = [m for m in moves if m[2] == DEAD]
    logger.info(
        "%s items=%d dead=%d first=%s",
        what,
        len(moves),
        len(dead),
        ", ".join(
            f"job={h.job_id} item={i} epoch={h.epoch} worker={h.worker} attempt={h.attempts + 1}"
            for i, h, _ in moves[:3]
        ),
    )
