"""What only the PostgreSQL queue has, on a real server: its URL rules, the owner lock held by a
session, a lost session (a server restart, a killed backend, a COMMIT cut off) that loses and
doubles nothing, and the schema version both backends check (``inference queue migrate``)."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from inference.cli import app
from inference.config import parse_config
from inference.errors import ConfigError, QueueError, StorageError
from inference.queue.db import SCHEMA_VERSION, DatabaseOwned
from inference.queue.pg import translate
from inference.queue.store import _PICK_SQL, JobSpec, NewItem, QueueStore
from tests.support.pgserver import PASSWORD


def _items(*ids: str) -> list[NewItem]:
    return [NewItem(i, json.dumps({"v": i}), 10) for i in ids]


def _store(url: str, **kwargs: Any) -> QueueStore:
    store = QueueStore(url, **kwargs)
    if "j" not in store.job_ids():
        store.create_job(JobSpec("j", max_attempts=3, backoff_base_s=0.0))
    return store


def test_a_url_with_a_password_is_refused_naming_where_the_password_goes() -> None:
    with pytest.raises(ConfigError, match="PGPASSWORD"):
        parse_config({"queue": {"url": "postgresql://me:secret@db.example/queue"}})
    with pytest.raises(QueueError, match="PGPASSWORD"):
        QueueStore("postgresql://me:secret@127.0.0.1:1/queue")
    with pytest.raises(ConfigError, match="not both"):
        parse_config({"queue": {"url": "postgresql://me@db/q", "db_path": "/tmp/q.sqlite"}})
    with pytest.raises(ConfigError, match="postgresql://"):
        parse_config({"queue": {"url": "mysql://me@db/q"}})
    assert parse_config({"queue": {"url": "postgresql://me@db/q"}}).queue.url


def test_an_unreachable_server_is_a_storage_error_naming_it_without_a_password() -> None:
    with pytest.raises(StorageError, match=r"127\.0\.0\.1:1/"):
        QueueStore("postgresql://me@127.0.0.1:1/queue?connect_timeout=2")


def test_one_owner_at_a_time_and_the_lock_goes_with_its_session(pg_server: Any) -> None:
    url = pg_server.database()
    first = _store(url, owner_wait_s=0.0)
    with pytest.raises(DatabaseOwned, match="RAY_ADDRESS"):
        QueueStore(url, owner_wait_s=0.3)
    look = QueueStore(url, read_only=True)  # a look takes no lock
    assert look.stats("j")["total"] == 0
    with pytest.raises(StorageError):
        look.enqueue("j", _items("a"))
    look.close()
    first.close()
    second = QueueStore(url, owner_wait_s=0.0)
    second.close()


def test_the_store_rides_out_a_restart_of_the_server(pg_server: Any) -> None:
    """An immediate restart (a crash of the server; the WAL is replayed): what was committed
    is there, and every call after it works on a new session, the outstanding leases still
    fenced by their epochs."""
    url = pg_server.database()
    store = _store(url, owner_wait_s=0.0)
    assert store.enqueue("j", _items(*(f"i{n}" for n in range(50)))).accepted == 50
    held = store.lease("w", 10)
    pg_server.restart("immediate")
    stats = store.stats("j")
    assert (stats["pending"], stats["leased"]) == (40, 10)
    assert store.complete([x.token for x in held[:5]]) == []
    stale = (held[5].token[0], held[5].token[1] - 1)
    [refusal] = store.complete([stale])
    assert "stale lease" in refusal.reason
    assert store.enqueue("j", _items("i0", "late")).accepted == 1  # i0: a duplicate still
    store.close()
    again = QueueStore(url)
    stats = again.stats("j")
    assert (stats["done"], stats["leased"], stats["pending"]) == (5, 5, 41)
    again.close()


def test_a_killed_session_before_a_commit_is_retried_once_and_commits_once(
    pg_server: Any,
) -> None:
    url = pg_server.database()
    store = _store(url, owner_wait_s=0.0)
    store.enqueue("j", _items("a", "b"))
    held = store.lease("w", 2)
    n, _ = store.declare_shard("j", [x.token for x in held], "w", "/o/{n}", "/t/{n}")
    (pid,) = store.db.execute("SELECT pg_backend_pid()").fetchone()
    with psycopg.connect(pg_server.url, autocommit=True, password=PASSWORD) as other:
        other.execute("SELECT pg_terminate_backend(%s)", (pid,))
    store.commit_shard("j", n, rows=2, nbytes=10, usage={"prompt_tokens": 7})
    stats = store.stats("j")
    assert (stats["done"], stats["prompt_tokens"]) == (2, 7)
    assert [s["n"] for s in store.committed_shards("j")] == [n]
    store.close()


def test_a_commit_that_committed_but_whose_answer_was_lost_counts_once(
    pg_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst cut: the server committed, the session died before the client heard it. The
    store must not report a failure (the shard is published and its items are done), nor run
    the commit again (tokens counted twice)."""
    url = pg_server.database()
    store = _store(url, owner_wait_s=0.0)
    store.enqueue("j", _items("a", "b"))
    held = store.lease("w", 2)
    n, _ = store.declare_shard("j", [x.token for x in held], "w", "/o/{n}", "/t/{n}")
    conn = store.db
    real = conn.execute
    cut = []

    def execute(sql: str, params: Any = ()) -> Any:
        result = real(sql, params)
        if sql == "COMMIT" and not cut:
            cut.append(sql)
            conn._conn.close()  # the answer never arrives
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return result

    monkeypatch.setattr(conn, "execute", execute)
    store.commit_shard("j", n, rows=2, nbytes=10, usage={"prompt_tokens": 7})
    assert cut
    monkeypatch.undo()
    stats = store.stats("j")
    assert (stats["done"], stats["leased"], stats["prompt_tokens"]) == (2, 0, 7)
    assert store.shard("j", n)["state"] == "committed"
    store.close()


