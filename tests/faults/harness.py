"""The harness of the fault suite: inputs and configs of small jobs, ways to run them (in a thread
on the session's Ray cluster, or as ``inference run`` with its own embedded cluster), ways to find
and hurt their processes, and the report: every case ends in :meth:`FaultRun.check`, which runs
the checker (``tests/checker.py``), appends a row (case, seed, lost, duplicated, unexpected,
partial, wall time) to the JSON-lines report and asserts that all four counts are 0.

Seeds: ``FAULT_SEEDS=N`` runs seeds ``0..N-1`` of every case (CI: one); ``CRASH_SEEDS`` (a comma
list of seeds, the old name) is honoured when ``FAULT_SEEDS`` is unset.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from inference.config import Config, load_config
from tests.checker import Verdict, check
from tests.conftest import REPO
from tests.support.vllm_server import session_pids

INFERENCE = str(Path(sys.executable).with_name("inference"))
POOL_PREFIX = "tiny-llama-"


def fault_seeds() -> list[int]:
    if "FAULT_SEEDS" in os.environ:
        return list(range(int(os.environ["FAULT_SEEDS"])))
    if os.environ.get("CRASH_SEEDS"):
        return [int(s) for s in os.environ["CRASH_SEEDS"].split(",")]
    return [0]


SEEDS = fault_seeds()


# ---------------------------------------------------------------------------- the report
@dataclass
class FaultRun:
    """One case under one seed: a timer from its start, and the row it records."""

    case: int
    name: str
    seed: int
    report: Path
    rows: list[dict[str, Any]]
    started: float = field(default_factory=time.monotonic)
    recorded: dict[str, Any] | None = None

    def record(self, verdict: Verdict | None, note: str = "") -> dict[str, Any]:
        row: dict[str, Any] = {
            "case": self.case,
            "name": self.name,
            "seed": self.seed,
            "lost": verdict.lost if verdict else None,
            "duplicated": verdict.duplicated if verdict else None,
            "unexpected": verdict.unexpected if verdict else None,
            "partial": verdict.partial if verdict else None,
            "accepted": verdict.accepted if verdict else None,
            "in_data": verdict.in_data if verdict else None,
            "in_errors": verdict.in_errors if verdict else None,
            "wall_s": round(time.monotonic() - self.started, 1),
            "note": note,
        }
        self.rows.append(row)
        self.recorded = row
        return row

    def note(self, text: str) -> None:
        """Set the note of the row recorded (written to the report when the case ends)."""
        if self.recorded:
            self.recorded["note"] = text

    def flush(self) -> None:
        if self.recorded:
            with self.report.open("a") as f:
                f.write(json.dumps(self.recorded) + "\n")

    def check(
        self, job_dir: Path, db: Path | str, job_id: str, expected: int, *, partial_ok: bool = False
    ) -> Verdict:
        """Run the checker, record its row, and assert the run was clean: ``expected`` items
        accepted, each in data or errors exactly once, nothing unexpected or partial."""
        verdict = check(job_dir, db, job_id)
        self.record(verdict)
        assert verdict.accepted == expected, verdict
        counts = (verdict.lost, verdict.duplicated, verdict.unexpected, verdict.partial)
        assert counts == (0, 0, 0, 0), verdict
        if not partial_ok:
            assert verdict.in_data + verdict.in_errors == expected, verdict
        return verdict


def assert_exactly_once(job_dir: Path, db: Path | str, job_id: str, expected: int) -> None:
    """The checker's four counts are 0 and every one of ``expected`` items is in the output
    (for tests outside the fault matrix, which record no row)."""
    verdict = check(job_dir, db, job_id)
    assert verdict.accepted == expected
    assert (verdict.lost, verdict.duplicated, verdict.unexpected, verdict.partial) == (0, 0, 0, 0)
    assert verdict.in_data + verdict.in_errors == expected


# ---------------------------------------------------------------------------- inputs
def chat_line(custom_id: str, words: str, max_tokens: int) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "messages": [{"role": "user", "content": words}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    }


def write_items(
    path: Path,
    count: int,
    seed: int = 0,
    max_tokens: tuple[int, int] = (2, 6),
    prefix: str = "item-",
) -> Path:
    """``count`` chat lines ``{prefix}00000``.. with seeded words and ``max_tokens``."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(count):
            words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(8))
            line = chat_line(f"{prefix}{i:05d}", words, rng.randint(*max_tokens))
            f.write(json.dumps(line) + "\n")
    return path


