"""The queue's semantics on the real SQLite store, with injected clocks (no sleeping)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from inference.errors import QueueError, StorageError
from inference.queue.store import JobSpec, NewItem, QueueStore


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def wall() -> Clock:
    w = Clock()
    w.t = 1_700_000_000.0
    return w


@pytest.fixture
def store(tmp_path: Path, clock: Clock, wall: Clock) -> QueueStore:
    s = QueueStore(tmp_path / "q.sqlite", clock=clock, wall=wall, rng=random.Random(0))
    s.create_job(JobSpec("job", max_attempts=3, backoff_base_s=1.0, backoff_max_s=8.0))
    return s


def items(*ids: str, priority: int | None = None) -> list[NewItem]:
    return [NewItem(i, json.dumps({"v": i}), 10, priority) for i in ids]


def test_enqueue_is_durable_and_survives_reopening(store: QueueStore, tmp_path: Path) -> None:
    assert store.enqueue("job", items("a", "b")).accepted == 2
    store.close()
    again = QueueStore(tmp_path / "q.sqlite")
    assert again.stats("job")["pending"] == 2
    assert [x.item_id for x in again.lease("w", 10)] == ["a", "b"]


def test_duplicate_enqueue_changes_nothing(store: QueueStore) -> None:
    store.enqueue("job", items("a"))
    result = store.enqueue("job", items("a", "b"))
    assert (result.accepted, result.duplicates) == (1, ["a"])
    assert store.stats("job")["total"] == 2


def test_conflicting_payload_refuses_the_whole_call(store: QueueStore) -> None:
    store.enqueue("job", items("a"))
    with pytest.raises(QueueError, match="another payload"):
        store.enqueue("job", [NewItem("b", "{}"), NewItem("a", '{"other": 1}')])
    assert store.stats("job")["total"] == 1  # b was not accepted either


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (NewItem("bad id", "{}"), "must match"),
        (NewItem("x", "[1]"), "not a JSON object"),
        (NewItem("x", '{"a": "' + "x" * 2000 + '"}'), "payload over"),
    ],
)
def test_bad_items_are_refused_with_the_reason(
    store: QueueStore, item: NewItem, reason: str
) -> None:
    with pytest.raises(QueueError, match=reason):
        store.enqueue("job", [NewItem("ok", "{}"), item], max_item_bytes=1000)
    assert store.stats("job")["total"] == 0


def test_each_lease_of_an_item_gets_a_higher_epoch(store: QueueStore, clock: Clock) -> None:
    store.enqueue("job", items("a"))
    [first] = store.lease("w1", 1, lease_s=5)
    clock.t += 6
    [second] = store.lease("w2", 1, lease_s=5)
    assert second.token[0] == first.token[0]
    assert second.token[1] > first.token[1]
    assert second.attempts == 1  # the expiry counted as an attempt


def test_stale_token_is_refused_everywhere(store: QueueStore, clock: Clock) -> None:
    store.enqueue("job", items("a"))
    [zombie] = store.lease("w1", 1, lease_s=5)
    clock.t += 6
    [fresh] = store.lease("w2", 1, lease_s=5)
    assert store.extend([zombie.token], 5)[0].reason.startswith("stale lease")
    assert store.fail([zombie.token], "permanent", "x", "y")
    assert store.check_tokens([zombie.token]).refused
    assert store.check_tokens([fresh.token]).valid == [fresh.token]
    assert store.stats("job")["dead"] == 0


def test_extend_keeps_a_lease_alive(store: QueueStore, clock: Clock) -> None:
    store.enqueue("job", items("a"))
    [held] = store.lease("w1", 1, lease_s=5)
    for _ in range(5):
        clock.t += 4
        assert store.extend([held.token], 5) == []
    assert store.lease("w2", 1) == []


def test_transient_failure_retries_after_backoff(store: QueueStore, wall: Clock) -> None:
    store.enqueue("job", items("a"))
    [held] = store.lease("w", 1)
    store.fail([held.token], "transient", "timeout", "slow")
    assert store.lease("w", 1) == []  # backing off (the seeded jitter is 0.84 s)
    assert store.stats("job")["pending"] == 1
    wall.t += 1.01  # the first backoff is at most base_s
    [again] = store.lease("w", 1)
    assert (again.item_id, again.attempts) == ("a", 1)


def test_item_dead_letters_after_max_attempts(store: QueueStore, wall: Clock) -> None:
    store.enqueue("job", items("a"))
    for _ in range(3):
        wall.t += 100
        [held] = store.lease("w", 1)
        store.fail([held.token], "transient", "boom", "it broke")
    stats = store.stats("job")
    assert (stats["dead"], stats["pending"]) == (1, 0)
    [dead] = store.dead_letters("job")
    assert (dead["error_code"], dead["attempts"], len(dead["history"])) == ("boom", 3, 3)


def test_permanent_failure_dead_letters_at_once(store: QueueStore) -> None:
    store.enqueue("job", items("a"))
    [held] = store.lease("w", 1)
    store.fail([held.token], "permanent", "too_long", "over the context")
    [dead] = store.dead_letters("job")
    assert (dead["error_kind"], dead["message"], dead["attempts"]) == (
        "permanent",
        "over the context",
        1,
    )


def test_redrive_gives_a_fresh_budget(store: QueueStore) -> None:
    store.enqueue("job", items("a"))
    [held] = store.lease("w", 1)
    store.fail([held.token], "permanent", "x", "y")
    assert store.redrive("job") == 1
    [again] = store.lease("w", 1)
    assert again.attempts == 0
    assert store.dead_letters("job") == []


def test_drained_release_costs_no_attempt_but_lost_worker_does(store: QueueStore) -> None:
    store.enqueue("job", items("a", "b"))
    a, _b = store.lease("w", 2)
    store.release([a.token], "drained")
    assert store.release_worker("w") == 1
    leased = {x.item_id: x.attempts for x in store.lease("w2", 2)}
    assert leased == {"a": 0, "b": 1}


def test_higher_priority_is_leased_first(store: QueueStore) -> None:
    store.enqueue("job", items("low1", "low2"))
    store.enqueue("job", items("urgent", priority=9))
    assert [x.item_id for x in store.lease("w", 1)] == ["urgent"]


def test_jobs_share_leases_fairly_within_a_priority(store: QueueStore) -> None:
    store.create_job(JobSpec("small"))
    store.enqueue("job", items(*[f"big{i}" for i in range(100)]))
    store.enqueue("small", items("s1", "s2", "s3"))
    leased = store.lease("w", 4)
    by_job = sorted(x.job_id for x in leased)
    assert by_job == ["job", "job", "small", "small"]
    assert [x.item_id for x in leased if x.job_id == "job"] == ["big0", "big1"]  # FIFO


def test_not_before_is_respected(store: QueueStore, wall: Clock) -> None:
    store.create_job(JobSpec("later", not_before=wall.t + 60))
    store.enqueue("later", items("x"))
    assert store.lease("w", 1) == []
    wall.t += 61
    assert [x.item_id for x in store.lease("w", 1)] == ["x"]


def test_pause_and_cancel(store: QueueStore) -> None:
    store.enqueue("job", items("a", "b"))
    store.set_job_state("job", "paused")
    assert store.lease("w", 5) == []
    store.set_job_state("job", "active")
    [_held] = store.lease("w", 1)
    store.set_job_state("job", "cancelled")
    assert store.lease("w", 5) == []
    stats = store.stats("job")
    assert (stats["dead"], stats["leased"]) == (1, 1)  # the pending one is accounted for
    with pytest.raises(QueueError, match="cancelled"):
        store.enqueue("job", items("c"))


def test_stats_count_states_tokens_and_age(store: QueueStore, wall: Clock) -> None:
    store.enqueue("job", items("a", "b", "c"))
    wall.t += 30
    store.lease("w", 1)
    stats = store.stats("job")
    assert (stats["pending"], stats["leased"], stats["pending_tokens"]) == (2, 1, 20)
    assert stats["oldest_pending_s"] == pytest.approx(30.0)


def test_counters_rebuild_after_restart(store: QueueStore, tmp_path: Path, clock: Clock) -> None:
    store.enqueue("job", items("a", "b", "c"))
    store.lease("w", 1, lease_s=5)
    before = store.stats("job")
    store.close()
    again = QueueStore(tmp_path / "q.sqlite", clock=clock)
    after = again.stats("job")
    assert {k: after[k] for k in ("pending", "leased", "pending_tokens")} == {
        k: before[k] for k in ("pending", "leased", "pending_tokens")
    }
    assert again.rearm_leases() == 1


def test_read_only_database_fails_loudly(store: QueueStore, tmp_path: Path) -> None:
    store.enqueue("job", items("a"))
    store.close()
    import sqlite3

    ro = QueueStore.__new__(QueueStore)
    ro.__dict__.update(QueueStore(tmp_path / "q.sqlite").__dict__)
    ro._db = sqlite3.connect(
        f"file:{tmp_path / 'q.sqlite'}?mode=ro", uri=True, isolation_level=None
    )
    with pytest.raises(StorageError):
        ro.enqueue("job", items("b"))
