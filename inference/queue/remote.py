"""The ledger of provider batches (``engine.kind: openai_batch``), in the queue's database.

A provider batch outlives the worker that submitted it (it may run for a day), so what it holds
is recorded here, durably, at each step of its submission:

1. the worker uploads the input file (a crash now leaves an unused file at the provider);
2. :meth:`RemoteLedger.record` writes the batch (``state = created``, its input file) and maps
   each of its items to it, in one transaction;
3. the worker creates the provider batch, its ``metadata`` carrying our key;
4. :meth:`RemoteLedger.update` records the provider's batch id (``state = submitted``).

A worker that leases an item asks :meth:`RemoteLedger.lookup` first: an item mapped to a live
batch is waited for, never submitted again. A batch found ``created`` with no provider id (a
crash between 2 and 4) is looked up at the provider by its metadata before it is created, so no
item is ever in two provider batches. An item's mapping is dropped (:meth:`RemoteLedger.forget`)
when its line failed or its batch ended without it, so a retry submits it afresh.

The WorkQueue actor serves these calls one at a time, like every other queue call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from inference.queue.db import Transaction

LIVE = ("created", "submitted", "completed")  # a batch whose items are waited for

SCHEMA = """
CREATE TABLE IF NOT EXISTS remote_batches(
    key TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    pool TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    url TEXT NOT NULL,
    state TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    provider_id TEXT,
    status TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    counts TEXT,
    lines INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS remote_batches_job ON remote_batches(job_id, created_at);
CREATE TABLE IF NOT EXISTS remote_items(
    job_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY(job_id, item_id)
);
"""

_FIELDS = (
    "key",
    "job_id",
    "pool",
    "endpoint",
    "url",
    "state",
    "input_file_id",
    "provider_id",
    "status",
    "output_file_id",
    "error_file_id",
    "counts",
    "lines",
    "bytes",
    "created_at",
    "updated_at",
)
_UPDATABLE = frozenset(
    {"state", "provider_id", "status", "output_file_id", "error_file_id", "counts"}
)
_CHUNK = 500  # item ids per statement


def _row(row: tuple[Any, ...]) -> dict[str, Any]:
    out = dict(zip(_FIELDS, row, strict=True))
    out["counts"] = json.loads(out["counts"]) if out["counts"] else None
    return out


class RemoteLedger:
    """Provider batches and their items, on the queue's database connection."""

    def __init__(self, db: Any) -> None:
        self._db = db
        db.executescript(SCHEMA)

    def record(
        self,
        key: str,
        job_id: str,
        pool: str,
        endpoint: str,
        url: str,
        input_file_id: str,
        item_ids: Sequence[str],
        nbytes: int,
    ) -> None:
        """A batch about to be created at the provider, and its items. Idempotent on ``key``;
        an item's earlier mapping (to a batch it failed in) is replaced."""
        now = time.time()
        with Transaction(self._db):
            self._db.execute(
                "INSERT INTO remote_batches(key, job_id, pool, endpoint, url, state,"
                " input_file_id, lines, bytes, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, 'created', ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (key, job_id, pool, endpoint, url, input_file_id, len(item_ids), nbytes, now, now),
            )
            self._db.executemany(
                "INSERT INTO remote_items(job_id, item_id, key) VALUES (?, ?, ?)"
                " ON CONFLICT(job_id, item_id) DO UPDATE SET key = excluded.key",
                [(job_id, item_id, key) for item_id in item_ids],
            )

    def update(self, key: str, **fields: Any) -> None:
        """What the provider said of a batch: its id, status, files, request counts."""
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"not a field of a provider batch: {', '.join(sorted(unknown))}")
        if "counts" in fields and fields["counts"] is not None:
            fields["counts"] = json.dumps(fields["counts"])
        names = sorted(fields)
        sets = ", ".join(f"{name} = ?" for name in names)
        with Transaction(self._db):
            self._db.execute(
                f"UPDATE remote_batches SET {sets}, updated_at = ? WHERE key = ?",
                (*(fields[n] for n in names), time.time(), key),
            )

    def lookup(self, job_id: str, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The live batch of each of these items that is in one: item id -> batch."""
        found: dict[str, str] = {}
        for start in range(0, len(item_ids), _CHUNK):
            chunk = list(item_ids[start : start + _CHUNK])
            marks = ", ".join("?" * len(chunk))
            found.update(
                self._db.execute(
                    "SELECT item_id, key FROM remote_items"
                    f" WHERE job_id = ? AND item_id IN ({marks})",
                    (job_id, *chunk),
                ).fetchall()
            )
        batches = {key: self.batch(key) for key in set(found.values())}
        return {
            item_id: batch
            for item_id, key in found.items()
            if (batch := batches[key]) is not None and batch["state"] in LIVE
        }

    def forget(self, job_id: str, item_ids: Sequence[str], key: str | None = None) -> int:
        """Drop these items' mappings (of batch ``key`` only, when given): their next lease
        submits them again."""
        dropped = 0
        with Transaction(self._db):
            for start in range(0, len(item_ids), _CHUNK):
                chunk = list(item_ids[start : start + _CHUNK])
                marks = ", ".join("?" * len(chunk))
                sql = f"DELETE FROM remote_items WHERE job_id = ? AND item_id IN ({marks})"
                args: tuple[Any, ...] = (job_id, *chunk)
                if key is not None:
                    sql += " AND key = ?"
                    args = (*args, key)
                dropped += self._db.execute(sql, args).rowcount
        return dropped

    def batch(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute(
            f"SELECT {', '.join(_FIELDS)} FROM remote_batches WHERE key = ?",
            (key,),
        ).fetchone()
        return _row(row) if row else None

    def batches(self, job_id: str) -> list[dict[str, Any]]:
        """A job's provider batches, oldest first."""
        rows = self._db.execute(
            f"SELECT {', '.join(_FIELDS)} FROM remote_batches WHERE job_id = ? ORDER BY created_at",
            (job_id,),
        ).fetchall()
        return [_row(r) for r in rows]

    def summary(self, job_id: str) -> dict[str, Any] | None:
        """Counts of a job's provider batches by state and their lines (None for a job with
        none: most jobs)."""
        rows = self._db.execute(
            "SELECT state, count(*), CAST(sum(lines) AS BIGINT) FROM remote_batches"
            " WHERE job_id = ?"
            " GROUP BY state",
            (job_id,),
        ).fetchall()
        if not rows:
            return None
        return {
            "batches": {state: n for state, n, _ in rows},
            "lines": {state: lines for state, _, lines in rows},
        }
