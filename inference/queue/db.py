"""The SQLite side of the store: schema, connection settings, and the one transaction shape.

Settings, and why:

- ``journal_mode=WAL`` + ``synchronous=FULL``: a commit is on disk when it returns (the WAL is
  fsynced at every commit), and readers never block the writer.
- ``cache_size`` bounded (32 MiB): the actor's memory must not grow with the backlog; the hot
  pages (the head of the pending index, the tail of the table) fit easily.
- no ``mmap``: mapped pages would count in the actor's RSS and grow with the file.
- no index of leased items: the store keeps its outstanding leases in memory and reads them
  from the file only when it opens (a scan it makes then anyway); an index would cost a B-tree
  insert and delete on every lease, extend and completion and serve no query.
- the indexes of retries and of failures are partial on columns that a lease and a
  completion never change (``retry_at``, set only while an item waits out a backoff, and
  ``error_kind``), not on ``state``: on PostgreSQL a column any index names (its predicate
  too) that an update changes makes the update write a new entry in every index of the table,
  where otherwise it stays on its page (a HOT update: 3 us a row, not 10 to 13, measured here).

``PRAGMA user_version`` records the schema version; :func:`connect` migrates older files.

One writer: the process that owns the database (the WorkQueue actor, or an operator command when
no cluster runs) holds an exclusive ``flock`` on ``<db>.owner`` for as long as it may write
(:func:`hold_owner_lock`). The kernel drops it when the process dies, so a crash never leaves a
stale lock. Read-only opens (``inference status``) take no lock and never write.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg

from inference.errors import QueueError, StorageError
from inference.queue.dialect import SQLITE, dialect_of

DB_ERRORS = (sqlite3.Error, psycopg.Error)
"""What either database raises (the store's SQL runs on both: :mod:`inference.queue.pg`)."""

PENDING, LEASED, DONE, DEAD, WAITING = 0, 1, 2, 3, 4
"""Item states. ``WAITING`` is pending in a retry backoff (until ``retry_at``); it is
kept apart from ``PENDING`` so that leasing never scans past items that are backing off."""

STATE_NAMES = {PENDING: "pending", LEASED: "leased", DONE: "done", DEAD: "dead", WAITING: "pending"}

SCHEMA_VERSION = 5
CACHE_KIB = 32 * 1024

SCHEMA = """
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
    pool TEXT NOT NULL,
    priority INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    retry_at REAL,
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
CREATE TABLE IF NOT EXISTS pool_usage(
    job_id TEXT NOT NULL,
    pool TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    busy_s REAL NOT NULL DEFAULT 0,
    PRIMARY KEY(job_id, pool)
);
"""
# After the migration (older files lack the columns some of these index). ``retry_at`` is set
# exactly while an item waits (state 4); ``error_kind`` on every item that failed once (the
# dead letters, state 3, among them) until a redrive clears it.
INDEXES = """
CREATE INDEX IF NOT EXISTS items_failed ON items(job_id, id) WHERE error_kind IS NOT NULL;
CREATE INDEX IF NOT EXISTS items_retry ON items(retry_at) WHERE retry_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS items_retry_job ON items(job_id, id) WHERE retry_at IS NOT NULL;
"""
# The lanes a lease reads. SQLite's is partial on pending items (it has no HOT updates to keep,
# and the index stays the size of the backlog); PostgreSQL's lists every item (see above), a
# lease reading from its lane's head (Mirror.heads) past the few that are not pending.
LANE_INDEX = """
CREATE INDEX IF NOT EXISTS items_pending_pool ON items(job_id, pool, priority, id) WHERE state = 0;
"""
OLD_INDEXES = ("items_dead", "items_waiting", "items_waiting_job")
"""Version 4's, on ``state``."""


class DatabaseOwned(QueueError):
    """Another live process owns the queue database (a running WorkQueue)."""


def hold_owner_lock(path: Path, wait_s: float = 0.0) -> int:
    """Take the database's owner lock, waiting up to ``wait_s``; returns the descriptor that
    holds it (close it to let go). Raises :class:`DatabaseOwned` when it stays held."""
    fd = os.open(f"{path}.owner", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise DatabaseOwned(
                    f"the queue database {path} is owned by a running WorkQueue; set"
                    " RAY_ADDRESS to its cluster's address so the command goes through it"
                ) from None
            time.sleep(0.1)


def connect_read_only(path: Path) -> sqlite3.Connection:
    """Open the queue database for reading only: no schema change, no migration, no write."""
    try:
        db = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA query_only=ON")
        (version,) = db.execute("PRAGMA user_version").fetchone()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read the queue database {path}: {exc}") from exc
    if version != SCHEMA_VERSION:
        db.close()
        raise StorageError(
            f"the queue database {path} has schema {version}, this version reads"
            f" {SCHEMA_VERSION}: open it once with a command that may write to migrate it"
        )
    return db


def connect(path: Path, wall_s: float) -> sqlite3.Connection:
    """Open (or create) the queue database with the settings above, migrated to the current
    schema. ``wall_s`` is now on the wall clock (for the migration of retry backoffs)."""
    try:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        db.execute("PRAGMA mmap_size=0")
        db.execute("PRAGMA journal_size_limit=67108864")
        db.execute("PRAGMA temp_store=MEMORY")
        db.executescript(SCHEMA)
        _migrate(db, wall_s)
        db.executescript(INDEXES + LANE_INDEX)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open the queue database {path}: {exc}") from exc
    return db


def _migrate(db: sqlite3.Connection, wall_s: float) -> None:
    """Version 1 kept backing-off items in ``PENDING`` with a future ``not_before``; versions 1
    and 2 kept an index of leased items (``items_leased``); version 3 kept one pool per job
    (``items.pool`` is new in 4: a job's items may go to several engine pools); version 4
    indexed waiting and dead items by ``state`` (5 by ``retry_at`` and ``error_kind``)."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"the queue database has schema {version}, newer than this version of inference"
            f" reads ({SCHEMA_VERSION}): upgrade inference"
        )
    if version == SCHEMA_VERSION:
        return
    with Transaction(db):
        if version < 2:
            db.execute(
                "UPDATE items SET state = ? WHERE state = ? AND not_before > ?",
                (WAITING, PENDING, wall_s),
            )
        db.execute("DROP INDEX IF EXISTS items_leased")
        columns = {row[1] for row in db.execute("PRAGMA table_info(items)")}
        if "pool" not in columns:
            db.execute("ALTER TABLE items ADD COLUMN pool TEXT NOT NULL DEFAULT ''")
            db.execute(
                "UPDATE items SET pool = (SELECT pool FROM jobs WHERE jobs.job_id = items.job_id)"
            )
        db.execute("DROP INDEX IF EXISTS items_pending")
        if "retry_at" not in columns:
            db.execute("ALTER TABLE items ADD COLUMN retry_at REAL")
        migrate_retries(db)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def migrate_retries(db: Any) -> None:
    """Version 5 (both databases): the retry time of waiting items in ``retry_at``, and the
    indexes on ``state`` gone (:data:`INDEXES` makes the new ones)."""
    db.execute(
        "UPDATE items SET retry_at = not_before WHERE state = ? AND retry_at IS NULL", (WAITING,)
    )
    for name in OLD_INDEXES:
        db.execute(f"DROP INDEX IF EXISTS {name}")


JSON_CHECK_CHUNK = 256  # payloads per statement of a JSON check


def json_checker(db: Any) -> Callable[[Sequence[str]], bool] | None:
    """A check that every text of a list is strict JSON (RFC 8259), made by SQLite's
    ``json_valid`` in C for a whole call at once; None when this SQLite's ``json_valid`` accepts
    more than strict JSON (3.42 to 3.44 take JSON5 and have no strict mode), and the caller must
    parse in Python instead. Never lenient where Python's parser is strict: a text it passes,
    Python's ``json`` reads (the reverse is not true: Python also takes ``NaN``). None on
    PostgreSQL, whose JSON parser would cost a round trip per call."""
    if dialect_of(db) is not SQLITE:
        return None
    for flag in ("", ", 1"):
        probe = ", ".join(f"json_valid('{text}'{flag})" for text in ("{a:1}", '{"a":NaN}', "{}"))
        try:
            if db.execute(f"SELECT {probe}").fetchone() == (0, 0, 1):
                break
        except sqlite3.Error:  # no two-argument json_valid before 3.45
            pass
    else:
        return None
    statements: dict[int, str] = {}

    def all_json(texts: Sequence[str]) -> bool:
        for start in range(0, len(texts), JSON_CHECK_CHUNK):
            chunk = texts[start : start + JSON_CHECK_CHUNK]
            if len(chunk) not in statements:
                statements[len(chunk)] = (
                    "SELECT count(*) FROM (VALUES "
                    + ", ".join(["(?)"] * len(chunk))
                    + f") WHERE NOT json_valid(column1{flag})"
                )
            try:
                (bad,) = db.execute(statements[len(chunk)], chunk).fetchone()
            except (sqlite3.Error, UnicodeEncodeError):
                return False
            if bad:
                return False
        return True

    return all_json


class Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolls back on any error and re-raises it.
    Storage failures (disk full, read-only file, I/O errors, a lost connection to PostgreSQL)
    surface as :class:`StorageError`, so a caller never mistakes a change that did not reach
    the disk for one that did."""

    def __init__(self, db: Any) -> None:
        self._db = db

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except DB_ERRORS as exc:
            raise StorageError(f"cannot start a transaction: {exc}") from exc

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except DB_ERRORS as commit_exc:
                self._rollback()
                raise StorageError(f"commit failed: {commit_exc}") from commit_exc
        self._rollback()
        if isinstance(exc, DB_ERRORS):
            raise StorageError(str(exc)) from exc

    def _rollback(self) -> None:
        # SQLite rolls back by itself after some errors (SQLITE_FULL, SQLITE_IOERR).
        if self._db.in_transaction:
            with contextlib.suppress(*DB_ERRORS):
                self._db.execute("ROLLBACK")
