"""Shared fixtures: one real local Ray cluster for the whole test run, temp folders for state."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

QUEUE_BACKENDS = ("sqlite", "postgresql")
sqlite_only = pytest.mark.parametrize("queue_target", ["sqlite"], indirect=True)
"""For a test of SQLite's file itself: ``queue_target`` (and ``store``) on SQLite alone."""


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """One real PostgreSQL server for the run (see tests/support/pgserver.py); each test takes a
    fresh database of it."""
    from tests.support.pgserver import PgServer

    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(params=QUEUE_BACKENDS)
def queue_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's queue lives: a SQLite file in its temp folder, or a fresh database on the
    run's PostgreSQL server (a ``postgresql://`` URL; the password is in ``PGPASSWORD``)."""
    if request.param == "sqlite":
        return str(tmp_path / "q.sqlite")
    return str(request.getfixturevalue("pg_server").database())


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Path]:
    """A local Ray cluster (2 CPUs) shared by the integration tests, with its temp folder and
    the WorkQueue's database inside one temp directory; shut down at the end."""
    import ray

    from inference.queue.actor import NAMESPACE

    base = Path(tempfile.mkdtemp(prefix="inf-ray-", dir="/tmp"))
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(
        num_cpus=2,
        namespace=NAMESPACE,
        include_dashboard=False,
        _temp_dir=str(base / "ray"),
        log_to_driver=False,
    )
    try:
        yield base
    finally:
        ray.shutdown()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def queue_db(ray_cluster: Path) -> Path:
    """The one WorkQueue database of the shared cluster (the queue is a cluster singleton)."""
    return ray_cluster / "queue.sqlite"
