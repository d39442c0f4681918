"""Several writers on one PostgreSQL queue (``queue.shared``), on a real server: two stores in
this process stand for two clusters' WorkQueues, with one injected wall clock between them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from inference.config import parse_config
from inference.errors import ConfigError
from inference.queue.db import DatabaseOwned
from inference.queue.shared import SharedQueueStore, open_store
from inference.queue.store import JobSpec, NewItem, QueueStore


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def _pair(url: str, wall: Clock) -> tuple[SharedQueueStore, SharedQueueStore]:
    a = SharedQueueStore(url, wall=wall, owner_wait_s=0.0)
    b = SharedQueueStore(url, wall=wall, owner_wait_s=0.0)
    for store in (a, b):
        store.create_job(JobSpec("j", max_attempts=5, backoff_base_s=0.0))
    return a, b


def _items(n: int) -> list[NewItem]:
    return [NewItem(f"i{k:03d}", json.dumps({"k": k}), 10) for k in range(n)]


def test_two_writers_drain_one_job_each_item_leased_and_done_once(pg_server: Any) -> None:
    wall = Clock()
    a, b = _pair(pg_server.database(), wall)
    assert a.enqueue("j", _items(100)).accepted == 100
    assert b.enqueue("j", _items(100)).accepted == 0  # the same input again: all duplicates
    wall.t += 2  # past a refresh: b sees the backlog
    leased: dict[str, list[Any]] = {"a": [], "b": []}
    while True:
        got_a, got_b = a.lease("w", 7), b.lease("w", 7)
        if not got_a and not got_b:
            break
        leased["a"] += got_a
        leased["b"] += got_b
    ids = [x.item_id for x in leased["a"] + leased["b"]]
    assert sorted(ids) == sorted(f"i{k:03d}" for k in range(100))  # each once
    assert leased["a"] and leased["b"]  # both drained it
    assert a.complete([x.token for x in leased["a"]]) == []
    assert b.complete([x.token for x in leased["b"]]) == []
    wall.t += 2
    for store in (a, b):
        stats = store.stats("j")
        assert (stats["done"], stats["pending"], stats["leased"]) == (100, 0, 0)


def test_a_lease_that_passed_is_returned_by_any_writer_and_its_old_token_is_refused(
    pg_server: Any,
) -> None:
    wall = Clock()
    a, b = _pair(pg_server.database(), wall)
    a.enqueue("j", _items(1))
    [first] = a.lease("w", 1, lease_s=5)
    wall.t += 6  # a's cluster is gone; b returns its lease
    [again] = b.lease("w", 1, lease_s=5)
    assert again.item_id == first.item_id and again.token[1] == first.token[1] + 1
    [refusal] = a.complete([first.token])
    assert "stale lease" in refusal.reason
    assert b.complete([again.token]) == []
    wall.t += 2
    item = a.item("j", "i000")
    assert item is not None
    assert (item["state"], item["attempts_by_cause"]["lease_expired"]) == ("done", 1)


def test_each_writer_releases_its_own_workers_only_and_numbers_shards_apart(
    pg_server: Any,
) -> None:
    wall = Clock()
    a, b = _pair(pg_server.database(), wall)
    a.enqueue("j", _items(4))
    wall.t += 2
    held_a, held_b = a.lease("pool-0", 2), b.lease("pool-0", 2)  # the same worker name
    assert a.release_worker("pool-0") == 2
    wall.t += 2
    assert b.stats("j")["leased"] == 2  # b's pool-0 keeps its leases
    n_a, _ = a.declare_shard("j", [], "pool-0", "/o/{n}", "/t/{n}")
    n_b, _ = b.declare_shard("j", [x.token for x in held_b], "pool-0", "/o/{n}", "/t/{n}")
    assert n_a != n_b
    assert held_a and b.shard("j", n_b)["worker"] == b.worker_key("pool-0") != a.worker_key("x")


def test_a_dead_writers_declared_shards_are_settled_by_a_live_one_once(pg_server: Any) -> None:
    wall = Clock()
    a, b = _pair(pg_server.database(), wall)
    a.enqueue("j", _items(2))
    held = a.lease("w", 2)
    n, _ = a.declare_shard("j", [x.token for x in held], "w", "/o/{n}", "/t/{n}")
    assert b.orphaned_shards() == []  # a lives: its shard is its own
    b.release_orphans()
    a.close()  # a's session ends with its cluster: its locks go with it
    c = SharedQueueStore(b.db.url, wall=wall, owner_wait_s=0.0)
    [orphan] = b.orphaned_shards()
    assert orphan["n"] == n
    assert c.orphaned_shards() == []  # b holds the dead writer's lock while it settles
    b.commit_shard("j", n, rows=2, nbytes=8, check_leases=False)
    b.release_orphans()
    c.release_orphans()
    wall.t += 2
    assert c.stats("j")["done"] == 2


def test_shared_and_one_owner_writers_keep_each_other_out(pg_server: Any) -> None:
    url = pg_server.database()
    shared = SharedQueueStore(url, owner_wait_s=0.0)
    with pytest.raises(DatabaseOwned):
        QueueStore(url, owner_wait_s=0.2)
    shared.close()
    owner = QueueStore(url, owner_wait_s=0.0)
    with pytest.raises(DatabaseOwned, match="does not share it"):
        SharedQueueStore(url, owner_wait_s=0.2)
    owner.close()
    assert isinstance(open_store(url, shared=True), SharedQueueStore)


def test_shared_needs_a_postgresql_url() -> None:
    with pytest.raises(ConfigError, match="shared needs url"):
        parse_config({"queue": {"shared": True}})
    assert parse_config({"queue": {"url": "postgresql://me@db/q", "shared": True}}).queue.shared
