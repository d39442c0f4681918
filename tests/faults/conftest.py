"""The fault suite's fixtures and its report.

Each case records one row per seed (case, seed, lost, duplicated, unexpected, partial, wall
time) to a JSON-lines file: ``$FAULT_REPORT`` when set (appended to), else
``.pytest_cache/.../faults/report.jsonl`` (or the session's temp dir without a cache), started
afresh each session. The table of this session's rows, and the cases of ``/work/shared/FAULTS.md``
covered elsewhere or not at all, is printed at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import FaultRun, kill_processes_of

_ROWS: list[dict[str, Any]] = []
_REPORT: list[Path] = []

ELSEWHERE: list[tuple[int, str, str]] = [
    # (case, name, where it is covered or why it is not)
    (
        1,
        "kill -9 of the API process after a 200",
        "not here: needs LazyFS to clear the page "
        "cache (not installed); the durable-before-200 half is tests/integration/test_api.py",
    ),
    (
        2,
        "client retry / conflicting payload",
        "tests/integration/test_api.py (idempotent enqueue, 409); Toxiproxy not installed",
    ),
    (
        8,
        "clock skew / wall-clock jump",
        "tests/unit/test_store.py (an injected wall clock jump "
        "expires no lease); faketime not installed",
    ),
    (
        13,
        "GCS restart",
        "not here: without Redis it is case 18 (the whole cluster dies, the "
        "queue resumes); no Redis for GCS fault tolerance on this machine",
    ),
    (15, "scale-down with held leases", "tests/integration/test_autoscale.py"),
    (
        17,
        "partition API/workers <-> store",
        "not here: the store is an actor reached over Ray's "
        "own loopback gRPC, which a TCP proxy cannot sit in; Toxiproxy not installed (RPC "
        "failures: case 14)",
    ),
    (
        19,
        "job expiry; DLQ redrive",
        "tests/integration/test_api.py (a batch past its window: batch_expired lines), "
        "tests/unit/test_queue_hardening.py (dead letters say expired), tests/unit/test_store.py "
        "(redrive of a completed id does nothing)",
    ),
    (20, "oversized / malformed fields", "tests/integration/test_api.py, test_api_schema.py"),
    (21, "output path escapes", "tests/unit/test_shards.py, tests/integration/test_api.py"),
    (22, "tokens, bind address, Host", "tests/integration/test_api.py, test_api_serve.py"),
    (23, "10x overload, priorities", "tests/integration/test_api.py (429 with Retry-After)"),
]


def pytest_configure(config: pytest.Config) -> None:
    given = os.environ.get("FAULT_REPORT")
    if given:
        path = Path(given)
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        cache = getattr(config, "cache", None)
        folder = (
            Path(cache.mkdir("faults"))
            if cache is not None
            else Path(tempfile.mkdtemp(prefix="faults-"))
        )
        path = folder / "report.jsonl"
        path.write_text("")
    _REPORT[:] = [path]


@pytest.fixture
def fault_run() -> Iterator[Callable[..., FaultRun]]:
    """``fault_run(case, name, seed)``: a :class:`FaultRun` timed from now; a case that fails
    before its check still gets a row (counts unknown) with the failure."""
    runs: list[FaultRun] = []

    def start(case: int, name: str, seed: int = 0) -> FaultRun:
        run = FaultRun(case, name, seed, _REPORT[0], _ROWS)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if not run.recorded:
            run.record(None, note="failed before the check")
        run.flush()


@pytest.fixture
def ray_tmp() -> Iterator[str]:
    """A temp dir for an embedded Ray cluster of a subprocess; every process still naming it
    is killed at the end."""
    folder = tempfile.mkdtemp(prefix="ic-", dir="/tmp")
    yield folder
    kill_processes_of(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _fmt(value: Any) -> str:
    return "?" if value is None else str(value)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("fault matrix")
    head = f"{'case':>4}  {'name':<44} {'seed':>4} {'lost':>4} {'dup':>4} {'unexp':>5} "
    tr.write_line(head + f"{'part':>4} {'wall_s':>7}  note")
    for row in sorted(_ROWS, key=lambda r: (r["case"], r["seed"])):
        tr.write_line(
            f"{row['case']:>4}  {row['name'][:44]:<44} {row['seed']:>4} {_fmt(row['lost']):>4} "
            f"{_fmt(row['duplicated']):>4} {_fmt(row['unexpected']):>5} "
            f"{_fmt(row['partial']):>4} {row['wall_s']:>7}  {row['note']}"
        )
    tr.write_line("covered elsewhere or not here:")
    for case, name, where in ELSEWHERE:
        tr.write_line(f"{case:>4}  {name[:44]:<44} {where}")
    tr.write_line(f"report: {_REPORT[0]}")