def _bump_schema(target: str, version: int) -> None:
    if target.startswith("postgresql://"):
        with psycopg.connect(target, autocommit=True, password=PASSWORD) as db:
            db.execute(
                "UPDATE queue_meta SET value = %s WHERE key = 'schema_version'", (str(version),)
            )
    else:
        raw = sqlite3.connect(target)
        raw.execute(f"PRAGMA user_version={version}")
        raw.close()


def _rows_read(plan: dict[str, Any]) -> int:
    """Rows a plan's scans read: those they returned and those their filters threw away."""
    own = plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)
    below = sum(_rows_read(p) for p in plan.get("Plans", []))
    return int(below if plan.get("Plans") else own)


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
def test_a_lease_reads_no_done_rows_of_older_jobs(pg_server: Any, plan_cache_mode: str) -> None:
    """With most rows pending, PostgreSQL's planner prefers the primary key for a lane's
    ``ORDER BY id LIMIT n`` (it expects the lane's rows spread evenly) and so reads every done
    row of older jobs before the first pending one, at each lease: 40 ms a lease at 260,000
    of them. From the lane's head (the mirror's) a lease reads about what it takes, whichever
    index the planner picks, with the parameters' values or without."""
    url = pg_server.database()
    store = QueueStore(url)
    store.create_job(JobSpec("old"))
    store.create_job(JobSpec("new"))
    store.close()
    fill = (
        "INSERT INTO items(job_id, item_id, payload, pool, priority, tokens, state, not_before,"
        " enqueued_at) SELECT %s, 'i' || g, repeat('x', 80), 'default', 0, 1, %s, 0, 0"
        " FROM generate_series(1, %s) AS g"
    )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(fill, ("old", 2, 40_000))  # done
        conn.execute(fill, ("new", 0, 150_000))  # pending
        conn.execute("ANALYZE items")
    store = QueueStore(url)
    try:
        assert [len(store.lease("w", 256)) for _ in range(2)] == [256, 256]
        params = store._pick_params(("new", "default", 0, 256))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
            sql = "EXPLAIN (ANALYZE, FORMAT JSON) " + translate(_PICK_SQL)
            for _ in range(6):  # past psycopg's prepare threshold: a prepared statement's plans
                [[explained]] = conn.execute(sql, params, prepare=True).fetchall()
        assert _rows_read(explained[0]["Plan"]) <= 2 * 256, explained
    finally:
        store.close()


LEASE_AND_COMPLETE_WRITE = (
    "state", "epoch", "deadline", "lease_s", "worker", "attempts", "shard", "finished_at"
)  # fmt: skip