def write_lines(path: Path, ids: list[str], seed: int = 0, max_tokens: int = 4) -> Path:
    """One chat line per custom id."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for custom_id in ids:
            words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(6))
            f.write(json.dumps(chat_line(custom_id, words, max_tokens)) + "\n")
    return path


def config_for(tmp: Path, db: Path, **queue: object) -> Config:
    """A config for a job on the session's cluster (its WorkQueue's database is ``db``)."""
    return load_config(REPO / "configs/tiny-cpu.yaml").with_updates(
        output={"path": str(tmp / "out"), "rows_per_shard": 100, "max_shard_age_s": 2},
        queue={
            "db_path": str(db),
            "max_attempts": 20,
            "backoff_base_s": 0.1,
            "backoff_max_s": 0.5,
            **queue,
        },
    )


def config_file(tmp: Path, *, output: dict[str, Any] | None = None, **queue: object) -> Path:
    """A config file for ``inference run`` with its own embedded cluster and database."""
    config = {
        "engine": {"model": "tiny-llama", "device": "cpu"},
        "output": {
            "path": str(tmp / "out"),
            "rows_per_shard": 50,
            "max_shard_age_s": 1,
            **(output or {}),
        },
        "queue": {
            "db_path": str(tmp / "queue.sqlite"),
            "max_attempts": 20,
            "backoff_base_s": 0.1,
            "backoff_max_s": 0.5,
            **queue,
        },
        "scaling": {"cpus_per_worker": 1},
    }
    if "url" in queue:  # the queue on PostgreSQL
        del config["queue"]["db_path"]
    path = tmp / "config.yaml"
    path.write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------------------- the session cluster
def worker_infos() -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, info) of each live worker of the tiny-llama pool, listed afresh: one seen a
    moment ago may have ended."""
    import ray

    from inference.queue.actor import NAMESPACE

    for name in ray.util.list_named_actors():
        if not name.startswith(POOL_PREFIX):
            continue
        try:
            info = ray.get(ray.get_actor(name, namespace=NAMESPACE).info.remote(), timeout=2)
        except Exception:
            continue
        yield name, info


def worker_pids() -> list[int]:
    return [int(info["pid"]) for _name, info in worker_infos()]


def job_done_share(job_id: str) -> float:
    """The share of the job's items done (0 before the job is in the queue)."""
    import ray

    from inference.queue.actor import get_queue

    try:
        stats = ray.get(get_queue().stats.remote(job_id), timeout=2)
    except Exception:
        return 0.0
    return stats["done"] / stats["total"] if stats["total"] else 0.0


def pause_a_worker(timeout_s: float = 60) -> int:
    """SIGSTOP one live worker that holds leases (a paused worker holding nothing would prove
    nothing)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for _name, info in worker_infos():
            if info["held"] == 0 or info["state"] not in ("busy", "leasing"):
                continue
            try:
                os.kill(info["pid"], signal.SIGSTOP)
            except ProcessLookupError:
                continue
            return int(info["pid"])
        time.sleep(0.1)
    pytest.fail("no live worker holding leases to pause")


def run_in_thread(path: Path, config: Config, job_id: str) -> tuple[threading.Thread, dict]:
    """``run_job`` in a daemon thread of this process (the session's cluster); the box gets
    ``summary`` or ``error``."""
    from inference.runner import run_job

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["summary"] = run_job(path, config, job_id=job_id, poll_s=0.2)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


# ---------------------------------------------------------------------------- own clusters
def inference_run(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """``inference run ARGS --quiet`` in its own session (so its process group can be killed)."""
    return subprocess.Popen(
        [INFERENCE, "run", *args, "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def run_env(ray_tmp: str, **extra: str) -> dict[str, str]:
    """The environment of an ``inference run`` with an embedded cluster under ``ray_tmp``."""
    env = {**os.environ, "INFERENCE_RAY_TEMP_DIR": ray_tmp, **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def run_to_end(args: list[str], env: dict[str, str], timeout_s: float = 300) -> dict[str, Any]:
    """``inference run`` to its end; returns its summary (asserts exit code 0)."""
    proc = inference_run(args, env)
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, err[-3000:]
    # Ray may print its own lines (a raylet's warnings) after the summary.
    last = [ln for ln in out.splitlines() if ln.startswith('{"summary"')][-1]
    summary: dict[str, Any] = json.loads(last)["summary"]
    return summary


def kill_cluster(ray_tmp: str, leader: subprocess.Popen[str]) -> None:
    """kill -9 of the driver and every process of its embedded Ray cluster."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGKILL)
    kill_processes_of(ray_tmp)
    # Ray's workers may sit in process groups of their own and name no folder: every process
    # of the driver's session goes too, or a surviving worker finishes the "lost" job.
    kill_session(leader.pid)
    leader.wait(30)


def kill_session(sid: int) -> None:
    """kill -9 of every process of session ``sid`` (a driver or server and its Ray cluster)."""
    for _ in range(3):  # what was starting while the first pass ran
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def kill_processes_of(folder: str) -> None:
    """kill -9 of every process whose command line names ``folder`` (a cluster's temp dir)."""
    out = subprocess.run(["pgrep", "-f", folder], capture_output=True, text=True).stdout
    for pid in out.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


# ---------------------------------------------------------------------------- the database
def items_of(db: Path, job_id: str) -> dict[str, dict[str, Any]]:
    """Every item of a job by custom id: state name, attempts, error code and history."""
    names = {0: "pending", 1: "leased", 2: "done", 3: "dead", 4: "pending"}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT item_id, state, attempts, n_error, n_expired, n_lost, error_kind, error_code,"
            " error_message, history FROM items WHERE job_id = ?",
            (job_id,),
        ).fetchall()
    finally:
        con.close()
    return {
        r[0]: {
            "state": names[r[1]],
            "attempts": r[2],
            "n_error": r[3],
            "n_expired": r[4],
            "n_lost": r[5],
            "error_kind": r[6],
            "error_code": r[7],
            "error_message": r[8],
            "history": json.loads(r[9]) if r[9] else [],
        }
        for r in rows
    }
