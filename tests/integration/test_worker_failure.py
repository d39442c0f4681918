"""A worker whose own machinery fails never hangs a job: on the real local Ray cluster, the real
queue and the bundled tiny model.

- A writer thread that raises (any exception, not only an ``OSError``) or a lease thread that
  raises stops its worker: ``run`` raises :class:`WorkerError` (the pool counts a lost worker, not
  a planned drain), and what it held goes back with an attempt charged and the reason, so after
  ``max_attempts`` it is in the dead letters saying why.
- An ``--output`` whose path holds braces runs to the end (the shard name was built with
  ``str.format`` on the whole path: a ``KeyError`` in the writer, and a job that never ended).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray

from inference.config import load_config
from inference.queue.actor import NAMESPACE, get_or_create_queue
from inference.queue.records import NewItem, Packed
from inference.runner import job_spec
from inference.shards import read_results
from inference.worker import InferenceWorker
from tests.conftest import EXAMPLES, REPO

pytestmark = pytest.mark.usefixtures("ray_cluster")
ITEMS = 12


def _config(tmp_path: Path, queue_db: Path, **queue: Any) -> Any:
    return load_config(REPO / "configs/tiny-cpu.yaml").with_updates(
        output={"path": str(tmp_path / "out"), "rows_per_shard": 4, "max_shard_age_s": 0.2},
        queue={"db_path": str(queue_db), **queue},
        batching={"max_batch_size": 4},
    )


def _job(config: Any, queue: Any, count: int = ITEMS) -> str:
    """A job of ``count`` example chats in a pool of its own (no other test's worker takes
    them)."""
    job_id = f"wf-{uuid.uuid4().hex[:8]}"
    spec = dataclasses.replace(job_spec(config, job_id, config.output.path), pool=job_id)
    ray.get(queue.create_job.remote(spec))
    lines = (EXAMPLES / "chat.jsonl").read_text().splitlines()[:count]
    items = Packed(
        NewItem(record["custom_id"], json.dumps(record), 16)
        for record in (json.loads(line) for line in lines)
    )
    ray.get(queue.enqueue.remote(job_id, items))
    return job_id


def _run_worker(config: Any, job_id: str, fault: str) -> Any:
    """One worker actor of the job's pool whose process has ``INFERENCE_FAULT`` set; returns
    its ``run`` call."""
    actor = (
        ray.remote(InferenceWorker)
        .options(
            name=f"{job_id}-w",
            namespace=NAMESPACE,
            num_cpus=1,
            max_concurrency=4,
            max_restarts=0,
            runtime_env={"env_vars": {"INFERENCE_FAULT": fault}},
        )
        .remote(f"{job_id}-w", config, job_id)
    )
    return actor, actor.run.remote()


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("raise:before_write", "writer thread failed"), ("raise:after_lease", "lease thread failed")],
)
def test_a_failing_worker_thread_fails_the_worker_and_charges_its_items(
    tmp_path: Path, queue_db: Path, fault: str, reason: str
) -> None:
    config = _config(tmp_path, queue_db, max_attempts=1)
    queue = get_or_create_queue(queue_db)
    job_id = _job(config, queue)
    actor, run = _run_worker(config, job_id, fault)
    try:
        with pytest.raises(ray.exceptions.RayTaskError) as caught:
            ray.get(run, timeout=240)  # before: the worker leased and heartbeated forever
        assert "WorkerError" in str(caught.value) and reason in str(caught.value)
    finally:
        ray.kill(actor)
    stats = ray.get(queue.stats.remote(job_id))
    assert stats["leased"] == 0  # nothing left hanging
    # Nothing lost: what was never leased waits for the worker the pool starts instead.
    assert stats["done"] + stats["dead"] + stats["pending"] == ITEMS
    dead = ray.get(queue.dead_letters.remote(job_id, 100, 0))
    assert len(dead) == stats["dead"] >= 1
    for letter in dead:
        assert letter["error_code"] == "worker_error"
        assert reason in letter["message"] and "fault injection" in letter["message"]
        assert letter["attempts"] == 1


def test_an_output_path_with_braces_runs_to_the_end(tmp_path: Path, queue_db: Path) -> None:
    from inference.runner import run_job

    root = tmp_path / "out{x}" / "{}"
    config = _config(tmp_path, queue_db).with_updates(output={"path": str(root)})
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join((EXAMPLES / "chat.jsonl").read_text().splitlines()[:10]) + "\n")
    summary = run_job(path, config, job_id=f"braces-{uuid.uuid4().hex[:6]}")
    assert (summary.done, summary.dead, summary.workers_lost) == (10, 0, 0)
    assert read_results(summary.output).num_rows == 10
    assert all("{x}" in str(p) for p in (root / summary.job_id / "data").iterdir())


def test_a_fixed_pools_drain_hands_back_unfinished_leases_uncharged_in_time(
    tmp_path: Path, queue_db: Path
) -> None:
    """``scaling.drain_timeout_s`` holds for a fixed pool too (it waited 120 s whatever the
    config said), and what a worker still holds then goes back with no attempt charged."""
    import time

    from inference.pool import WorkerPool

    config = _config(tmp_path, queue_db).with_updates(scaling={"drain_timeout_s": 1})
    queue = get_or_create_queue(queue_db)
    job_id = _job(config, queue, count=2)
    slow = {"env_vars": {"INFERENCE_FAULT_ITEMS": json.dumps({"*": "sleep:120"})}}
    pool = WorkerPool(config, job_id, queue, runtime_env=slow)
    pool.start(1)
    deadline = time.monotonic() + 120
    while ray.get(queue.stats.remote(job_id))["leased"] < 2:
        assert time.monotonic() < deadline, "the worker never leased the items"
        time.sleep(0.2)
    started = time.monotonic()
    pool.drain(grace_s=2)  # the worker sleeps in its engine: it will not stop by itself
    took = time.monotonic() - started
    stats = ray.get(queue.stats.remote(job_id))
    assert (stats["pending"], stats["leased"], stats["done"]) == (2, 0, 0)
    assert sum(stats["attempts_by_cause"].values()) == 0  # handed back, not charged
    assert took < 30, f"the drain took {took:.0f} s"
    ray.get(queue.set_job_state.remote(job_id, "cancelled"))  # no other pool takes them
