"""The cluster's rate limit on the real local Ray cluster: workers (threads, each with its own
asyncio loop, as in the remote engine) draw on one ``RateLimiterActor`` and, together, stay
within ``capacity + rate * T`` over every window while using most of the budget; a provider's
Retry-After stops all of them; ``share`` keeps a part of the limit free.

Acquire times are taken with ``time.monotonic()`` in the workers (one host: one clock), right
after ``acquire`` returns, so the window check allows a few milliseconds of slack.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import ray

from inference.config import LimitsConfig
from inference.limits import Limiter, limiter_name
from inference.limits.client import PAUSE_POLL_S
from inference.queue.actor import NAMESPACE

pytestmark = pytest.mark.usefixtures("ray_cluster")

JITTER_S = 0.05  # how late a recorded time may be after the acquire it records


def worst_window_excess(times: list[float], rate: float, capacity: float) -> float:
    """max over windows [t_i, t_j] of count - (capacity + rate * (t_j - t_i)); > 0 breaks the
    guarantee."""
    times = sorted(times)
    worst = best_end = -float("inf")
    for i in range(len(times) - 1, -1, -1):
        best_end = max(best_end, (i + 1) - rate * times[i])
        worst = max(worst, best_end - (i - rate * times[i]) - capacity)
    return worst


def actor_call(key: str, method: str) -> Any:
    """Call the key's limiter actor directly, as a metrics scrape would."""
    actor = ray.get_actor(limiter_name(key), namespace=NAMESPACE)
    return ray.get(getattr(actor, method).remote())


Body = Callable[[Limiter, int, list[float]], Coroutine[Any, Any, None]]


def run_workers(key: str, config: LimitsConfig, workers: int, body: Body) -> list[list[float]]:
    """Run ``body(limiter, index, stamps)`` in ``workers`` threads, each with its own loop and
    its own Limiter on ``key``; the acquire times each recorded."""
    stamps: list[list[float]] = [[] for _ in range(workers)]
    errors: list[BaseException] = []
    limiters = [Limiter.connect(key, config, f"worker-{i}") for i in range(workers)]

    def thread(index: int) -> None:
        try:
            asyncio.run(body(limiters[index], index, stamps[index]))
        except BaseException as exc:
            errors.append(exc)
        finally:
            limiters[index].close()

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return stamps


def flat_out(until: float, concurrency: int) -> Body:
    """Acquire as fast as the limiter allows, ``concurrency`` requests at a time."""

    async def body(limiter: Limiter, index: int, stamps: list[float]) -> None:
        async def one() -> None:
            while time.monotonic() < until:
                await limiter.acquire(0)
                stamps.append(time.monotonic())

        await asyncio.gather(*(one() for _ in range(concurrency)))

    return body


@pytest.fixture
def key() -> Any:
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(limiter_name(name), namespace=NAMESPACE))


def test_workers_together_stay_within_the_window_and_use_the_budget(key: str) -> None:
    config = LimitsConfig(requests_per_minute=240, burst_s=1)  # 4/s, capacity 4, chunk 1
    start = time.monotonic()
    stamps = run_workers(key, config, 4, flat_out(start + 8.0, concurrency=4))
    times = [t for worker in stamps for t in worker]
    assert worst_window_excess(times, rate=4.0, capacity=4.0) <= 4.0 * JITTER_S
    steady = [t for t in times if start + 2.0 <= t < start + 8.0]
    assert len(steady) >= 0.8 * 4.0 * 6.0
    assert all(len(worker) >= 3 for worker in stamps)  # nobody starved
    stats = actor_call(key, "stats")
    assert stats["clients"] == 4
    assert len(times) <= stats["granted_requests"]


@pytest.mark.parametrize("requests_per_minute", [None, 1200.0])
def test_retry_after_stops_every_worker(key: str, requests_per_minute: float | None) -> None:
    """Worker 0 is refused with Retry-After once every worker has been granted for a while
    (a loaded host may take seconds to start the limiter's actor and the threads, so the
    signal waits for all four rather than for a fixed time)."""
    config = LimitsConfig(requests_per_minute=requests_per_minute)
    workers = 4
    running: dict[int, float] = {}  # worker -> its first grant
    signalled: list[float] = []

    async def body(limiter: Limiter, index: int, stamps: list[float]) -> None:
        deadline = time.monotonic() + 30.0
        while time.monotonic() < (signalled[0] + 3.5 if signalled else deadline):
            await limiter.acquire(0)
            now = time.monotonic()
            stamps.append(now)
            running.setdefault(index, now)
            if (
                index == 0
                and not signalled
                and len(running) == workers
                and now >= max(running.values()) + 0.5
            ):
                signalled.append(time.monotonic())
                limiter.observe(429, {"retry-after": "2"})
            await asyncio.sleep(0.01)

    stamps = run_workers(key, config, workers, body)
    assert signalled, "the workers never all ran"
    t0 = signalled[0]
    assert not [t for t in stamps[0] if t0 < t < t0 + 1.95]  # the one refused: at once
    for worker in stamps:
        # the rest: within a poll, and the poll's call to the actor (slow on a loaded host)
        assert not [t for t in worker if t0 + PAUSE_POLL_S + 0.7 < t < t0 + 1.95]
        assert len([t for t in worker if t < t0]) >= 2  # they were running before
        assert [t for t in worker if t0 + 1.95 <= t < t0 + 3.0]  # and resume after


def test_share_leaves_the_rest_of_the_limit_free(key: str) -> None:
    config = LimitsConfig(requests_per_minute=240, share=0.5)  # 2/s, capacity 2
    start = time.monotonic()
    stamps = run_workers(key, config, 2, flat_out(start + 5.0, concurrency=2))
    times = [t for worker in stamps for t in worker]
    assert worst_window_excess(times, rate=2.0, capacity=2.0) <= 2.0 * JITTER_S
    assert len([t for t in times if t >= start + 1.5]) >= 0.8 * 2.0 * 3.5

    # the provider says 40 of 100 remain: the 50 kept for others are being used; pause
    limiter = Limiter.connect(key, config, "observer")
    headers = {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "40",
        "x-ratelimit-reset-requests": "1.5s",
    }
    limiter.observe(200, headers)
    assert 1.0 < actor_call(key, "paused_s") <= 1.5
    limiter.close()
