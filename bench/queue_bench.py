"""WorkQueue benchmark: the real Ray actor, the durable SQLite store, calls of 256 items.

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
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from hostspeed import python_loop_us

from inference.queue.actor import get_or_create_queue
from inference.queue.records import JobSpec, NewItem, Packed

BATCH = 256
TARGETS = {"cycle_items_per_s": 20_000, "lease_ratio_1m_vs_10k": 1.5, "rss_mb_1m": 300}


def main() -> None:
    args = _parse_args()
    base = Path(tempfile.mkdtemp(prefix="qb-", dir="/tmp"))
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(base / "ray"), log_to_driver=False)
    try:
        result = _run(args, base / "queue.sqlite")
    finally:
        ray.shutdown()
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result), flush=True)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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


def _run(args: argparse.Namespace, db_path: Path) -> dict[str, Any]:
    queue = get_or_create_queue(db_path)
    pid = ray.get(queue.pid.remote())
    load_before = os.getloadavg()
    host_before = python_loop_us()
    items = _Items()

    ray.get(queue.create_job.remote(JobSpec("cycle")))
    per_round = args.items // args.rounds
    actor_cpu_s, driver_cpu_s = _cpu_s(pid), time.process_time()
    rounds = []
    for _ in range(args.rounds):
        rounds.append(_cycle(queue, items, "cycle", per_round, args.producers, args.consumers))
        _say(f"cycle, {args.producers} producers + {args.consumers} consumers: {rounds[-1]:,.0f}")
    actor_cpu_s, driver_cpu_s = _cpu_s(pid) - actor_cpu_s, time.process_time() - driver_cpu_s
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
        "db_mb": round(db_path.stat().st_size / 2**20, 1),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "host_loop_us": [host_before, host_after_cycles, host_after_small, python_loop_us()],
        "sqlite": sqlite3.sqlite_version,
        "ray": ray.__version__,
    }
    result["targets_met"] = {
        "cycle_items_per_s": result["cycle_items_per_s"] >= TARGETS["cycle_items_per_s"],
        "lease_ratio_1m_vs_10k": result["lease_ratio_1m_vs_10k"]
        <= TARGETS["lease_ratio_1m_vs_10k"],
        "rss_mb_1m": result["rss_mb_1m"] <= TARGETS["rss_mb_1m"],
    }
    return result


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
