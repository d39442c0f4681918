"""What the queue tells about itself: reads of the database that change nothing (one item, a
page of dead letters, shards, the oldest pending age) and the totals over jobs for the scaler.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from inference.errors import QueueError
from inference.queue.db import STATE_NAMES, WAITING
from inference.queue.dialect import dialect_of
from inference.queue.records import JOB_END_CODES


def item(db: Any, job_id: str, item_id: str) -> dict[str, Any] | None:
    """One item's state and attempt record (None when the job has no such item)."""
    row = db.execute(
        "SELECT state, attempts, shard, error_kind, error_code, error_message, epoch,"
        f" n_error, n_expired, n_lost, not_before, worker, history, {dialect_of(db).payload_url}"
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
        "attempts_by_cause": {"error": row[7], "lease_expired": row[8], "worker_lost": row[9]},
        "shard": row[2],
        "error_kind": row[3],
        "error_code": row[4],
        "message": row[5],
        "epoch": row[6],
        "retry_at": row[10] if row[0] == WAITING else None,
        "worker": row[11],
        "history": json.loads(row[12] or "[]"),
        "url": row[13],
    }


def job_urls(db: Any, job_id: str) -> list[str]:
    """The distinct endpoints (``url``) of a job's items (one pass over them)."""
    return sorted(
        url
        for (url,) in db.execute(
            f"SELECT DISTINCT {dialect_of(db).payload_url} FROM items WHERE job_id = ?", (job_id,)
        )
        if url
    )


def item_states(db: Any, job_id: str, limit: int, after: int) -> list[tuple[int, str, str]]:
    """A page of ``(id, custom_id, state)`` of a job's items in id order, after id ``after``."""
    return [
        (i, custom_id, STATE_NAMES[state])
        for i, custom_id, state in db.execute(
            "SELECT id, item_id, state FROM items WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
            (job_id, after, limit),
        )
    ]


def dead_letters(db: Any, job_id: str, limit: int, after: int) -> list[dict[str, Any]]:
    """A page of a job's dead letters in id order, starting after id ``after``."""
    return [
        {
            "id": r[0],
            "custom_id": r[1],
            "reason": dead_reason(r[2], r[3]),
            "error_kind": r[2],
            "error_code": r[3],
            "message": r[4],
            "attempts": r[5],
            "attempts_by_cause": {"error": r[8], "lease_expired": r[9], "worker_lost": r[10]},
            "last_attempt_at": r[6],
            "history": json.loads(r[7] or "[]"),
        }
        for r in db.execute(
            "SELECT id, item_id, error_kind, error_code, error_message, attempts, finished_at,"
            " history, n_error, n_expired, n_lost FROM items"
            " WHERE job_id = ? AND error_kind IS NOT NULL AND state = 3 AND id > ?"
            " ORDER BY id LIMIT ?",
            (job_id, after, limit),
        )
    ]


def dead_reason(kind: str | None, code: str | None) -> str:
    """Why an item is a dead letter: ``cancelled``, ``expired`` (its job's completion window
    passed), ``permanent_error`` or ``attempts_exhausted`` (transient errors, expired leases or
    lost workers, to the limit)."""
    if code in JOB_END_CODES:
        return code
    if kind == "permanent":
        return "permanent_error"
    return "attempts_exhausted"


def oldest_pending_s(
    db: Any, job_id: str, lanes: Sequence[tuple[str, int, int]], waiting: bool, wall: float
) -> float | None:
    """Age of a job's oldest pending item. Ids grow with enqueue time, so it is the lowest id
    among the first pending item of each lane (``(pool, priority, head)``: read from the lane's
    head, see ``Mirror.heads``) and the waiting items: a few index probes, whatever the
    backlog."""
    heads = [
        db.execute(
            "SELECT MIN(id) FROM items WHERE job_id = ? AND pool = ? AND priority = ?"
            " AND state = 0 AND id >= ?",
            (job_id, pool, priority, head),
        ).fetchone()[0]
        for pool, priority, head in lanes
    ]
    if waiting:
        heads.append(
            db.execute(
                "SELECT MIN(id) FROM items WHERE job_id = ? AND retry_at IS NOT NULL AND state = 4",
                (job_id,),
            ).fetchone()[0]
        )
    ids = [i for i in heads if i is not None]
    if not ids:
        return None
    (enqueued_at,) = db.execute(
        "SELECT enqueued_at FROM items WHERE id = ?", (min(ids),)
    ).fetchone()
    return max(0.0, wall - enqueued_at)


def shard(db: Any, job_id: str, n: int) -> dict[str, Any]:
    row = db.execute(
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


def committed_shards(db: Any, job_id: str) -> list[dict[str, Any]]:
    return [
        {"n": n, "path": path, "rows": rows, "bytes": nbytes}
        for n, path, rows, nbytes in db.execute(
            "SELECT n, path, rows, bytes FROM shards WHERE job_id = ? AND state = 'committed'"
            " ORDER BY n",
            (job_id,),
        )
    ]


def shards_from(db: Any, job_id: str, low: int) -> list[dict[str, Any]]:
    """A job's shards numbered ``low`` and up that are committed or still being written, in one
    read (so a shard that commits meanwhile is seen in one state or the other, never in
    neither): what a reader following the job needs (:mod:`inference.results`)."""
    return [
        {"n": n, "state": state, "path": path, "rows": rows}
        for n, state, path, rows in db.execute(
            "SELECT n, state, path, rows FROM shards WHERE job_id = ? AND n >= ?"
            " AND state IN ('committed', 'declared') ORDER BY n",
            (job_id, low),
        )
    ]


_SUMMED = ("pending", "waiting", "leased", "done", "dead", "pending_tokens", "lease_expiries")


def totals(jobs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sums over the jobs' stats for the scaler: backlog by state and priority, the oldest
    pending age of any job."""
    out: dict[str, Any] = dict.fromkeys(_SUMMED, 0)
    by_priority: Counter[int] = Counter()
    ages = []
    for stats in jobs:
        for key in _SUMMED:
            out[key] += stats[key]
        by_priority.update(stats["pending_by_priority"])
        if stats["oldest_pending_s"] is not None:
            ages.append(stats["oldest_pending_s"])
    out["pending_by_priority"] = {p: n for p, n in by_priority.items() if n}
    out["oldest_pending_s"] = max(ages, default=None)
    return out