def test_no_index_names_a_column_that_a_lease_or_a_completion_writes(pg_server: Any) -> None:
    """What keeps the two updates of every item HOT on PostgreSQL (they stay on the item's
    page and touch no index): a column named by any index (its key or its predicate) that an
    update changes makes PostgreSQL add an entry to every index of the table."""
    url = pg_server.database()
    QueueStore(url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        indexes = [
            row[0]
            for row in conn.execute(
                "SELECT pg_get_indexdef(indexrelid) FROM pg_index"
                " WHERE indrelid = 'items'::regclass"
            )
        ]
        (options,) = conn.execute(
            "SELECT reloptions FROM pg_class WHERE oid = 'items'::regclass"
        ).fetchone()
    assert len(indexes) >= 5, indexes  # the key, (job, custom_id), lanes, failures, retries
    for definition in indexes:
        named = set(re.findall(r"\w+", definition.split(" USING ", 1)[1]))
        assert not named & set(LEASE_AND_COMPLETE_WRITE), definition
    assert "fillfactor=50" in (options or []), options  # room on the page for new versions


def _as_version_4(target: str) -> None:
    """Turn a queue database of this version into one of version 4: waiting and dead items
    indexed by state, no ``retry_at``."""
    statements = [
        "DROP INDEX items_failed",
        "DROP INDEX items_retry",
        "DROP INDEX items_retry_job",
        "ALTER TABLE items DROP COLUMN retry_at",
        "CREATE INDEX items_dead ON items(job_id, id) WHERE state = 3",
        "CREATE INDEX items_waiting ON items(not_before) WHERE state = 4",
        "CREATE INDEX items_waiting_job ON items(job_id, id) WHERE state = 4",
    ]
    if target.startswith("postgresql://"):
        with psycopg.connect(target, autocommit=True) as conn:
            for sql in [
                *statements,
                "DROP INDEX items_lane",
                "CREATE INDEX items_pending_pool ON items(job_id, pool, priority, id)"
                " WHERE state = 0",
                "UPDATE queue_meta SET value = '4' WHERE key = 'schema_version'",
            ]:
                conn.execute(sql)
    else:
        raw = sqlite3.connect(target, isolation_level=None)
        for sql in [*statements, "PRAGMA user_version = 4"]:
            raw.execute(sql)
        raw.close()


def test_a_version_4_database_keeps_its_retries_and_dead_letters(queue_target: str) -> None:
    wall = [1_700_000_000.0]
    store = QueueStore(queue_target, wall=lambda: wall[0])
    store.create_job(JobSpec("j", max_attempts=3, backoff_base_s=10.0, backoff_max_s=10.0))
    store.enqueue("j", _items("retry", "dead", "fine"))
    held = {x.item_id: x.token for x in store.lease("w", 3)}
    store.fail([held["retry"]], "transient", "busy", "later")
    store.fail([held["dead"]], "permanent", "bad", "never")
    store.close()
    _as_version_4(queue_target)
    again = QueueStore(queue_target, wall=lambda: wall[0])
    try:
        assert again.stats("j")["waiting"] == 1
        assert [d["custom_id"] for d in again.dead_letters("j")] == ["dead"]
        assert [x.item_id for x in again.lease("w", 3)] == []  # "fine" is still leased
        wall[0] += 11  # the backoff (at most 10 s) ended
        assert [x.item_id for x in again.lease("w", 3)] == ["retry"]
        assert again.redrive("j") == 1
        assert [x.item_id for x in again.lease("w", 3)] == ["dead"]
    finally:
        again.close()
    reopened = QueueStore(queue_target)  # migrated once: version 5 opens as it is
    reopened.close()


def test_a_schema_newer_than_this_version_is_refused(queue_target: str) -> None:
    QueueStore(queue_target).close()
    _bump_schema(queue_target, 99)
    with pytest.raises(StorageError, match="schema 99, newer"):
        QueueStore(queue_target)


def test_queue_migrate_creates_then_finds_nothing_to_do(queue_target: str, tmp_path: Path) -> None:
    key = "url" if queue_target.startswith("postgresql://") else "db_path"
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"queue": {key: queue_target}}))
    runner = CliRunner()
    first = runner.invoke(app, ["queue", "migrate", "--config", str(config)])
    assert first.exit_code == 0, first.output
    assert f"created the queue schema, version {SCHEMA_VERSION}" in first.output
    again = runner.invoke(app, ["queue", "migrate", "--config", str(config)])
    assert again.exit_code == 0 and "nothing to do" in again.output
    owner = QueueStore(queue_target, owner_wait_s=0.0)  # a running WorkQueue holds it
    try:
        busy = runner.invoke(app, ["queue", "migrate", "--config", str(config)])
        assert busy.exit_code == 2 and "RAY_ADDRESS" in busy.output
    finally:
        owner.close()
    _bump_schema(queue_target, 99)
    newer = runner.invoke(app, ["queue", "migrate", "--config", str(config)])
    assert newer.exit_code == 2 and "newer" in newer.output


def test_operator_commands_read_and_write_a_postgresql_queue_without_a_cluster(
    pg_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    url = pg_server.database()
    store = _store(url)
    store.enqueue("j", _items("a", "b"))
    store.close()
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"queue": {"url": url}, "output": {"path": str(tmp_path)}}))
    runner = CliRunner()
    status = runner.invoke(app, ["status", "j", "--config", str(config)])
    assert status.exit_code == 0, status.output
    assert "2" in status.output
    owner = QueueStore(url, owner_wait_s=0.0)  # a live WorkQueue: a write is refused
    try:
        busy = runner.invoke(app, ["cancel", "j", "--config", str(config)])
        assert busy.exit_code == 2 and "RAY_ADDRESS" in busy.output
    finally:
        owner.close()
    done = runner.invoke(app, ["cancel", "j", "--config", str(config)])
    assert done.exit_code == 0, done.output
    assert QueueStore(url, read_only=True).stats("j")["dead"] == 2
