"""The queue's semantics on the real store, with injected clocks (no sleeping): each test that
takes ``store`` or ``queue_target`` runs on SQLite and on a real PostgreSQL server (see
``tests/conftest.py``), so the two backends cannot drift; ``@sqlite_only`` marks what is about
SQLite's file itself (its migrations, a file turned read-only under the store)."""

from __future__ import annotations

import json
import pickle
import random
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import ray.cloudpickle

from inference.errors import QueueError, StorageError
from inference.queue.db import JSON_CHECK_CHUNK, SCHEMA_VERSION, json_checker
from inference.queue.fairness import fair_shares, fit_token_budget
from inference.queue.records import LeasedItem, Packed, Refusal
from inference.queue.store import JobSpec, NewItem, QueueStore
from tests.conftest import sqlite_only


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
def store(queue_target: str, clock: Clock, wall: Clock) -> QueueStore:
    s = QueueStore(queue_target, clock=clock, wall=wall, rng=random.Random(0))
    s.create_job(JobSpec("job", max_attempts=3, backoff_base_s=1.0, backoff_max_s=8.0))
    return s


def items(*ids: str, priority: int | None = None) -> list[NewItem]:
    return [NewItem(i, json.dumps({"v": i}), 10, priority) for i in ids]


def test_enqueue_is_durable_and_survives_reopening(store: QueueStore, tmp_path: Path) -> None:
    assert store.enqueue("job", items("a", "b")).accepted == 2
    store.close()
    again = QueueStore(store.path)
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


