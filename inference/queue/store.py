"""The durable store behind the WorkQueue: SQLite in WAL mode, ``synchronous=FULL``.

Pure Python, no Ray: the actor in :mod:`inference.queue.actor` wraps one :class:`QueueStore`, and
unit tests drive a store directly with injected clocks. Every public method is one transaction;
in-memory counters (counts per job and state, pending per job and priority) are rebuilt from the
database at start and changed only after a transaction commits.

States of an item: ``pending`` -> ``leased`` -> ``done`` | ``dead`` (dead letters), with
``leased`` -> ``pending`` on a retryable failure, an expired lease, a lost worker or a release.
A lease token is ``(item rowid, epoch)``; the epoch grows with every lease of that item, so a call
carrying an older epoch is refused (fencing).
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.errors import QueueError, StorageError
from inference.queue.backoff import backoff_s
from inference.schema import CUSTOM_ID

logger = logging.getLogger(__name__)

PENDING, LEASED, DONE, DEAD = 0, 1, 2, 3
STATE_NAMES = {PENDING: "pending", LEASED: "leased", DONE: "done", DEAD: "dead"}
LeaseToken = tuple[int, int]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs(
    job_id TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    busy_s REAL NOT NULL DEFAULT 0,
    next_shard INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS items(
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    priority INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    deadline REAL,
    lease_s REAL,
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    n_error INTEGER NOT NULL DEFAULT 0,
    n_expired INTEGER NOT NULL DEFAULT 0,
    n_lost INTEGER NOT NULL DEFAULT 0,
    shard INTEGER,
    error_kind TEXT,
    error_code TEXT,
    error_message TEXT,
    history TEXT,
    enqueued_at REAL NOT NULL,
    finished_at REAL,
    UNIQUE(job_id, item_id)
);
CREATE INDEX IF NOT EXISTS items_pending ON items(job_id, priority, id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS items_leased ON items(deadline) WHERE state = 1;
CREATE INDEX IF NOT EXISTS items_dead ON items(job_id, id) WHERE state = 3;
CREATE TABLE IF NOT EXISTS shards(
    job_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    state TEXT NOT NULL,
    path TEXT NOT NULL,
    tmp_path TEXT NOT NULL,
    tokens TEXT NOT NULL,
    worker TEXT NOT NULL,
    rows INTEGER,
    bytes INTEGER,
    created_at REAL NOT NULL,
    committed_at REAL,
    PRIMARY KEY(job_id, n)
);
"""


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What the queue keeps of a job: where it goes and how its items are retried."""

    job_id: str
    pool: str = "default"
    priority: int = 0
    max_attempts: int = 3
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    not_before: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "max_attempts": self.max_attempts,
                "backoff_base_s": self.backoff_base_s,
                "backoff_max_s": self.backoff_max_s,
                "settings": self.settings,
            }
        )


@dataclass(frozen=True, slots=True)
class NewItem:
    item_id: str
    payload: str
    tokens: int = 1
    priority: int | None = None


@dataclass(frozen=True, slots=True)
class LeasedItem:
    token: LeaseToken
    job_id: str
    item_id: str
    payload: str
    attempts: int
    tokens: int


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    accepted: int
    duplicates: list[str]


@dataclass(frozen=True, slots=True)
class Refusal:
    token: LeaseToken
    reason: str


@dataclass(frozen=True, slots=True)
class TokenCheck:
    valid: list[LeaseToken]
    refused: list[Refusal]


@dataclass(slots=True)
class _Job:
    spec: JobSpec
    state: str  # active | paused | cancelled
    created_at: float
    counts: Counter[int] = field(default_factory=Counter)
    pending_tokens: int = 0
    pending_by_priority: Counter[int] = field(default_factory=Counter)
    expiries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0
    next_shard: int = 0


class QueueStore:
    """All queue state transitions, each one SQLite transaction."""

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._wall = wall
        self._rng = rng or random.Random()
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._jobs: dict[str, _Job] = {}
        self._rr: dict[int, int] = defaultdict(int)  # round-robin cursor per priority
        self._load()

    # ----------------------------------------------------------------- startup and recovery
    def _load(self) -> None:
        for row in self._db.execute(
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
            )
            self._jobs[row[0]] = _Job(
                spec=spec,
                state=row[3],
                created_at=row[6],
                prompt_tokens=row[7],
                completion_tokens=row[8],
                busy_s=row[9],
                next_shard=row[10],
            )
        for job_id, state, priority, n, tokens, expired in self._db.execute(
            "SELECT job_id, state, priority, COUNT(*), SUM(tokens), SUM(n_expired)"
            " FROM items GROUP BY job_id, state, priority"
        ):
            job = self._jobs[job_id]
            job.counts[state] += n
            job.expiries += expired
            if state == PENDING:
                job.pending_tokens += tokens
                job.pending_by_priority[priority] += n

    def rearm_leases(self, default_lease_s: float = 60.0) -> int:
        """After a restart the old monotonic deadlines mean nothing: give every outstanding lease
        a full lease period from now. Leases that were out at the crash then expire normally."""
        now = self._clock()
        with self._tx():
            cur = self._db.execute(
                "UPDATE items SET deadline = ? + COALESCE(lease_s, ?) WHERE state = 1",
                (now, default_lease_s),
            )
        return cur.rowcount

    # ----------------------------------------------------------------- helpers
    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    def _job(self, job_id: str) -> _Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise QueueError(f"unknown job {job_id!r}") from None

    def _move(self, job: _Job, old: int, new: int, priority: int, tokens: int) -> None:
        job.counts[old] -= 1
        job.counts[new] += 1
        if old == PENDING:
            job.pending_tokens -= tokens
            job.pending_by_priority[priority] -= 1
        if new == PENDING:
            job.pending_tokens += tokens
            job.pending_by_priority[priority] += 1

    # ----------------------------------------------------------------- jobs
    def create_job(self, spec: JobSpec) -> bool:
        """Register a job; returns False when it exists already (a resume)."""
        if not CUSTOM_ID.match(spec.job_id):
            raise QueueError(f"job id {spec.job_id!r} must match {CUSTOM_ID.pattern}")
        if spec.job_id in self._jobs:
            return False
        now = self._wall()
        with self._tx():
            self._db.execute(
                "INSERT INTO jobs(job_id, pool, priority, state, spec, not_before, created_at)"
                " VALUES (?, ?, ?, 'active', ?, ?, ?)",
                (spec.job_id, spec.pool, spec.priority, spec.to_json(), spec.not_before, now),
            )
        self._jobs[spec.job_id] = _Job(spec=spec, state="active", created_at=now)
        logger.info("job created job=%s pool=%s priority=%d", spec.job_id, spec.pool, spec.priority)
        return True

    def job_spec(self, job_id: str) -> JobSpec:
        return self._job(job_id).spec

    def job_ids(self) -> list[str]:
        return list(self._jobs)

    def set_job_state(self, job_id: str, state: str) -> None:
        """``active`` (resume), ``paused`` or ``cancelled``. Cancelling dead-letters the job's
        pending items with code ``cancelled`` so every accepted item still ends somewhere."""
        if state not in ("active", "paused", "cancelled"):
            raise QueueError(f"job state must be active, paused or cancelled, not {state!r}")
        job = self._job(job_id)
        if job.state == "cancelled" and state != "cancelled":
            raise QueueError(f"job {job_id!r} is cancelled")
        now = self._wall()
        with self._tx():
            self._db.execute("UPDATE jobs SET state = ? WHERE job_id = ?", (state, job_id))
            moved = 0
            if state == "cancelled":
                moved = self._db.execute(
                    "UPDATE items SET state = 3, error_kind = 'permanent',"
                    " error_code = 'cancelled', error_message = 'the job was cancelled',"
                    " finished_at = ?"
                    " WHERE job_id = ? AND state = 0",
                    (now, job_id),
                ).rowcount
        job.state = state
        if moved:
            job.counts[PENDING] -= moved
            job.counts[DEAD] += moved
            job.pending_tokens = 0
            job.pending_by_priority.clear()
        logger.info("job state job=%s state=%s", job_id, state)

    # ----------------------------------------------------------------- enqueue
    def enqueue(
        self, job_id: str, items: Sequence[NewItem], *, max_item_bytes: int = 1_000_000
    ) -> EnqueueResult:
        """Accept items durably, all or nothing. Same id and payload again: a duplicate.
        Same id, other payload: the whole call is refused as a conflict."""
        job = self._job(job_id)
        if job.state == "cancelled":
            raise QueueError(f"job {job_id!r} is cancelled; it takes no more items")
        problems = []
        fresh: dict[str, NewItem] = {}
        duplicates: list[str] = []
        for i, item in enumerate(items):
            if not isinstance(item.item_id, str) or not CUSTOM_ID.match(item.item_id):
                problems.append(f"items[{i}]: id {item.item_id!r} must match {CUSTOM_ID.pattern}")
            elif len(item.payload.encode()) > max_item_bytes:
                problems.append(f"items[{i}] ({item.item_id}): payload over {max_item_bytes} bytes")
            elif not _is_json_object(item.payload):
                problems.append(f"items[{i}] ({item.item_id}): payload is not a JSON object")
            elif item.priority is not None and not 0 <= item.priority <= 9:
                problems.append(f"items[{i}] ({item.item_id}): priority must be 0..9")
            elif item.item_id in fresh:
                if fresh[item.item_id].payload != item.payload:
                    problems.append(f"items[{i}] ({item.item_id}): repeated with another payload")
                else:
                    duplicates.append(item.item_id)
            else:
                fresh[item.item_id] = item
        if problems:
            raise QueueError("enqueue refused, nothing accepted: " + "; ".join(problems[:20]))
        now = self._wall()
        try:
            with self._tx():
                existing = dict(
                    self._db.execute(
                        "SELECT item_id, payload FROM items WHERE job_id = ? AND item_id IN"
                        " (SELECT value FROM json_each(?))",
                        (job_id, json.dumps(list(fresh))),
                    ).fetchall()
                )
                conflicts = [i for i, p in existing.items() if fresh[i].payload != p]
                if conflicts:
                    raise QueueError(
                        "enqueue refused, nothing accepted: custom_id already holds another "
                        f"payload: {', '.join(sorted(conflicts)[:20])}"
                    )
                rows = [
                    (
                        job_id,
                        it.item_id,
                        it.payload,
                        job.spec.priority if it.priority is None else it.priority,
                        max(1, int(it.tokens)),
                        job.spec.not_before,
                        now,
                    )
                    for it in fresh.values()
                    if it.item_id not in existing
                ]
                self._db.executemany(
                    "INSERT INTO items(job_id, item_id, payload, priority, tokens, not_before,"
                    " enqueued_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
        except sqlite3.Error as exc:
            raise StorageError(f"enqueue failed, nothing accepted: {exc}") from exc
        for row in rows:
            job.counts[PENDING] += 1
            job.pending_tokens += row[4]
            job.pending_by_priority[row[3]] += 1
        duplicates.extend(existing)
        return EnqueueResult(accepted=len(rows), duplicates=duplicates)

    # ----------------------------------------------------------------- leases
    def expire_leases(self) -> int:
        """Return items whose lease deadline passed to pending (or to the dead letters once
        their attempts are spent). Counted as an attempt with cause ``lease_expired``."""
        now = self._clock()
        expired = self._db.execute(
            "SELECT id, job_id, priority, tokens, attempts FROM items"
            " WHERE state = 1 AND deadline < ?",
            (now,),
        ).fetchall()
        if not expired:
            return 0
        wall = self._wall()
        updates = []
        for item_id, job_id, priority, tokens, attempts in expired:
            job = self._jobs[job_id]
            dead = attempts + 1 >= job.spec.max_attempts or job.state == "cancelled"
            updates.append((item_id, dead, job, priority, tokens))
        with self._tx():
            self._db.executemany(
                "UPDATE items SET state = ?, attempts = attempts + 1, n_expired = n_expired + 1,"
                " worker = NULL, deadline = NULL, error_kind = CASE WHEN ? THEN 'transient' END,"
                " error_code = CASE WHEN ? THEN 'lease_expired' END,"
                " error_message = CASE WHEN ? THEN 'the lease expired on every attempt' END,"
                " finished_at = CASE WHEN ? THEN ? END,"
                " history = json_insert(COALESCE(history, '[]'), '$[#]',"
                " json_object('at', ?, 'cause', 'lease_expired')) WHERE id = ?",
                [(DEAD if d else PENDING, d, d, d, d, wall, wall, i) for i, d, *_ in updates],
            )
        for _, dead, job, priority, tokens in updates:
            self._move(job, LEASED, DEAD if dead else PENDING, priority, tokens)
            job.expiries += 1
        logger.info("leases expired: %d", len(updates))
        return len(updates)

    def lease(
        self,
        worker: str,
        max_items: int,
        max_tokens: int | None = None,
        lease_s: float = 60.0,
        pool: str | None = None,
    ) -> list[LeasedItem]:
        """Lease up to ``max_items`` (and about ``max_tokens``) pending items: highest priority
        class first; within a class, shared fairly between jobs; within a job, FIFO."""
        self.expire_leases()
        if max_items <= 0:
            return []
        wall = self._wall()
        eligible: dict[int, list[str]] = defaultdict(list)
        for job_id, job in self._jobs.items():
            if job.state != "active" or job.spec.not_before > wall:
                continue
            if pool is not None and job.spec.pool != pool:
                continue
            for priority, n in job.pending_by_priority.items():
                if n > 0:
                    eligible[priority].append(job_id)
        picked: list[tuple[int, str, int, int]] = []  # (id, job, priority, tokens)
        budget = max_tokens if max_tokens is not None else 1 << 62
        for priority in sorted(eligible, reverse=True):
            jobs = eligible[priority]
            start = self._rr[priority] % len(jobs)
            self._rr[priority] += 1
            jobs = jobs[start:] + jobs[:start]
            while jobs and len(picked) < max_items and budget > 0:
                share = max(1, (max_items - len(picked)) // len(jobs))
                still = []
                for job_id in jobs:
                    want = min(share, max_items - len(picked))
                    if want <= 0:
                        break
                    got = self._db.execute(
                        "SELECT id, tokens FROM items WHERE job_id = ? AND priority = ?"
                        " AND state = 0 AND not_before <= ? AND id > ? ORDER BY id LIMIT ?",
                        (job_id, priority, wall, _last_id(picked, job_id), want),
                    ).fetchall()
                    for item_id, tokens in got:
                        if picked and tokens > budget:
                            budget = 0
                            break
                        picked.append((item_id, job_id, priority, tokens))
                        budget -= tokens
                    if len(got) == want and budget > 0:
                        still.append(job_id)
                jobs = still
            if len(picked) >= max_items or budget <= 0:
                break
        if not picked:
            return []
        deadline = self._clock() + lease_s
        with self._tx():
            rows = self._db.execute(
                "UPDATE items SET state = 1, epoch = epoch + 1, deadline = ?, lease_s = ?,"
                " worker = ? WHERE id IN (SELECT value FROM json_each(?)) AND state = 0"
                " RETURNING id, epoch, job_id, item_id, payload, attempts, tokens, priority",
                (deadline, lease_s, worker, json.dumps([p[0] for p in picked])),
            ).fetchall()
        rows.sort()
        out = []
        for item_id, epoch, job_id, name, payload, attempts, tokens, priority in rows:
            self._move(self._jobs[job_id], PENDING, LEASED, priority, tokens)
            out.append(LeasedItem((item_id, epoch), job_id, name, payload, attempts, tokens))
        return out

    def check_tokens(self, tokens: Iterable[LeaseToken]) -> TokenCheck:
        """Which tokens still hold their lease (right epoch, still leased, not expired)."""
        tokens = [(int(i), int(e)) for i, e in tokens]
        if not tokens:
            return TokenCheck([], [])
        now = self._clock()
        current = {
            row[0]: row[1:]
            for row in self._db.execute(
                "SELECT id, epoch, state, deadline FROM items WHERE id IN"
                " (SELECT value FROM json_each(?))",
                (json.dumps([t[0] for t in tokens]),),
            )
        }
        valid, refused = [], []
        for token in tokens:
            row = current.get(token[0])
            if row is None:
                refused.append(Refusal(token, "unknown item"))
            elif row[0] != token[1]:
                refused.append(Refusal(token, f"stale lease: epoch {token[1]}, now {row[0]}"))
            elif row[1] != LEASED:
                refused.append(Refusal(token, f"not leased (state {STATE_NAMES[row[1]]})"))
            elif row[2] is not None and row[2] < now:
                refused.append(Refusal(token, "lease expired"))
            else:
                valid.append(token)
        return TokenCheck(valid, refused)

    def extend(self, tokens: Sequence[LeaseToken], lease_s: float) -> list[Refusal]:
        """Heartbeat: push the deadline of still-valid leases ``lease_s`` from now."""
        self.expire_leases()
        check = self.check_tokens(tokens)
        if check.valid:
            with self._tx():
                self._db.executemany(
                    "UPDATE items SET deadline = ?, lease_s = ? WHERE id = ? AND epoch = ?",
                    [(self._clock() + lease_s, lease_s, i, e) for i, e in check.valid],
                )
        return check.refused

    def release(self, tokens: Sequence[LeaseToken], cause: str = "drained") -> list[Refusal]:
        """Give leased items back to pending. ``drained`` (a planned stop) costs no attempt;
        ``worker_lost`` counts one."""
        self.expire_leases()
        check = self.check_tokens(tokens)
        charged = cause != "drained"
        rows = self._rows(check.valid)
        wall = self._wall()
        with self._tx():
            self._db.executemany(
                "UPDATE items SET state = 0, worker = NULL, deadline = NULL,"
                " attempts = attempts + ?, n_lost = n_lost + ?,"
                " history = CASE WHEN ? THEN json_insert(COALESCE(history, '[]'), '$[#]',"
                " json_object('at', ?, 'cause', ?)) ELSE history END WHERE id = ?",
                [(int(charged), int(charged), charged, wall, cause, r[0]) for r in rows],
            )
        for _, job_id, priority, tok, _attempts in rows:
            self._move(self._jobs[job_id], LEASED, PENDING, priority, tok)
        return check.refused

    def release_worker(self, worker: str, cause: str = "worker_lost") -> int:
        """Return every item a worker holds (it died, or it was drained)."""
        ids = self._db.execute(
            "SELECT id, epoch FROM items WHERE state = 1 AND worker = ?", (worker,)
        ).fetchall()
        self.release([(i, e) for i, e in ids], cause=cause)
        return len(ids)

    def _rows(self, tokens: Sequence[LeaseToken]) -> list[tuple[int, str, int, int, int]]:
        if not tokens:
            return []
        return self._db.execute(
            "SELECT id, job_id, priority, tokens, attempts FROM items WHERE id IN"
            " (SELECT value FROM json_each(?))",
            (json.dumps([t[0] for t in tokens]),),
        ).fetchall()

    # ----------------------------------------------------------------- outcomes
    def fail(
        self, tokens: Sequence[LeaseToken], kind: str, code: str, message: str
    ) -> list[Refusal]:
        """An attempt failed. ``permanent``: dead letter now. Anything else is transient:
        pending again after a backoff with full jitter, until ``max_attempts``."""
        self.expire_leases()
        check = self.check_tokens(tokens)
        kind = "permanent" if kind == "permanent" else "transient"
        rows = self._rows(check.valid)
        wall = self._wall()
        updates = []
        for item_id, job_id, priority, tok, attempts in rows:
            job = self._jobs[job_id]
            attempt = attempts + 1
            dead = kind == "permanent" or attempt >= job.spec.max_attempts
            delay = (
                0.0
                if dead
                else backoff_s(attempt, job.spec.backoff_base_s, job.spec.backoff_max_s, self._rng)
            )
            updates.append((item_id, job, priority, tok, dead, delay))
        with self._tx():
            self._db.executemany(
                "UPDATE items SET state = ?, attempts = attempts + 1, n_error = n_error + 1,"
                " worker = NULL, deadline = NULL, not_before = ?, error_kind = ?, error_code = ?,"
                " error_message = ?, finished_at = CASE WHEN ? THEN ? END,"
                " history = json_insert(COALESCE(history, '[]'), '$[#]', json_object('at', ?,"
                " 'cause', 'error', 'kind', ?, 'code', ?, 'message', ?)) WHERE id = ?",
                [
                    (
                        DEAD if dead else PENDING,
                        wall + delay,
                        kind,
                        code,
                        message[:2000],
                        dead,
                        wall,
                        wall,
                        kind,
                        code,
                        message[:500],
                        item_id,
                    )
                    for item_id, _, _, _, dead, delay in updates
                ],
            )
        for item_id, job, priority, tok, dead, _ in updates:
            self._move(job, LEASED, DEAD if dead else PENDING, priority, tok)
            logger.info(
                "item failed job=%s item=%d kind=%s code=%s -> %s",
                job.spec.job_id,
                item_id,
                kind,
                code,
                "dead" if dead else "retry",
            )
        return check.refused

    def declare_shard(
        self, job_id: str, tokens: Sequence[LeaseToken], worker: str, path: str, tmp_path: str
    ) -> tuple[int, list[Refusal]]:
        """Reserve shard number ``n`` for the rows of these leased items. Paths may contain
        ``{n}``; the stored paths have it filled in. Refused tokens are left out."""
        self.expire_leases()
        job = self._job(job_id)
        check = self.check_tokens(tokens)
        n = job.next_shard
        with self._tx():
            self._db.execute(
                "INSERT INTO shards(job_id, n, state, path, tmp_path, tokens, worker, created_at)"
                " VALUES (?, ?, 'declared', ?, ?, ?, ?, ?)",
                (
                    job_id,
                    n,
                    path.format(n=n),
                    tmp_path.format(n=n),
                    json.dumps(check.valid),
                    worker,
                    self._wall(),
                ),
            )
            self._db.execute("UPDATE jobs SET next_shard = ? WHERE job_id = ?", (n + 1, job_id))
        job.next_shard = n + 1
        return n, check.refused

    def shard(self, job_id: str, n: int) -> dict[str, Any]:
        row = self._db.execute(
            "SELECT state, path, tmp_path, tokens, worker, rows, bytes FROM shards"
            " WHERE job_id = ? AND n = ?",
            (job_id, n),
        ).fetchone()
        if row is None:
            raise QueueError(f"unknown shard {n} of job {job_id!r}")
        return {
            "job_id": job_id,
            "n": n,
            "state": row[0],
            "path": row[1],
            "tmp_path": row[2],
            "tokens": [tuple(t) for t in json.loads(row[3])],
            "worker": row[4],
            "rows": row[5],
            "bytes": row[6],
        }

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
        The caller checked (under the same actor turn) that the tokens are valid."""
        shard = self.shard(job_id, n)
        tokens = shard["tokens"]
        if check_leases:
            refused = self.check_tokens(tokens).refused
            if refused:
                raise QueueError(f"shard {n} of {job_id}: {len(refused)} lease(s) no longer held")
        job = self._job(job_id)
        usage = usage or {}
        wall = self._wall()
        item_rows = self._rows(tokens)
        with self._tx():
            self._db.executemany(
                "UPDATE items SET state = 2, shard = ?, worker = NULL, deadline = NULL,"
                " attempts = attempts + 1, finished_at = ? WHERE id = ? AND epoch = ?",
                [(n, wall, i, e) for i, e in tokens],
            )
            self._db.execute(
                "UPDATE shards SET state = 'committed', rows = ?, bytes = ?, committed_at = ?"
                " WHERE job_id = ? AND n = ?",
                (rows, nbytes, wall, job_id, n),
            )
            self._db.execute(
                "UPDATE jobs SET prompt_tokens = prompt_tokens + ?,"
                " completion_tokens = completion_tokens + ?, busy_s = busy_s + ? WHERE job_id = ?",
                (
                    int(usage.get("prompt_tokens", 0)),
                    int(usage.get("completion_tokens", 0)),
                    float(usage.get("busy_s", 0.0)),
                    job_id,
                ),
            )
        for _, _, priority, tok, _ in item_rows:
            self._move(job, LEASED, DONE, priority, tok)
        job.prompt_tokens += int(usage.get("prompt_tokens", 0))
        job.completion_tokens += int(usage.get("completion_tokens", 0))
        job.busy_s += float(usage.get("busy_s", 0.0))

    def abort_shard(self, job_id: str, n: int) -> None:
        with self._tx():
            self._db.execute(
                "UPDATE shards SET state = 'aborted' WHERE job_id = ? AND n = ?", (job_id, n)
            )

    def committed_shards(self, job_id: str) -> list[dict[str, Any]]:
        return [
            {"n": n, "path": path, "rows": rows, "bytes": nbytes}
            for n, path, rows, nbytes in self._db.execute(
                "SELECT n, path, rows, bytes FROM shards WHERE job_id = ? AND state = 'committed'"
                " ORDER BY n",
                (job_id,),
            )
        ]

    # ----------------------------------------------------------------- dead letters
    def dead_letters(self, job_id: str, limit: int = 1000, after: int = 0) -> list[dict[str, Any]]:
        self._job(job_id)
        return [
            {
                "id": r[0],
                "custom_id": r[1],
                "error_kind": r[2],
                "error_code": r[3],
                "message": r[4],
                "attempts": r[5],
                "last_attempt_at": r[6],
                "history": json.loads(r[7] or "[]"),
            }
            for r in self._db.execute(
                "SELECT id, item_id, error_kind, error_code, error_message, attempts, finished_at,"
                " history FROM items WHERE job_id = ? AND state = 3 AND id > ? ORDER BY id LIMIT ?",
                (job_id, after, limit),
            )
        ]

    def redrive(self, job_id: str, item_ids: Sequence[str] | None = None) -> int:
        """Dead letters back to pending with a fresh attempt budget (history kept)."""
        job = self._job(job_id)
        if job.state == "cancelled":
            raise QueueError(f"job {job_id!r} is cancelled; resume is not possible")
        query = (
            "UPDATE items SET state = 0, attempts = 0, not_before = 0, error_kind = NULL,"
            " error_code = NULL, error_message = NULL, finished_at = NULL"
            " WHERE job_id = ? AND state = 3"
        )
        params: tuple[Any, ...] = (job_id,)
        if item_ids is not None:
            query += " AND item_id IN (SELECT value FROM json_each(?))"
            params += (json.dumps(list(item_ids)),)
        with self._tx():
            rows = self._db.execute(query + " RETURNING priority, tokens", params).fetchall()
        for priority, tokens in rows:
            self._move(job, DEAD, PENDING, priority, tokens)
        logger.info("redrive job=%s items=%d", job_id, len(rows))
        return len(rows)

    # ----------------------------------------------------------------- reads
    def stats(self, job_id: str | None = None) -> dict[str, Any]:
        """Counts by job and state, pending tokens, oldest pending age, lease expiries."""
        wall = self._wall()
        jobs = {}
        for jid in [job_id] if job_id else list(self._jobs):
            job = self._job(jid)
            oldest = None
            if job.counts[PENDING] > 0:
                row = self._db.execute(
                    "SELECT MIN(enqueued_at) FROM (SELECT enqueued_at FROM items"
                    " WHERE job_id = ? AND state = 0 ORDER BY job_id, priority, id LIMIT 64)",
                    (jid,),
                ).fetchone()
                oldest = None if row[0] is None else max(0.0, wall - row[0])
            jobs[jid] = {
                "job_id": jid,
                "state": job.state,
                "pool": job.spec.pool,
                "priority": job.spec.priority,
                "created_at": job.created_at,
                "pending": job.counts[PENDING],
                "leased": job.counts[LEASED],
                "done": job.counts[DONE],
                "dead": job.counts[DEAD],
                "total": sum(job.counts.values()),
                "pending_tokens": job.pending_tokens,
                "pending_by_priority": {p: n for p, n in job.pending_by_priority.items() if n},
                "oldest_pending_s": oldest,
                "lease_expiries": job.expiries,
                "prompt_tokens": job.prompt_tokens,
                "completion_tokens": job.completion_tokens,
                "busy_s": job.busy_s,
                "not_before": job.spec.not_before,
            }
        return jobs[job_id] if job_id else {"jobs": jobs}

    def item(self, job_id: str, item_id: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT state, attempts, shard, error_kind, error_code, error_message, epoch"
            " FROM items WHERE job_id = ? AND item_id = ?",
            (job_id, item_id),
        ).fetchone()
        if row is None:
            return None
        return {
            "job_id": job_id,
            "custom_id": item_id,
            "state": STATE_NAMES[row[0]],
            "attempts": row[1],
            "shard": row[2],
            "error_kind": row[3],
            "error_code": row[4],
            "message": row[5],
            "epoch": row[6],
        }

    def close(self) -> None:
        self._db.close()


def _last_id(picked: list[tuple[int, str, int, int]], job_id: str) -> int:
    """Highest id already picked from a job in this call (the next query starts after it)."""
    ids = [p[0] for p in picked if p[1] == job_id]
    return max(ids) if ids else 0


def _is_json_object(text: str) -> bool:
    if not text.startswith("{"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolls back on any error and re-raises it.
    Storage failures (disk full, read-only file) surface as :class:`StorageError`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot start a transaction: {exc}") from exc

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error as commit_exc:
                self._db.execute("ROLLBACK")
                raise StorageError(f"commit failed: {commit_exc}") from commit_exc
        self._db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StorageError(str(exc)) from exc
