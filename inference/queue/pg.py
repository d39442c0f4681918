"""The PostgreSQL side of the store (``queue.url: postgresql://...``): the connection, the schema
and its version, the owner lock and reconnecting.

The store runs the same statements on both databases (see :mod:`inference.queue.dialect`);
:class:`PgConnection` offers the part of :class:`sqlite3.Connection` the store uses, translating
SQLite's parameter style to psycopg's. Settings, and why:

- every statement is planned with its parameters' values (``plan_cache_mode``; see
  :meth:`PgConnection._open`);
- every change is one explicit transaction (``BEGIN`` ... ``COMMIT``, READ COMMITTED), durable
  when ``COMMIT`` returns with the server's ``synchronous_commit`` on (its default; the store
  checks it at start and warns when it is off);
- one writer, as with SQLite: the process that serves the queue holds a session-level advisory
  lock for as long as it may write (:data:`OWNER_LOCK`), so the in-memory mirror stays exact.
  PostgreSQL drops the lock with the session: a WorkQueue that dies with its node frees the
  queue for the next one, on any node of any cluster;
- the password never travels in the URL (it would be stored in job records and logs): libpq
  reads it from ``PGPASSWORD``, ``~/.pgpass`` (``PGPASSFILE``) or a service file
  (``PGSERVICE``/``PGSERVICEFILE``), on the node that runs the queue;
- the schema version is a row of ``queue_meta``; a database of a newer version is refused.

A lost connection (the server restarted, a network cut) surfaces as :class:`StorageError` from
the statement that met it; :meth:`PgConnection.reconnect` opens a new session, takes the owner
lock again and lets the store reload its mirror, since a transaction whose ``COMMIT`` was cut off
may or may not have committed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg import conninfo, pq

from inference.errors import QueueError, StorageError
from inference.queue.db import (
    INDEXES,
    SCHEMA,
    SCHEMA_VERSION,
    DatabaseOwned,
    Transaction,
    migrate_retries,
)
from inference.queue.dialect import POSTGRES, postgres_ddl

logger = logging.getLogger(__name__)

SCHEMES = ("postgresql://", "postgres://")
OWNER_LOCK = "hashtextextended('inference.queue:' || current_schema(), 0)"
SCHEMA_LOCK = "hashtextextended('inference.queue.schema:' || current_schema(), 0)"
# Every item in the lane index, and half of each page left for the items' next versions: a
# lease and a completion then change no indexed column and stay on the item's page (HOT
# updates), where SQLite's partial index of pending items would make each write an entry in
# every index. Measured here with 100,000 items cycled: 56% of the updates were HOT with
# fillfactor 70, 94% with 50, and the server's CPU for a lease plus a completion went from 45
# to 23 us an item (the table takes twice the pages; pruning reuses them).
LANE_INDEX = """
CREATE INDEX IF NOT EXISTS items_lane ON items(job_id, pool, priority, id);
ALTER TABLE items SET (fillfactor = 50);
"""
CONNECT_TIMEOUT_S = 10


def is_postgres_url(text: object) -> bool:
    return isinstance(text, str) and text.startswith(SCHEMES)


def check_url(url: str) -> str:
    """A PostgreSQL URL as libpq reads it, refused (with the reason) when it cannot be parsed or
    carries a password."""
    try:
        parts = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise QueueError(f"queue.url is not a PostgreSQL URL libpq can read: {exc}") from None
    if parts.get("password"):
        raise QueueError(
            "queue.url must not carry a password (it would be stored with every job): set"
            " PGPASSWORD, a ~/.pgpass entry or a libpq service file on the nodes that run the"
            " queue instead"
        )
    return url


def redact(url: str) -> str:
    """The URL to show in logs and status: without a password, should one have slipped in."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