def test_items_back_in_pending_are_leased_first_from_any_path(
    store: QueueStore, clock: Clock, wall: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A lease reads a lane from its head (the lowest id it may still hold pending: the mirror
    moves it past each lease); every way back to pending (release, expiry, a retry's backoff
    ending, redrive, a move between pools) must move it back, or the next lease would come up
    short of what the counters promise and the store would reload its whole mirror."""
    store.enqueue("job", items(*(f"i{k}" for k in range(12))))
    caplog.set_level("ERROR", logger="inference.queue.store")

    def lease(n: int, **kwargs: Any) -> list[LeasedItem]:
        return list(store.lease("w", n, lease_s=5, **kwargs))

    first = lease(3)
    store.complete([x.token for x in first[:2]])
    store.release([first[2].token])  # drained: i2 back
    assert [x.item_id for x in lease(2)] == ["i2", "i3"]
    assert [x.item_id for x in lease(1)] == ["i4"]
    clock.t += 6  # i2, i3 and i4 expire (and are leased alone from now: suspects)
    again = [lease(4) for _ in range(3)]
    assert [[x.item_id for x in got] for got in again] == [["i2"], ["i3"], ["i4"]]
    store.fail([again[0][0].token], "transient", "busy", "later")  # i2 backs off
    store.fail([again[1][0].token], "permanent", "bad", "never")  # i3 is a dead letter
    store.complete([again[2][0].token])
    assert [x.item_id for x in lease(1)] == ["i5"]
    wall.t += 60  # i2's backoff ended
    assert [x.item_id for x in lease(1)] == ["i2"]
    assert store.redrive("job", ["i3"]) == 1
    assert [x.item_id for x in lease(1)] == ["i3"]
    assert store.move_pending("job", "default", "other", 2) == 2  # i10, i11
    assert store.move_pending("job", "other", "default", 1) == 1  # i11 back, behind i6..i9
    assert [x.item_id for x in lease(6, pool="default")] == ["i6", "i7", "i8", "i9", "i11"]
    assert [x.item_id for x in lease(6, pool="other")] == ["i10"]
    assert not [r for r in caplog.records if "reloading the queue state" in r.getMessage()]


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
    # b, held by the lost worker, is a suspect: the lease stops before it, then takes it alone.
    first, second = store.lease("w2", 2), store.lease("w2", 2)
    assert [(x.item_id, x.attempts, x.suspect) for x in first] == [("a", 0, False)]
    assert [(x.item_id, x.attempts, x.suspect) for x in second] == [("b", 1, True)]


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


def test_outside_its_windows_a_job_is_not_leased(store: QueueStore, wall: Clock) -> None:
    # wall starts at 22:13:20 UTC; the job may run 01:00-02:00 UTC only.
    store.create_job(JobSpec("nightly", windows=("01:00-02:00",), timezone="UTC"))
    store.enqueue("nightly", items("x", "y"))
    store.enqueue("job", items("a"))
    assert [x.item_id for x in store.lease("w", 5)] == ["a"]  # the other job is not held up
    opens = wall.t - wall.t % 86400 + 86400 + 3600
    assert store.stats("nightly")["next_run_at"] == opens
    wall.t = opens - 1
    assert store.lease("w", 5) == []
    wall.t = opens
    [x] = store.lease("w", 1)
    assert x.item_id == "x" and store.stats("nightly")["next_run_at"] == 0.0  # now
    wall.t = opens + 3600  # closed again: the leased item finishes, nothing new is leased
    assert store.lease("w", 5) == []
    assert store.complete([x.token]) == []
    # The windows survive a restart of the queue.
    store.close()
    again = QueueStore(store.path, wall=wall)
    assert again.stats("nightly")["next_run_at"] == opens + 86400
    assert again.stats("nightly")["windows"] == ["01:00-02:00"]


def test_items_know_their_endpoint(store: QueueStore) -> None:
    payload = '{"body":{"prompt":"x"},"url":"/v1/completions"}'
    store.enqueue("job", [NewItem("a", payload), NewItem("b", payload)])
    assert store.job_urls("job") == ["/v1/completions"]
    item = store.item("job", "a")
    assert item is not None and item["url"] == "/v1/completions"


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
    again = QueueStore(store.path, clock=clock)
    after = again.stats("job")
    assert {k: after[k] for k in ("pending", "leased", "pending_tokens")} == {
        k: before[k] for k in ("pending", "leased", "pending_tokens")
    }
    assert again.rearm_leases() == 1


def _lease_one(store: QueueStore, lease_s: float = 5.0) -> LeasedItem:
    [held] = store.lease("w", 1, lease_s=lease_s)
    return held


# ------------------------------------------------------------------ complete (fenced)
def test_complete_marks_leased_items_done(store: QueueStore) -> None:
    store.enqueue("job", items("a", "b"))
    held = store.lease("w", 2)
    assert store.complete([h.token for h in held]) == []
    stats = store.stats("job")
    assert (stats["done"], stats["leased"], stats["pending"]) == (2, 0, 0)
    assert store.item("job", "a")["state"] == "done"  # type: ignore[index]


def test_complete_with_a_stale_token_is_refused_and_changes_nothing(
    store: QueueStore, clock: Clock
) -> None:
    store.enqueue("job", items("a"))
    zombie = _lease_one(store)
    clock.t += 6  # the zombie's lease expires; another worker leases the item
    fresh = _lease_one(store)
    [refusal] = store.complete([zombie.token])
    assert refusal.token == zombie.token and refusal.reason.startswith("stale lease")
    assert store.item("job", "a")["state"] == "leased"  # type: ignore[index]
    assert store.complete([fresh.token]) == []
    [again] = store.complete([fresh.token])
    assert again.reason == "not leased (state done)"
    assert store.stats("job")["done"] == 1


def test_a_lease_expired_before_the_call_is_refused(store: QueueStore, clock: Clock) -> None:
    store.enqueue("job", items("a"))
    held = _lease_one(store, lease_s=5)
    clock.t += 5.5
    assert store.complete([held.token])
    assert store.extend([held.token], 5)
    assert store.stats("job")["done"] == 0
    assert store.check_tokens([held.token]).valid == []


def test_unknown_token_is_refused(store: QueueStore) -> None:
    [refusal] = store.complete([(999, 1)])
    assert refusal.reason == "unknown item"


def test_a_malformed_token_is_a_queue_error(store: QueueStore) -> None:
    with pytest.raises(QueueError, match="pairs of integers"):
        store.complete([("x", 1)])  # type: ignore[list-item]


def test_an_empty_enqueue_accepts_nothing(store: QueueStore) -> None:
    assert store.enqueue("job", []).accepted == 0


def test_complete_records_the_shard(store: QueueStore) -> None:
    store.enqueue("job", items("a"))
    store.complete([_lease_one(store).token], shard=7)
    assert store.item("job", "a")["shard"] == 7  # type: ignore[index]


# ------------------------------------------------------------------ leases and clocks
def test_lease_deadlines_follow_the_queue_clock_not_the_wall(
    store: QueueStore, clock: Clock, wall: Clock
) -> None:
    store.enqueue("job", items("a"))
    held = _lease_one(store, lease_s=5)
    wall.t += 3600  # a wall clock jump does not expire a lease
    assert store.extend([held.token], 5) == []
    clock.t += 5.1
    assert store.stats("job")["lease_expiries"] == 1


def test_expired_lease_counts_as_an_attempt_with_its_cause(store: QueueStore, clock: Clock) -> None:
    store.enqueue("job", items("a"))
    _lease_one(store, lease_s=5)
    clock.t += 6
    item = store.item("job", "a")
    assert item is not None
    assert (item["state"], item["attempts"]) == ("pending", 1)
    assert item["attempts_by_cause"] == {"error": 0, "lease_expired": 1, "worker_lost": 0}
    assert [h["cause"] for h in item["history"]] == ["lease_expired"]


def test_leases_out_at_a_restart_expire_a_full_lease_later(
    store: QueueStore, tmp_path: Path, clock: Clock
) -> None:
    store.enqueue("job", items("a", "b"))
    held = store.lease("w", 2, lease_s=5)
    store.close()
    later = Clock()
    later.t = 50.0  # a new process: its monotonic clock has nothing to do with the old one
    again = QueueStore(store.path, clock=later)
    assert again.rearm_leases() == 2
    later.t += 4
    assert again.check_tokens([h.token for h in held]).valid == [h.token for h in held]
    assert again.stats("job")["leased"] == 2
    later.t += 2
    stats = again.stats("job")
    assert (stats["leased"], stats["pending"], stats["lease_expiries"]) == (0, 2, 2)


def test_lease_takes_at_most_max_items_and_nothing_when_empty(store: QueueStore) -> None:
    assert store.lease("w", 5) == []
    store.enqueue("job", items("a", "b", "c"))
    assert len(store.lease("w", 2)) == 2
    assert len(store.lease("w", 0)) == 0
    assert [x.item_id for x in store.lease("w", 5)] == ["c"]


def test_max_tokens_bounds_a_lease_but_the_first_item_always_goes(store: QueueStore) -> None:
    store.enqueue("job", [NewItem("big", "{}", 500), NewItem("s1", "{}", 10)])
    store.enqueue("job", [NewItem("s2", "{}", 10), NewItem("s3", "{}", 10)])
    assert [x.item_id for x in store.lease("w", 10, max_tokens=100)] == ["big"]
    assert [x.item_id for x in store.lease("w", 10, max_tokens=25)] == ["s1", "s2"]


def test_a_token_budget_is_shared_between_jobs(store: QueueStore) -> None:
    store.create_job(JobSpec("other"))
    store.enqueue("job", items(*[f"j{i}" for i in range(10)]))
    store.enqueue("other", items(*[f"o{i}" for i in range(10)]))
    leased = store.lease("w", 10, max_tokens=40)  # 4 items of 10 tokens
    assert sorted(x.job_id for x in leased) == ["job", "job", "other", "other"]


def test_lease_s_must_be_positive(store: QueueStore) -> None:
    with pytest.raises(QueueError, match="lease_s"):
        store.lease("w", 1, lease_s=0)


def test_a_release_for_an_unknown_cause_costs_an_attempt(store: QueueStore) -> None:
    store.enqueue("job", items("a"))
    store.release([_lease_one(store).token], "preempted")
    item = store.item("job", "a")
    assert item is not None
    assert (item["attempts"], item["attempts_by_cause"]["worker_lost"]) == (1, 1)


def test_release_worker_returns_everything_it_holds(store: QueueStore) -> None:
    store.enqueue("job", items("a", "b", "c"))
    store.lease("w1", 2)
    store.lease("w2", 1)
    assert store.release_worker("w1") == 2
    stats = store.stats("job")
    assert (stats["pending"], stats["leased"]) == (2, 1)


# ------------------------------------------------------------------ errors, attempts, dead letters
def test_an_unknown_error_kind_is_transient(store: QueueStore, wall: Clock) -> None:
    store.enqueue("job", items("a"))
    store.fail([_lease_one(store).token], "SomethingNew", "odd", "no one knows")
    item = store.item("job", "a")
    assert item is not None
    assert (item["state"], item["error_kind"], item["retry_at"] is not None) == (
        "pending",
        "transient",
        True,
    )
    wall.t += 10
    assert [x.item_id for x in store.lease("w", 1)] == ["a"]


def test_attempts_are_counted_by_cause_and_the_last_one_dead_letters(
    store: QueueStore, clock: Clock, wall: Clock
) -> None:
    store.enqueue("job", items("a"))
    store.fail([_lease_one(store).token], "transient", "timeout", "slow")  # error
    wall.t += 10
    _lease_one(store, lease_s=5)
    clock.t += 6  # lease_expired
    store.release_worker("w")  # holds nothing now
    store.lease("w", 1)
    assert store.release_worker("w", "worker_lost") == 1  # worker_lost, third attempt
    [dead] = store.dead_letters("job")
    assert dead["attempts_by_cause"] == {"error": 1, "lease_expired": 1, "worker_lost": 1}
    assert (dead["reason"], dead["error_code"], dead["attempts"]) == (
        "attempts_exhausted",
        "worker_lost",
        3,
    )
    assert [h["cause"] for h in dead["history"]] == ["error", "lease_expired", "worker_lost"]
    assert dead["history"][0]["code"] == "timeout"
    assert store.stats("job")["attempts_by_cause"] == dead["attempts_by_cause"]


def test_permanent_dead_letter_keeps_reason_code_and_message(store: QueueStore) -> None:
    store.enqueue("job", items("a"))
    store.fail([_lease_one(store).token], "permanent", "too_long", "over the context")
    [dead] = store.dead_letters("job")
    assert (dead["reason"], dead["error_code"], dead["message"]) == (
        "permanent_error",
        "too_long",
        "over the context",
    )


def test_dead_letters_page_by_id(store: QueueStore) -> None:
    store.enqueue("job", items("a", "b", "c"))
    store.fail([x.token for x in store.lease("w", 3)], "permanent", "bad", "bad")
    first = store.dead_letters("job", limit=2)
    rest = store.dead_letters("job", limit=2, after=first[-1]["id"])
    assert [d["custom_id"] for d in first + rest] == ["a", "b", "c"]


def test_redrive_leaves_an_item_completed_meanwhile_completed(store: QueueStore) -> None:
    store.enqueue("job", items("a", "b"))
    a, b = store.lease("w", 2)
    store.fail([a.token], "permanent", "x", "y")
    store.complete([b.token])
    assert store.redrive("job", ["a", "b"]) == 1
    assert store.item("job", "b")["state"] == "done"  # type: ignore[index]
    stats = store.stats("job")
    assert (stats["pending"], stats["done"], stats["dead"], stats["total"]) == (1, 1, 0, 2)


def test_redrive_keeps_the_history(store: QueueStore) -> None:
    store.enqueue("job", items("a"))
    store.fail([_lease_one(store).token], "permanent", "x", "y")
    store.redrive("job", ["a"])
    item = store.item("job", "a")
    assert item is not None
    assert [h["cause"] for h in item["history"]] == ["error", "redrive"]
    assert (item["attempts"], item["attempts_by_cause"]["error"]) == (0, 1)


def test_items_backing_off_do_not_block_the_ones_behind(store: QueueStore, wall: Clock) -> None:
    store.enqueue("job", items(*[f"early{i}" for i in range(20)]))
    store.fail([x.token for x in store.lease("w", 20)], "transient", "rate_limit", "429")
    store.enqueue("job", items("late"))
    assert [x.item_id for x in store.lease("w", 5)] == ["late"]
    stats = store.stats("job")
    assert (stats["pending"], stats["waiting"], stats["leased"]) == (20, 20, 1)
    wall.t += 10
    assert len(store.lease("w", 50)) == 20


def test_cancel_dead_letters_waiting_items_and_expired_leases(
    store: QueueStore, clock: Clock
) -> None:
    store.enqueue("job", items("a", "b", "c"))
    a, _b = store.lease("w", 2, lease_s=5)
    store.fail([a.token], "transient", "timeout", "slow")  # waiting
    store.set_job_state("job", "cancelled")  # c pending, a waiting -> dead; b leased
    assert store.stats("job")["dead"] == 2
    clock.t += 6  # b's lease expires: a cancelled job's item goes to the dead letters
    stats = store.stats("job")
    assert (stats["dead"], stats["pending"], stats["leased"]) == (3, 0, 0)
    assert {d["reason"] for d in store.dead_letters("job")} == {"cancelled"}


def test_a_paused_job_keeps_its_items_until_resumed(store: QueueStore) -> None:
    store.create_job(JobSpec("other"))
    store.enqueue("job", items("a"))
    store.enqueue("other", items("o"))
    store.set_job_state("job", "paused")
    assert [x.item_id for x in store.lease("w", 5)] == ["o"]
    store.set_job_state("job", "active")
    assert [x.item_id for x in store.lease("w", 5)] == ["a"]


# ------------------------------------------------------------------ priorities and fairness
def test_fair_shares_fill_small_jobs_and_split_the_rest() -> None:
    assert fair_shares([100, 100], 10) == [5, 5]
    assert fair_shares([2, 100, 100], 10) == [2, 4, 4]
    assert fair_shares([1, 1], 10) == [1, 1]
    assert fair_shares([5, 5, 5], 2) == [1, 1, 0]
    assert fair_shares([], 10) == []


def test_fit_token_budget_takes_round_robin_within_a_class() -> None:
    assert fit_token_budget([[10, 10, 10], [10, 10]], [0, 0], 35) == [2, 1]
    assert fit_token_budget([[50], [10]], [9, 0], 40) == [1, 0]  # the first always goes
    assert fit_token_budget([[10], [10, 10]], [9, 0], 100) == [1, 2]


def test_a_small_job_is_not_starved_by_a_large_one(store: QueueStore) -> None:
    store.create_job(JobSpec("small"))
    store.enqueue("job", items(*[f"big{i}" for i in range(1000)]))
    store.enqueue("small", items(*[f"s{i}" for i in range(10)]))
    leased = [x for _ in range(5) for x in store.lease("w", 4)]
    assert sum(1 for x in leased if x.job_id == "small") == 10


def test_remainders_rotate_between_jobs(store: QueueStore) -> None:
    store.create_job(JobSpec("other"))
    store.enqueue("job", items(*[f"j{i}" for i in range(10)]))
    store.enqueue("other", items(*[f"o{i}" for i in range(10)]))
    firsts = [store.lease("w", 1)[0].job_id for _ in range(4)]
    assert sorted(firsts) == ["job", "job", "other", "other"]


# ------------------------------------------------------------------ stats
def test_stats_without_a_job_give_totals_for_the_scaler(store: QueueStore, wall: Clock) -> None:
    store.create_job(JobSpec("other", priority=5))
    store.enqueue("job", items("a", "b"))
    wall.t += 10
    store.enqueue("other", items("x"))
    store.lease("w", 1)  # priority 5 first: x
    stats = store.stats()
    assert set(stats["jobs"]) == {"job", "other"}
    totals = stats["totals"]
    assert (totals["pending"], totals["leased"], totals["pending_tokens"]) == (2, 1, 20)
    assert totals["pending_by_priority"] == {0: 2}
    assert totals["oldest_pending_s"] == pytest.approx(10.0)


def test_oldest_pending_age_includes_items_backing_off(store: QueueStore, wall: Clock) -> None:
    store.enqueue("job", items("old"))
    store.fail([_lease_one(store).token], "transient", "t", "t")
    wall.t += 0.5
    store.enqueue("job", items("new"))
    wall.t += 0.2  # "old" is still backing off (the seeded delay is 0.84 s)
    assert store.stats("job")["oldest_pending_s"] == pytest.approx(0.7)


def test_item_states_list_every_item_once(store: QueueStore) -> None:
    store.enqueue("job", items("a", "b", "c"))
    store.complete([_lease_one(store).token])
    page = store.item_states("job", limit=2)
    rest = store.item_states("job", after=page[-1][0])
    assert [(c, s) for _, c, s in page + rest] == [
        ("a", "done"),
        ("b", "pending"),
        ("c", "pending"),
    ]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (NewItem("x", 42), "payload must be JSON text"),  # type: ignore[arg-type]
        (NewItem("x", "{} trailing"), "not a JSON object"),
        (NewItem("x", "{"), "not a JSON object"),
        (NewItem("x", "{}", 1, 12), "priority must be"),
        (NewItem("x", "{}", -1), "tokens must be"),
        (NewItem("", "{}"), "must match"),
        (NewItem("a/../b", "{}"), "must match"),
        (NewItem("x" * 129, "{}"), "must match"),
    ],
)
def test_more_bad_items_are_refused_with_the_reason(
    store: QueueStore, bad: NewItem, reason: str
) -> None:
    with pytest.raises(QueueError, match=reason):
        store.enqueue("job", [NewItem("ok", "{}"), bad])
    assert store.stats("job")["total"] == 0


@pytest.mark.parametrize("bad", ['{"a": 1,}', '{"a": "x', "{'a': 1}", '{"a": 1}{}', "{a: 1}"])
def test_a_bad_payload_deep_in_a_large_call_refuses_the_call(store: QueueStore, bad: str) -> None:
    """The JSON of a whole call is checked at once, in chunks: the bad one may be in any."""
    batch = [NewItem(f"i{n}", f'{{"n": {n}}}') for n in range(700)]
    batch[600] = NewItem("i600", bad)
    with pytest.raises(QueueError, match=r"items\[600\] \('i600'\): payload is not a JSON object"):
        store.enqueue("job", batch)
    assert store.stats("job")["total"] == 0
    batch[600] = NewItem("i600", '{"n": 600}')
    assert store.enqueue("job", batch).accepted == 700


def test_json_that_python_reads_but_is_not_strict_json_is_still_accepted(
    store: QueueStore,
) -> None:
    """SQLite's check is stricter than Python's reader (NaN, odd whitespace); an item it does
    not pass is judged by Python, as before, so what the workers can read is accepted."""
    batch = [NewItem("nan", '{"x": NaN}'), NewItem("tab", '{"x": 1}\x0b'), NewItem("ok", "{}")]
    assert store.enqueue("job", batch).accepted == 3


def test_the_sqlite_json_check_is_strict_and_checks_every_chunk() -> None:
    db = sqlite3.connect(":memory:")
    all_json = json_checker(db)
    if all_json is None:  # a SQLite whose json_valid takes JSON5 and has no strict mode
        pytest.skip(f"SQLite {sqlite3.sqlite_version} has no strict json_valid")
    good = [f'{{"n": {n}}}' for n in range(JSON_CHECK_CHUNK * 2 + 3)]
    assert all_json(good) and all_json([]) and all_json(["{}"])
    for bad in ("{a: 1}", '{"x": NaN}', "{", "{} {}", '{"x": "\ud800\x00"}', "\ud800"):
        for at in (0, JSON_CHECK_CHUNK, len(good) - 1):
            texts = list(good)
            texts[at] = bad
            assert not all_json(texts), (bad, at)


def test_a_refusal_names_every_bad_item_and_where_it_is(store: QueueStore) -> None:
    batch = [NewItem("ok", "{}"), NewItem("bad id", "{}"), NewItem("y", "[]")]
    with pytest.raises(QueueError) as err:
        store.enqueue("job", batch)
    assert "items[1] ('bad id')" in str(err.value) and "items[2] ('y')" in str(err.value)
    assert "nothing accepted" in str(err.value)


def test_an_id_repeated_in_one_call_with_another_payload_is_refused(store: QueueStore) -> None:
    with pytest.raises(QueueError, match="repeated in this call"):
        store.enqueue("job", [NewItem("a", '{"v": 1}'), NewItem("a", '{"v": 2}')])
    result = store.enqueue("job", [NewItem("a", '{"v": 1}'), NewItem("a", '{"v": 1}')])
    assert (result.accepted, result.duplicates) == (1, ["a"])


def test_size_limit_counts_bytes_not_characters(store: QueueStore) -> None:
    payload = json.dumps({"t": "é" * 300}, ensure_ascii=False)  # 300 chars, 600+ bytes
    with pytest.raises(QueueError, match="payload over 500 bytes"):
        store.enqueue("job", [NewItem("a", payload)], max_item_bytes=500)


def test_unknown_job_is_refused(store: QueueStore) -> None:
    with pytest.raises(QueueError, match="unknown job"):
        store.enqueue("nope", items("a"))


# ------------------------------------------------------------------ storage failures
@sqlite_only
def test_read_only_database_fails_loudly(store: QueueStore, tmp_path: Path) -> None:
    store.enqueue("job", items("a"))
    store._db.close()
    store._db = sqlite3.connect(
        f"file:{tmp_path / 'q.sqlite'}?mode=ro", uri=True, isolation_level=None
    )
    with pytest.raises(StorageError):
        store.enqueue("job", items("b"))
    assert store.stats("job")["total"] == 1  # the counters did not move either
    assert QueueStore(tmp_path / "q.sqlite").item("job", "b") is None


_DISK_FULL = textwrap.dedent(
    """
    import json, resource, signal, sys
    from inference.errors import StorageError
    from inference.queue.store import JobSpec, NewItem, QueueStore

    store = QueueStore(sys.argv[1])
    store.create_job(JobSpec("job"))
    store.enqueue("job", [NewItem("before", "{}")])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
    big = [NewItem(f"i{i}", json.dumps({"text": "x" * 1000})) for i in range(2000)]
    try:
        store.enqueue("job", big)
        outcome = "accepted"
    except StorageError as exc:
        outcome = f"StorageError: {exc}"
    total_after_failure = store.stats("job")["total"]
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    recovered = store.enqueue("job", [NewItem("after", "{}")]).accepted
    print(json.dumps([outcome, total_after_failure, recovered]))
    """
)


def test_a_full_disk_makes_enqueue_fail_loudly_and_accept_nothing(tmp_path: Path) -> None:
    db = tmp_path / "q.sqlite"
    run = subprocess.run(
        [sys.executable, "-c", _DISK_FULL, str(db)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    outcome, total_after_failure, recovered = json.loads(run.stdout.splitlines()[-1])
    assert outcome.startswith("StorageError")
    assert (total_after_failure, recovered) == (1, 1)
    states = QueueStore(db).item_states("job")
    assert [c for _, c, _ in states] == ["before", "after"]  # nothing of the failed call


# ------------------------------------------------------------------ records on the wire
@pytest.mark.parametrize("dumps", [pickle.dumps, ray.cloudpickle.dumps])
def test_packed_batches_round_trip_as_the_same_records(dumps) -> None:
    leased = Packed([LeasedItem((1, 2), "job", "a", "{}", 0, 5)])
    refusals = Packed([Refusal((1, 2), "stale lease")])
    tokens = Packed([(1, 2), (3, 4)])
    for batch in (leased, refusals, tokens, Packed(), Packed([NewItem("a", "{}")])):
        back = pickle.loads(dumps(batch))
        assert back == batch and type(back) is Packed
        assert [type(x) for x in back] == [type(x) for x in batch]
    assert pickle.loads(dumps(leased))[0].token == (1, 2)


@sqlite_only
def test_the_store_reloads_its_state_when_the_database_changed_behind_its_back(
    store: QueueStore, tmp_path: Path
) -> None:
    store.enqueue("job", items("a", "b"))
    [held] = store.lease("w", 1)
    other = sqlite3.connect(tmp_path / "q.sqlite", isolation_level=None)
    other.execute("UPDATE items SET state = 2 WHERE item_id = 'a'")  # another writer
    other.close()
    [refusal] = store.complete([held.token])
    assert refusal.reason == "not leased (state done)"
    stats = store.stats("job")
    assert (stats["leased"], stats["done"], stats["pending"]) == (0, 1, 1)


def test_a_shard_whose_items_cannot_be_completed_is_taken_back(tmp_path: Path) -> None:
    from inference.queue.actor import WorkQueue  # the actor's class, run in this process

    queue = WorkQueue(str(tmp_path / "q.sqlite"))
    queue.create_job(JobSpec("job", settings={"output_path": str(tmp_path / "out")}))
    queue.enqueue("job", items("a"))
    [held] = queue.lease("w", 1)
    shard = queue.declare_shard("job", [held.token], "w")
    Path(shard.tmp_path).write_bytes(b"rows")
    queue._store._db = sqlite3.connect(  # the disk turns read-only under the queue
        f"file:{tmp_path / 'q.sqlite'}?mode=ro", uri=True, isolation_level=None
    )
    result = queue.commit_shard("job", shard.n, 1, 4)
    assert not result.committed and "queue database failed" in result.reason
    assert not Path(shard.path).exists()  # no row of it is visible to readers
    assert queue.item("job", "a")["state"] == "leased"  # type: ignore[index]


@sqlite_only
def test_a_first_version_database_is_migrated_on_open(
    store: QueueStore, tmp_path: Path, wall: Clock
) -> None:
    store.enqueue("job", items("backing-off", "ready"))
    store.close()
    old = sqlite3.connect(tmp_path / "q.sqlite", isolation_level=None)
    # Version 1 kept an item in backoff as pending with a future not_before.
    old.execute("UPDATE items SET not_before = ? WHERE item_id = 'backing-off'", (wall.t + 60,))
    old.execute("PRAGMA user_version = 0")
    old.close()
    again = QueueStore(tmp_path / "q.sqlite", wall=wall)
    assert again.stats("job")["waiting"] == 1
    assert [x.item_id for x in again.lease("w", 5)] == ["ready"]
    wall.t += 61
    assert [x.item_id for x in again.lease("w", 5)] == ["backing-off"]


@sqlite_only
def test_a_second_version_database_loses_its_lease_index_and_keeps_its_leases(
    store: QueueStore, tmp_path: Path, clock: Clock, wall: Clock
) -> None:
    store.enqueue("job", items("a", "b"))
    [held] = store.lease("w", 1)
    store.close()
    old = sqlite3.connect(tmp_path / "q.sqlite", isolation_level=None)
    old.execute("CREATE INDEX items_leased ON items(deadline) WHERE state = 1")
    old.execute("PRAGMA user_version = 2")
    old.close()
    again = QueueStore(tmp_path / "q.sqlite", clock=clock, wall=wall)
    indexes = {r[0] for r in again._db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "items_leased" not in indexes and "items_pending_pool" in indexes
    assert again._db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert again.stats("job")["leased"] == 1
    assert again.complete([held.token]) == []  # the lease outlived the reopening
    assert [x.item_id for x in again.lease("w", 5)] == ["b"]


def test_a_third_version_database_gets_each_item_its_jobs_pool(
    tmp_path: Path, clock: Clock, wall: Clock
) -> None:
    store = QueueStore(tmp_path / "q.sqlite", clock=clock, wall=wall)
    store.create_job(JobSpec("job", pool="small"))
    store.enqueue("job", items("a", "b"))
    [held] = store.lease("w", 1, pool="small")
    store.close()
    old = sqlite3.connect(tmp_path / "q.sqlite", isolation_level=None)
    # Version 3: one pool per job, no items.pool, the pending index without it.
    old.execute("DROP INDEX items_pending_pool")
    old.execute("ALTER TABLE items DROP COLUMN pool")
    old.execute("CREATE INDEX items_pending ON items(job_id, priority, id) WHERE state = 0")
    old.execute("PRAGMA user_version = 3")
    old.close()
    again = QueueStore(tmp_path / "q.sqlite", clock=clock, wall=wall)
    indexes = {r[0] for r in again._db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "items_pending" not in indexes and "items_pending_pool" in indexes
    assert again.stats("job")["pools"]["small"]["leased"] == 1
    assert again.lease("w", 5, pool="other") == []
    assert [x.item_id for x in again.lease("w", 5, pool="small")] == ["b"]
    assert again.complete([held.token]) == []


def _pool_counts(s: QueueStore, job_id: str) -> dict[str, tuple[int, ...]]:
    return {
        name: (p["pending"], p["waiting"], p["leased"], p["done"], p["dead"], p["pending_tokens"])
        for name, p in s.stats(job_id)["pools"].items()
    }


def test_pending_items_move_from_the_lowest_priority_newest_first(
    queue_target: str, clock: Clock, wall: Clock
) -> None:
    store = QueueStore(queue_target, clock=clock, wall=wall)
    store.create_job(JobSpec("late", pool="local"))
    store.enqueue("late", [NewItem(f"low{k}", "{}", 1, 0) for k in range(3)])
    store.enqueue("late", [NewItem(f"high{k}", "{}", 1, 5) for k in range(3)])
    assert store.move_pending("late", "local", "far", 4) == 4
    moved = store.lease("o", 10, pool="far")
    assert sorted(x.item_id for x in moved) == ["high2", "low0", "low1", "low2"]
    assert [x.item_id for x in store.lease("w", 10, pool="local")] == ["high0", "high1"]


def test_a_job_of_several_pools_hands_each_pool_only_its_own_items(
    tmp_path: Path, queue_target: str, clock: Clock, wall: Clock
) -> None:
    store = QueueStore(queue_target, clock=clock, wall=wall, rng=random.Random(0))
    store.create_job(JobSpec("mix", pool="small", max_attempts=2, backoff_base_s=1.0))
    store.enqueue(
        "mix",
        [NewItem(f"s{i}", json.dumps({"i": i}), 10) for i in range(4)]  # the job's pool
        + [NewItem(f"b{i}", json.dumps({"i": i}), 20, pool="big") for i in range(3)],
    )
    assert _pool_counts(store, "mix") == {"small": (4, 0, 0, 0, 0, 40), "big": (3, 0, 0, 0, 0, 60)}
    big = store.lease("wb", 10, pool="big")
    assert sorted(x.item_id for x in big) == ["b0", "b1", "b2"]
    small = store.lease("ws", 10, pool="small")
    assert sorted(x.item_id for x in small) == ["s0", "s1", "s2", "s3"]
    assert store.lease("wb", 10, pool="big") == []
    # Every way out of a lease keeps each pool's figures: done, failed (backoff, dead),
    # released, expired, then redriven.
    store.complete([big[0].token])
    store.fail([big[1].token], "transient", "boom", "try again")
    store.fail([small[0].token], "permanent", "bad", "no")
    store.release([small[1].token], cause="drained")
    clock.t += 120  # the rest of the leases expire
    store.expire_leases()
    assert _pool_counts(store, "mix") == {"small": (3, 0, 0, 0, 1, 30), "big": (2, 1, 0, 1, 0, 40)}
    assert store.redrive("mix") == 1
    wall.t += 60  # the backoff ends
    store.stats("mix")
    counts = _pool_counts(store, "mix")
    assert counts == {"small": (4, 0, 0, 0, 0, 40), "big": (2, 0, 0, 1, 0, 40)}
    assert store.stats("mix")["pending"] == 6
    store.close()
    again = QueueStore(queue_target, clock=clock, wall=wall)
    assert _pool_counts(again, "mix") == counts  # the database says the same as the mirror


def test_usage_is_counted_for_the_pool_whose_worker_wrote_the_shard(
    tmp_path: Path, queue_target: str, clock: Clock, wall: Clock
) -> None:
    store = QueueStore(queue_target, clock=clock, wall=wall)
    store.create_job(JobSpec("mix", pool="small"))
    store.enqueue("mix", [NewItem("s", "{}", 1), NewItem("b", "{}", 1, pool="big")])
    [held] = store.lease("wb", 5, pool="big")
    n, _ = store.declare_shard("mix", [held.token], "wb", str(tmp_path / "{n}"), "t{n}")
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "busy_s": 2.5}
    store.commit_shard("mix", n, rows=1, nbytes=10, usage=usage)
    stats = store.stats("mix")
    assert (stats["prompt_tokens"], stats["busy_s"]) == (7, 2.5)
    assert stats["pools"]["big"]["prompt_tokens"] == 7
    assert stats["pools"]["big"]["done"] == 1
    assert stats["pools"]["small"]["prompt_tokens"] == 0
    store.close()
    again = QueueStore(queue_target, clock=clock, wall=wall)
    assert again.stats("mix")["pools"]["big"]["busy_s"] == 2.5


def test_an_item_of_an_empty_pool_name_is_refused(store: QueueStore) -> None:
    with pytest.raises(QueueError, match="pool must be a non-empty string"):
        store.enqueue("job", [NewItem("a", "{}", 1, pool="")])


def test_pending_items_move_between_pools_and_leased_ones_never_do(
    tmp_path: Path, queue_target: str, clock: Clock, wall: Clock
) -> None:
    store = QueueStore(queue_target, clock=clock, wall=wall)
    store.create_job(JobSpec("late", pool="local"))
    store.enqueue("late", [NewItem(f"i{k}", "{}", 10) for k in range(10)])
    held = store.lease("w", 3, pool="local")  # the oldest three are leased
    assert store.move_pending("late", "local", "local+overflow", 5) == 5
    counts = _pool_counts(store, "late")
    assert counts["local"] == (2, 0, 3, 0, 0, 20)
    assert counts["local+overflow"] == (5, 0, 0, 0, 0, 50)
    moved = store.lease("o", 10, pool="local+overflow")
    assert sorted(x.item_id for x in moved) == [f"i{k}" for k in range(5, 10)]  # the newest
    assert store.move_pending("late", "local", "local+overflow", 10) == 2  # only pending move
    assert store.lease("w", 10, pool="local") == []
    assert store.move_pending("late", "local+overflow", "local", 10) == 2  # and back
    assert sorted(x.item_id for x in store.lease("w", 10, pool="local")) == ["i3", "i4"]
    store.complete([x.token for x in held + moved])
    counts = _pool_counts(store, "late")
    store.close()
    again = QueueStore(queue_target, clock=clock, wall=wall)
    assert _pool_counts(again, "late") == counts  # the database says the same as the mirror
    assert again.stats("late")["total"] == 10


def test_shards_from_reads_committed_and_in_flight_shards_together(
    tmp_path: Path, store: QueueStore
) -> None:
    store.create_job(JobSpec("rs"))
    store.enqueue("rs", [NewItem(f"i{k}", "{}", 1) for k in range(3)])
    tokens = [held.token for held in store.lease("w", 3)]
    shards = [store.declare_shard("rs", [t], "w", str(tmp_path / "{n}"), "t{n}")[0] for t in tokens]
    store.commit_shard("rs", shards[1], rows=1, nbytes=10)  # out of its numbering
    store.abort_shard("rs", shards[2])
    got = [(s["n"], s["state"], s["rows"]) for s in store.shards_from("rs", 0)]
    assert got == [(shards[0], "declared", None), (shards[1], "committed", 1)]
    assert [s["n"] for s in store.shards_from("rs", shards[1])] == [shards[1]]
