"""What the routes share: the config, the two actor handles, and a few short-lived caches.

The server keeps no queue state of its own. It caches, for a second, the Controller's snapshot
(backlog and drain rate, for 429s) and which jobs take native items, so the enqueue path costs one
actor call: the WorkQueue's ``enqueue``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from inference.config import Config
from inference.errors import QueueError, StorageError

from .http_errors import ApiError

if TYPE_CHECKING:
    from .coalesce import Coalescer

logger = logging.getLogger(__name__)

SNAPSHOT_TTL_S = 1.0
JOB_TTL_S = 2.0
CALL_TIMEOUT_S = 60.0
COUNTER_REPORT_S = 2.0
_UNAVAILABLE: tuple[type[Exception], ...] = (RayActorError, GetTimeoutError, TimeoutError)
if hasattr(ray.exceptions, "ActorUnavailableError"):
    _UNAVAILABLE += (ray.exceptions.ActorUnavailableError,)


async def call(ref: Awaitable[Any], timeout_s: float = CALL_TIMEOUT_S) -> Any:
    """Await an actor call; translate what comes back into :class:`ApiError`: the Controller's
    refusals as they are, queue refusals as 409, a storage failure or an actor that is down or
    restarting as 503 with ``Retry-After``."""
    try:
        return await asyncio.wait_for(ref, timeout_s)
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, ApiError):
            raise cause from None
        if isinstance(cause, StorageError):
            raise _unavailable(f"the queue could not store the items: {cause}") from None
        if isinstance(cause, QueueError):
            raise ApiError(409, str(cause), None, "conflict") from None
        raise
    except _UNAVAILABLE as exc:
        raise _unavailable(f"a cluster service is unavailable ({type(exc).__name__})") from None


def _unavailable(message: str) -> ApiError:
    return ApiError(503, message + "; retry shortly", None, "unavailable", {"Retry-After": "2"})


@dataclass
class ServerState:
    config: Config
    queue: Any
    controller: Any
    coalescer: Coalescer
    snapshot: dict[str, Any] = field(default_factory=dict)
    snapshot_at: float = 0.0
    accepted_since_snapshot: int = 0
    jobs: dict[str, tuple[float, dict[str, Any] | None]] = field(default_factory=dict)
    specs: dict[str, Any] = field(default_factory=dict)
    shards: dict[str, dict[int, str]] = field(default_factory=dict)
    requests: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    started_at: float = field(default_factory=time.time)
    woke_at: float = 0.0
    # This process among the server's processes (`--workers`), for the Controller's sums.
    server_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    reported: dict[tuple[str, ...], float] = field(default_factory=dict)

    def counters(self) -> dict[tuple[str, ...], float]:
        """This process's request counters: ``("enqueue_requests",)``,
        ``("enqueue_queue_calls",)`` and ``("http", method, route, status)``."""
        out: dict[tuple[str, ...], float] = {
            ("enqueue_requests",): float(self.coalescer.requests),
            ("enqueue_queue_calls",): float(self.coalescer.calls),
        }
        for (method, route, status), n in self.requests.items():
            out[("http", method, route, str(status))] = float(n)
        return out

    async def counter_totals(self) -> dict[tuple[str, ...], float]:
        """Every server process's counters summed (through the Controller), this one's fresh."""
        counters = self.counters()
        totals: dict[tuple[str, ...], float] = await call(
            self.controller.server_counters.remote(self.server_id, counters), 10
        )
        self.reported = counters
        return totals

    async def report_counters(self, every_s: float = COUNTER_REPORT_S) -> None:
        """Report this process's counters while it runs, when they changed, so that a scrape
        reaching another process counts this one's requests too."""
        while True:
            await asyncio.sleep(every_s)
            if self.counters() != self.reported:
                try:
                    await self.counter_totals()
                except Exception as exc:  # the Controller restarting: report next time
                    logger.debug("counter report failed: %s", exc)

    def wake_controller(self, job: dict[str, Any]) -> None:
        """New work for a job the Controller thinks idle (queued, or completed before): let
        its loop run now, so a pool without workers starts them without waiting for the next
        tick. Fire and forget, at most 4 a second."""
        now = time.monotonic()
        if job["status"] in ("queued", "completed") and now - self.woke_at > 0.25:
            self.woke_at = now
            self.controller.wake.remote()

    async def refresh(self) -> dict[str, Any]:
        """The Controller's snapshot, at most ``SNAPSHOT_TTL_S`` old."""
        now = time.monotonic()
        if now - self.snapshot_at > SNAPSHOT_TTL_S:
            self.snapshot = await call(self.controller.snapshot.remote(), 10)
            self.snapshot_at = now
            self.accepted_since_snapshot = 0
        return self.snapshot

    async def job_info(self, job_id: str) -> dict[str, Any]:
        """Kind, status and end reason of a Controller job (cached briefly); 404 when unknown."""
        now = time.monotonic()
        cached = self.jobs.get(job_id)
        if cached is None or now - cached[0] > JOB_TTL_S:
            info = await call(self.controller.job_brief.remote(job_id))
            if len(self.jobs) > 10_000:
                self.jobs.clear()
            cached = self.jobs[job_id] = (now, info)
        if cached[1] is None:
            raise ApiError(404, f"No job found with id {job_id!r}.", "job_id", "not_found")
        return cached[1]

    async def native_job(self, job_id: str) -> dict[str, Any]:
        """A job that takes native items now; 404 when unknown, 409 for a batch or an ended one."""
        info = await self.job_info(job_id)
        if info["kind"] != "native":
            raise ApiError(
                409, f"{job_id} is an OpenAI batch; it takes no more items", "job_id", "batch_job"
            )
        if info["status"] in ("cancelling", "cancelled", "expiring", "expired"):
            raise ApiError(
                409, f"job {job_id} is {info['status']}; it takes no more items", "job_id", "ended"
            )
        return info

    async def check_backlog(self, adding: int) -> None:
        """429 with Retry-After when the pending backlog is over ``api.max_backlog_items``."""
        snapshot = await self.refresh()
        backlog = int(snapshot.get("backlog", 0)) + self.accepted_since_snapshot
        cap = self.config.api.max_backlog_items
        if backlog + adding > cap:
            rate = float(snapshot.get("items_per_s") or 0.0)
            over = backlog + adding - cap
            retry_s = int(min(300, max(1, over / rate))) if rate > 0 else 30
            raise ApiError(
                429,
                f"The backlog holds {backlog} pending items (cap {cap}); retry later.",
                None,
                "backlog_full",
                {"Retry-After": str(retry_s)},
            )

    async def job_spec(self, job_id: str) -> Any:
        spec = self.specs.get(job_id)
        if spec is None:
            spec = self.specs[job_id] = await call(self.queue.job_spec.remote(job_id))
        return spec

    async def shard_path(self, job_id: str, n: int) -> str | None:
        """The file of committed shard ``n`` of a job (the queue's record, cached)."""
        known = self.shards.setdefault(job_id, {})
        if n not in known:
            for shard in await call(self.queue.committed_shards.remote(job_id)):
                known[int(shard["n"])] = str(shard["path"])
        return known.get(n)
