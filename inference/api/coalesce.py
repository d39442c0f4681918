"""Group commit for enqueues: the requests for one job that arrive while a ``WorkQueue.enqueue``
call for it is in flight travel together in the next call.

Nothing waits on a timer: an idle job's request is sent at once; under load, requests share one
actor call and one SQLite transaction (one fsync) instead of paying for one each. Every request
still gets its own answer: statuses per item in its own order, and its own refusal. The queue's
enqueue is all or nothing, so when a shared call is refused (one request's ``custom_id`` holds
another payload, say) each request of it is sent again alone and judged alone.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from inference.queue import NewItem, Packed

from .http_errors import ApiError
from .state import call

MAX_ITEMS_PER_CALL = 2000


@dataclass
class _Request:
    items: list[NewItem]
    done: asyncio.Future[list[str]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def item_statuses(items: list[NewItem], duplicates: list[str]) -> list[str]:
    """``accepted`` or ``duplicate`` per item, in order. The queue lists an id once per repeat
    within the call, plus once more when the job held it before the call; the first
    occurrence of a new id is the accepted one."""
    wanted = Counter(it.item_id for it in items)
    existed = {i for i, n in Counter(duplicates).items() if n >= wanted[i]}
    seen: set[str] = set()
    out = []
    for it in items:
        out.append("duplicate" if it.item_id in existed or it.item_id in seen else "accepted")
        seen.add(it.item_id)
    return out


class Coalescer:
    """Per job, at most one enqueue call in flight; what arrives meanwhile goes in the next."""

    def __init__(self, queue: Any, max_items: int = MAX_ITEMS_PER_CALL) -> None:
        self.queue = queue
        self.max_items = max_items
        self._waiting: dict[str, list[_Request]] = {}
        self._busy: set[str] = set()
        self.calls = 0  # WorkQueue.enqueue calls made
        self.requests = 0  # enqueue requests served

    async def enqueue(self, job_id: str, items: list[NewItem]) -> list[str]:
        """Durably enqueue; returns the status of each item. Raises ApiError as the queue
        refuses (409), or as it is unavailable (503)."""
        request = _Request(items)
        self.requests += 1
        self._waiting.setdefault(job_id, []).append(request)
        if job_id not in self._busy:
            self._busy.add(job_id)
            asyncio.get_running_loop().create_task(self._drain(job_id))
        return await request.done

    async def _drain(self, job_id: str) -> None:
        try:
            while self._waiting.get(job_id):
                waiting = self._waiting[job_id]
                group: list[_Request] = []
                size = 0
                while waiting and (not group or size + len(waiting[0].items) <= self.max_items):
                    size += len(waiting[0].items)
                    group.append(waiting.pop(0))
                await self._send(job_id, group)
        finally:
            self._busy.discard(job_id)
            if not self._waiting.get(job_id):
                self._waiting.pop(job_id, None)

    async def _send(self, job_id: str, group: list[_Request]) -> None:
        # Packed: one pickled blob; Ray pickles a plain list of records one by one (~6 us each)
        items = Packed(it for request in group for it in request.items)
        self.calls += 1
        try:
            result = await call(self.queue.enqueue.remote(job_id, items))
        except ApiError as exc:
            if len(group) > 1 and exc.status == 409:
                for request in group:  # judged alone: only the faulty request is refused
                    await self._send(job_id, [request])
                return
            for request in group:
                if not request.done.done():
                    request.done.set_exception(
                        ApiError(exc.status, exc.message, exc.param, exc.code, exc.headers)
                    )
            return
        except BaseException as exc:  # cancelled, or a bug: nobody may wait forever
            for request in group:
                if not request.done.done():
                    request.done.set_exception(exc)
            raise
        statuses = item_statuses(items, list(result.duplicates))
        start = 0
        for request in group:
            end = start + len(request.items)
            if not request.done.done():
                request.done.set_result(statuses[start:end])
            start = end