_PARAM = re.compile(r"\?|(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """SQLite's parameter style (``?``, ``:name``) in psycopg's (``%s``, ``%(name)s``)."""
    if sql.startswith("BEGIN"):
        return "BEGIN"  # SQLite's BEGIN IMMEDIATE: PostgreSQL locks rows as they are written
    return _PARAM.sub(lambda m: "%s" if m.group(0) == "?" else f"%({m.group(1)})s", sql)


class PgConnection:
    """One session with the queue's database, shaped like the :class:`sqlite3.Connection` the
    store was written for (``execute``, ``executemany``, ``executescript``, ``in_transaction``).
    """

    dialect = POSTGRES

    def __init__(
        self, url: str, *, read_only: bool = False, owner_wait_s: float | None = None
    ) -> None:
        self.url = check_url(url)
        self.read_only = read_only
        self.exclusive = owner_wait_s is not None and not read_only
        self._conn = self._open(lock_wait_s=owner_wait_s or 0.0)

    def _open(self, lock_wait_s: float) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as exc:
            raise StorageError(
                f"cannot connect to the queue database {redact(self.url)}: {exc}"
            ) from exc
        try:
            # Plans made with each call's values: psycopg prepares a statement at its fifth
            # run, and PostgreSQL would then keep a generic plan made when the table was small
            # (a sequential scan of a completion's rows: 15 ms a call of 256 at 50,000 items,
            # and growing with the table until an ANALYZE). Planning again costs ~0.2 ms.
            conn.execute("SET plan_cache_mode = force_custom_plan")
            if self.read_only:
                conn.execute("SET default_transaction_read_only = on")
            if self.exclusive:
                self._lock(conn, lock_wait_s)
        except BaseException:
            conn.close()
            raise
        return conn

    def _lock(self, conn: psycopg.Connection[Any], wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            row = conn.execute(f"SELECT pg_try_advisory_lock({OWNER_LOCK})").fetchone()
            if row and row[0]:
                return
            if time.monotonic() >= deadline:
                raise DatabaseOwned(
                    f"the queue database {redact(self.url)} is owned by a running WorkQueue; set"
                    " RAY_ADDRESS to its cluster's address so the command goes through it"
                )
            time.sleep(0.2)

    # --------------------------------------------------------------- sqlite3-shaped calls
    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        return self._conn.execute(translate(sql), params or None)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any] | dict[str, Any]]) -> Any:
        cursor = self._conn.cursor()
        cursor.executemany(translate(sql), list(seq))
        return cursor

    def executescript(self, script: str) -> None:
        self._conn.execute(postgres_ddl(script))

    @property
    def in_transaction(self) -> bool:
        return self._conn.info.transaction_status != pq.TransactionStatus.IDLE

    # --------------------------------------------------------------- a lost session
    @property
    def broken(self) -> bool:
        return bool(self._conn.broken or self._conn.closed)

    def reconnect(self, within_s: float, lock_wait_s: float) -> None:
        """A new session (and the owner lock again), retried for up to ``within_s``: the
        server may be restarting. Raises :class:`StorageError` when none could be had."""
        self.close()
        deadline = time.monotonic() + within_s
        delay = 0.2
        while True:
            try:
                self._conn = self._open(lock_wait_s)
                logger.warning("reconnected to the queue database %s", redact(self.url))
                return
            except StorageError as exc:
                if time.monotonic() + delay > deadline:
                    raise StorageError(
                        f"the queue database {redact(self.url)} stayed unreachable for"
                        f" {within_s:.0f} s: {exc}"
                    ) from exc
                time.sleep(delay)
                delay = min(2.0, delay * 2)

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self._conn.close()

    def server_setting(self, name: str) -> str:
        row = self._conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
        return str(row[0]) if row else ""


def connect(
    url: str, *, read_only: bool = False, owner_wait_s: float | None = None
) -> PgConnection:
    """Open the queue database at ``url``: with the queue's schema created (or checked, when
    ``read_only``), refusing a newer schema. ``owner_wait_s``: take the owner lock first,
    waiting up to that long for a predecessor's session to end."""
    db = PgConnection(url, read_only=read_only, owner_wait_s=owner_wait_s)
    try:
        version = schema_version(db)
        if version is not None and version > SCHEMA_VERSION:
            raise StorageError(
                f"the queue database {redact(url)} has schema {version}, newer than this"
                f" version of inference reads ({SCHEMA_VERSION}): upgrade inference"
            )
        if read_only:
            if version != SCHEMA_VERSION:
                raise StorageError(
                    f"the queue database {redact(url)} has no queue schema of version"
                    f" {SCHEMA_VERSION} ({version}): open it once with a command that may write"
                )
            return db
        if version != SCHEMA_VERSION:
            _create_or_migrate(db)
        if db.server_setting("synchronous_commit") == "off":
            logger.warning(
                "the queue database %s has synchronous_commit=off: a commit it acknowledged"
                " may be lost in a crash of the server",
                redact(url),
            )
    except psycopg.Error as exc:
        db.close()
        raise StorageError(f"cannot open the queue database {redact(url)}: {exc}") from exc
    except BaseException:
        db.close()
        raise
    return db


def _create_or_migrate(db: PgConnection) -> None:
    """The queue's schema created, or migrated to this version, in one transaction that holds
    a lock of its own: two servers starting on one shared database do it once."""
    with Transaction(db):
        db.execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
        version = schema_version(db)  # again, under the lock
        if version is None:
            db.execute("CREATE TABLE IF NOT EXISTS queue_meta(key TEXT PRIMARY KEY, value TEXT)")
            db.executescript(SCHEMA)
        elif version < 5:  # 4 was PostgreSQL's first: retries and failures indexed by state
            db.execute("ALTER TABLE items ADD COLUMN IF NOT EXISTS retry_at DOUBLE PRECISION")
            migrate_retries(db)
            db.execute("DROP INDEX IF EXISTS items_pending_pool")
        if version != SCHEMA_VERSION:
            db.executescript(INDEXES + LANE_INDEX)
            set_schema_version(db, SCHEMA_VERSION)


def schema_version(db: PgConnection) -> int | None:
    """The version recorded in ``queue_meta``; None for a database without the queue's tables."""
    exists = db.execute("SELECT to_regclass('queue_meta') IS NOT NULL").fetchone()[0]
    if not exists:
        return None
    row = db.execute("SELECT value FROM queue_meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else None


def set_schema_version(db: PgConnection, version: int) -> None:
    db.execute(
        "INSERT INTO queue_meta(key, value) VALUES ('schema_version', ?)"
        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (str(version),),
    )
