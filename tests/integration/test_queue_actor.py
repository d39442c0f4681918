"""The WorkQueue actor on the real local Ray cluster with its real SQLite database: fencing
through Ray, bad input, and crashes (``ray.kill`` with restart, and kill -9 of its process)
while a producer enqueues and a consumer leases and completes.

The queue is the cluster's singleton, shared with other tests: each test uses its own job ids
and its own pool, so it never leases another test's items.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray

from inference.errors import QueueError
from inference.queue.actor import get_or_create_queue
from inference.queue.records import JobSpec, NewItem, Packed

pytestmark = pytest.mark.usefixtures("ray_cluster")

CALL_TIMEOUT_S = 60.0


@pytest.fixture
def queue(queue_db: Path) -> Any:
    return get_or_create_queue(queue_db)


def _job(queue: Any, prefix: str, **spec: Any) -> str:
    job_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    ray.get(queue.create_job.remote(JobSpec(job_id, pool=job_id, **spec)))
    return job_id


def _items(prefix: str, n: int) -> Packed[NewItem]:
    return Packed(NewItem(f"{prefix}-{i}", json.dumps({"n": i}), 4) for i in range(n))


def _call(method: Any, *args: Any) -> Any:
    """One actor call, retried while the actor restarts (Ray retries calls in flight by
    itself; this covers the window where the handle reports the actor unavailable)."""
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while True:
        try:
            return ray.get(method.remote(*args), timeout=CALL_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _all_states(queue: Any, job_id: str) -> list[tuple[int, str, str]]:
    states: list[tuple[int, str, str]] = []
    while True:
        page = _call(queue.item_states, job_id, 1000, states[-1][0] if states else 0)
        if not page:
            return states
        states.extend(page)


# ------------------------------------------------------------------ fencing and bad input
def test_a_zombie_workers_calls_are_refused_through_the_actor(queue: Any) -> None:
    job = _job(queue, "zombie")
    ray.get(queue.enqueue.remote(job, _items("z", 1)))
    [zombie] = ray.get(queue.lease.remote("w1", 1, None, 0.3, job))
    time.sleep(0.5)
    [fresh] = ray.get(queue.lease.remote("w2", 1, None, 30.0, job))
    assert fresh.token[1] == zombie.token[1] + 1
    for call in (queue.complete.remote([zombie.token]), queue.extend.remote([zombie.token], 5)):
        [refusal] = ray.get(call)
        assert refusal.reason.startswith("stale lease")
    assert ray.get(queue.fail.remote([zombie.token], "permanent", "x", "y"))
    assert ray.get(queue.complete.remote([fresh.token])) == []
    item = ray.get(queue.item.remote(job, "z-0"))
    assert (item["state"], item["attempts_by_cause"]["lease_expired"]) == ("done", 1)


def test_a_lost_workers_uncommitted_shard_is_aborted_and_its_file_removed_at_once(
    queue: Any, tmp_path: Path
) -> None:
    """A worker lost between writing its shard and committing it leaves a temporary file:
    releasing the worker aborts the shard and removes the file (not at the queue's next
    start), and a late commit of it (a writer that outlived the release) shows nothing."""
    job_id = f"lostshard-{uuid.uuid4().hex[:8]}"
    settings = {"output_path": str(tmp_path / "out"), "output_format": "parquet"}
    ray.get(queue.create_job.remote(JobSpec(job_id, pool=job_id, settings=settings)))
    ray.get(queue.enqueue.remote(job_id, _items("s", 2)))
    leased = ray.get(queue.lease.remote("w-lost", 2, None, 30.0, job_id))
    declared = ray.get(queue.declare_shard.remote(job_id, [i.token for i in leased], "w-lost"))
    tmp = Path(declared.tmp_path)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(b"half a shard")
    assert ray.get(queue.release_worker.remote("w-lost")) == 2
    assert not tmp.exists()
    tmp.write_bytes(b"the late writer")
    result = ray.get(queue.commit_shard.remote(job_id, declared.n, 2, 15))
    assert not result.committed and "aborted" in result.reason
    assert not tmp.exists() and not Path(declared.path).exists()
    assert ray.get(queue.committed_shards.remote(job_id)) == []


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (NewItem("has space", "{}"), "must match"),
        (NewItem("x", '["a list"]'), "not a JSON object"),
        (NewItem("x", json.dumps({"t": "x" * 2_000_000})), "payload over"),
    ],
)
def test_bad_input_is_refused_through_the_actor_and_nothing_is_accepted(
    queue: Any, bad: NewItem, reason: str
) -> None:
    job = _job(queue, "bad")
    with pytest.raises(QueueError, match=reason):
        ray.get(queue.enqueue.remote(job, [NewItem("good", "{}"), bad]))
    assert ray.get(queue.stats.remote(job))["total"] == 0


# ------------------------------------------------------------------ crashes
class _Churn:
    """A producer that enqueues batches and a consumer that leases and completes, each in a
    thread, recording what the queue acknowledged."""

    def __init__(self, queue: Any, job_id: str) -> None:
        self.queue = queue
        self.job_id = job_id
        self.acked: set[str] = set()
        self.completed: set[str] = set()  # completes the queue accepted (no refusal)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._guard, args=(self._produce,), daemon=True),
            threading.Thread(target=self._guard, args=(self._consume,), daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=CALL_TIMEOUT_S)
        assert not self.errors, self.errors

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, "the churn made no progress"
            time.sleep(0.05)

    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as exc:  # reported by stop() and wait_for()
            self.errors.append(exc)

    def _produce(self) -> None:
        n = 0
        while not self._stop.is_set():
            batch = _items(f"p{n}", 40)
            result = _call(self.queue.enqueue, self.job_id, batch)
            assert result.accepted + len(result.duplicates) == len(batch)
            self.acked.update(x.item_id for x in batch)
            n += 1

    def _consume(self) -> None:
        while not self._stop.is_set():
            leased = _call(self.queue.lease, "consumer", 25, None, 0.5, self.job_id)
            if not leased:
                time.sleep(0.01)
                continue
            refused = {r.token for r in _call(self.queue.complete, [x.token for x in leased])}
            self.completed.update(x.item_id for x in leased if x.token not in refused)


def _kill_with_ray(queue: Any) -> None:
    ray.kill(queue, no_restart=False)


def _kill_9(queue: Any) -> None:
    os.kill(ray.get(queue.pid.remote()), signal.SIGKILL)


@pytest.mark.parametrize("kill", [_kill_with_ray, _kill_9], ids=["ray_kill", "kill_9"])
def test_a_killed_queue_restarts_with_every_acknowledged_item_in_exactly_one_state(
    queue: Any, kill: Callable[[Any], None]
) -> None:
    job = _job(queue, "crash", max_attempts=50)
    held_job = _job(queue, "held")
    ray.get(queue.enqueue.remote(held_job, _items("h", 5)))
    churn = _Churn(queue, job)
    churn.start()
    churn.wait_for(lambda: len(churn.acked) >= 400 and len(churn.completed) >= 100)
    held = ray.get(queue.lease.remote("holder", 5, None, 1.0, held_job))
    old_pid = ray.get(queue.pid.remote())
    kill(queue)
    acked_at_kill = len(churn.acked)
    churn.wait_for(lambda: len(churn.acked) >= acked_at_kill + 200)
    churn.stop()
    assert _call(queue.pid) != old_pid

    states = _all_states(queue, job)
    ids = [custom_id for _, custom_id, _ in states]
    assert len(ids) == len(set(ids))  # one row, so one state, per item
    assert churn.acked <= set(ids)  # every acknowledged enqueue survived
    by_id = {custom_id: state for _, custom_id, state in states}
    assert {by_id[i] for i in churn.completed} == {"done"}
    stats = _call(queue.stats, job)
    counts = Counter(state for _, _, state in states)
    assert {s: stats[s] for s in ("pending", "leased", "done", "dead")} == {
        s: counts[s] for s in ("pending", "leased", "done", "dead")
    }
    assert stats["total"] == len(states)

    # The leases out at the crash expire normally (a full lease period after the restart).
    def held_expired() -> bool:
        items = [_call(queue.item, held_job, x.item_id) for x in held]
        return all(i["attempts_by_cause"]["lease_expired"] == 1 for i in items)

    churn.wait_for(held_expired, timeout_s=15.0)
    assert _call(queue.complete, [x.token for x in held])  # refused: those leases are gone

    _drain(queue, job)
    final = _call(queue.stats, job)
    assert (final["done"], final["pending"], final["leased"]) == (len(states), 0, 0)


def _drain(queue: Any, job_id: str, timeout_s: float = 30.0) -> None:
    """Lease and complete everything of a job (leases of the stopped consumer expire first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = _call(queue.stats, job_id)
        if stats["pending"] == 0 and stats["leased"] == 0:
            return
        assert time.monotonic() < deadline, stats
        leased = _call(queue.lease, "drain", 500, None, 30.0, job_id)
        if leased:
            assert _call(queue.complete, [x.token for x in leased]) == []
        else:
            time.sleep(0.1)
