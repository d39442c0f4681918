"""The queue on PostgreSQL (``queue.url``) under the faults it exists for, on a real server:

- the head node is lost with every local file (case 18's variant: the whole cluster killed -9
  and its temp dir deleted); a new cluster pointed at the same database and output resumes the
  job and completes it;
- the server is restarted (immediate mode: a crash, the WAL replayed) twice under load (case
  11's variant: the queue's store goes away under load): connections drop, the queue reconnects,
  nothing accepted is lost and no commit is acknowledged that did not commit.

Each ends in the checker of ``/work/shared/FAULTS.md``: lost = duplicated = unexpected =
partial = 0.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.faults.harness import (
    SEEDS,
    config_file,
    inference_run,
    kill_cluster,
    kill_processes_of,
    run_env,
    write_items,
)


def done_share(url: str, job_id: str) -> float:
    """The share of the job's items done or dead (0 while the server is down or the job is not
    there yet)."""
    try:
        with psycopg.connect(url, connect_timeout=2) as db:
            row = db.execute(
                "SELECT count(*) FILTER (WHERE state IN (2, 3)), count(*) FROM items"
                " WHERE job_id = %s",
                (job_id,),
            ).fetchone()
    except psycopg.Error:
        return 0.0
    return row[0] / row[1] if row and row[1] else 0.0


def wait_for_share(url: str, job_id: str, share: float, proc: Any, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while done_share(url, job_id) < share:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"the job did not reach {share:.0%} in time"
        time.sleep(0.2)


def finish(proc: Any, timeout_s: float = 300) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, err[-3000:]
    last = [ln for ln in out.splitlines() if ln.startswith('{"summary"')][-1]
    summary: dict[str, Any] = json.loads(last)["summary"]
    return summary


@pytest.mark.parametrize("seed", SEEDS)
def test_the_head_node_lost_with_its_files_then_a_new_cluster_resumes_the_job(
    tmp_path: Path, ray_tmp: str, pg_server: Any, seed: int, fault_run: Any
) -> None:
    run = fault_run(18, "head node lost with its disk (PostgreSQL)", seed)
    url = pg_server.database()
    shared = tmp_path / "shared"  # what outlives the node: the input and the output's storage
    shared.mkdir()
    path = write_items(shared / "in.jsonl", 1500, 11 + seed)
    config = config_file(shared, url=url, lease_s=4)
    args = [str(path), "--config", str(config), "--job-id", "head-lost"]
    first = inference_run(args, run_env(ray_tmp))
    wait_for_share(url, "head-lost", 0.25, first)
    kill_cluster(ray_tmp, first)
    shutil.rmtree(ray_tmp, ignore_errors=True)  # every local file of the lost head node
    output = shared / "out"
    assert not list(output.rglob("*.sqlite")), "queue state was kept on the node"
    fresh = tempfile.mkdtemp(prefix="ic-", dir="/tmp")  # the new cluster's own node
    try:
        summary = finish(inference_run(args, run_env(fresh)))
    finally:
        kill_processes_of(fresh)
        shutil.rmtree(fresh, ignore_errors=True)
    assert 0 < summary["processed"] < 1500  # it resumed rather than starting over
    run.check(output / "head-lost", url, "head-lost", 1500)


@pytest.mark.parametrize("seed", SEEDS)
def test_postgresql_restarted_twice_under_load_loses_and_doubles_nothing(
    tmp_path: Path, ray_tmp: str, pg_server: Any, seed: int, fault_run: Any
) -> None:
    run = fault_run(11, "PostgreSQL restarted under load, twice", seed)
    url = pg_server.database()
    path = write_items(tmp_path / "in.jsonl", 1500, 21 + seed)
    config = config_file(tmp_path, url=url, lease_s=10)
    args = [str(path), "--config", str(config), "--job-id", "pg-restart"]
    proc = inference_run(args, run_env(ray_tmp))
    restarts = 0
    for share in (0.2, 0.55):
        wait_for_share(url, "pg-restart", share, proc)
        pg_server.restart("immediate")
        restarts += 1
    summary = finish(proc)
    assert restarts == 2 and summary["processed"] == 1500
    # The queue did lose its session, and came back on a new one (its actor's log says so).
    logs = "".join(
        f.read_text(errors="replace") for f in Path(ray_tmp).rglob("logs/*.err") if f.is_file()
    )
    assert "reconnected to the queue database" in logs
    run.check(tmp_path / "out" / "pg-restart", url, "pg-restart", 1500)


def _shared_config(folder: Path, url: str) -> Path:
    """A config of ``folder`` for one of two clusters sharing the queue: one worker each."""
    path = config_file(folder, url=url, shared=True, lease_s=4)
    config = json.loads(path.read_text())
    config["scaling"]["max_workers"] = 1
    path.write_text(json.dumps(config))
    return path


def _writers_of_committed_shards(url: str, job_id: str) -> set[str]:
    """The WorkQueue tags of the workers whose shards committed (one per cluster); none
    before the queue's tables exist."""
    with psycopg.connect(url) as db:
        if not db.execute("SELECT to_regclass('shards') IS NOT NULL").fetchone()[0]:
            return set()
        rows = db.execute(
            "SELECT DISTINCT worker FROM shards WHERE job_id = %s AND state = 'committed'",
            (job_id,),
        ).fetchall()
    return {worker.rpartition("@")[2] for (worker,) in rows}


@pytest.mark.parametrize("lose_one", [True], ids=["one-lost"])  # False: both to the end
def test_two_clusters_drain_one_job_from_one_queue_exactly_once(
    tmp_path: Path, ray_tmp: str, pg_server: Any, lose_one: bool
) -> None:
    """Two ``inference run`` processes, each with its own embedded Ray cluster, on the same
    job, input, output and PostgreSQL queue (``queue.shared``). Both take part; with
    ``one-lost`` the first cluster is killed -9 once both have committed shards, and the other
    finishes the job, the lost one's leases and declared shards included."""
    from tests.faults.harness import assert_exactly_once

    url = pg_server.database()
    # Long enough that the cluster up second still finds work when its worker is ready.
    path = write_items(tmp_path / "in.jsonl", 3000, 31 + lose_one, max_tokens=(8, 16))
    args = [str(path), "--config", str(_shared_config(tmp_path, url)), "--job-id", "two"]
    other_tmp = tempfile.mkdtemp(prefix="ic-", dir="/tmp")
    try:
        first = inference_run(args, run_env(ray_tmp))
        second = inference_run(args, run_env(other_tmp))
        if lose_one:
            # Killed while both clusters are at work, each with shards committed.
            deadline = time.monotonic() + 240
            while len(_writers_of_committed_shards(url, "two")) < 2:
                assert first.poll() is None and second.poll() is None
                assert time.monotonic() < deadline, "the clusters did not both take part"
                time.sleep(0.2)
            kill_cluster(ray_tmp, first)
        else:
            finish(first)
        finish(second)
        writers = _writers_of_committed_shards(url, "two")
    finally:
        kill_processes_of(other_tmp)
        shutil.rmtree(other_tmp, ignore_errors=True)
    assert len(writers) == 2, writers  # both clusters committed shards
    assert_exactly_once(tmp_path / "out" / "two", url, "two", 3000)
