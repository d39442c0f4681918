"""The worker's side of the cluster's rate limit: :class:`Limiter`, used from the engine's
asyncio loop, takes budget from the key's actor in chunks into a local reservoir (spent oldest
first, each chunk lapsing :data:`~inference.limits.state.HOLD_S` after it was asked for),
prefetches the next chunk, follows the fleet's pause and forwards the provider's signals."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from inference.limits.actor import get_or_create_limiter
from inference.limits.bucket import parse_signal, pause_s
from inference.limits.state import HOLD_S, Grant, Report

if TYPE_CHECKING:
    from inference.config import LimitsConfig

logger = logging.getLogger(__name__)

PAUSE_POLL_S = 0.5  # how stale a worker's view of the fleet's pause may get
SIGNAL_MIN_EXTENSION_S = 0.5  # a signal that extends a known pause by less is not sent
SIGNAL_SNAPSHOT_S = 10.0  # provider limits are forwarded this often when nothing pauses
MIN_WAIT_S = 0.005
FAILED_CALL_WAIT_S = 0.5


class _Reservoir:
    """Budget granted to this worker, spent oldest first (the order the actor counts in);
    each chunk lapses :data:`HOLD_S` after it was asked for."""

    def __init__(self) -> None:
        self._chunks: deque[list[float]] = deque()  # [expiry, left]

    def add(self, amount: int, expiry: float) -> None:
        if amount > 0:
            self._chunks.append([expiry, float(amount)])

    def level(self, now: float) -> int:
        while self._chunks and self._chunks[0][0] <= now:
            self._chunks.popleft()
        return int(sum(left for _, left in self._chunks))

    def take(self, n: int, now: float) -> bool:
        if n <= 0:
            return True
        if self.level(now) < n:
            return False
        while n > 0:
            chunk = self._chunks[0]
            used = min(n, int(chunk[1]))
            chunk[1] -= used
            n -= used
            if chunk[1] <= 0:
                self._chunks.popleft()
        return True

    def lapse_all(self) -> int:
        """Give up everything here; how much that was."""
        gone = int(sum(left for _, left in self._chunks))
        self._chunks.clear()
        return gone


class Limiter:
    """A worker's side of the cluster's rate limit, used from the engine's asyncio loop.

    ``acquire`` before each request, ``settle`` with its usage, ``observe`` every response,
    all from that loop; ``close`` once its requests are done. Requests of one loop are served
    first come first served; only the one at the head of the line talks to the actor.
    ``client_id`` names the worker in the actor's account (a unique suffix is added).
    """

    def __init__(
        self,
        actor: Any,
        config: LimitsConfig,
        client_id: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.actor = actor
        # The actor keeps one account per client: two Limiters must never share one.
        self.client_id = f"{client_id or 'client'}-{uuid.uuid4().hex[:8]}"
        self.waited_s = 0.0  # time acquire spent waiting, for metrics
        self._share = config.share
        self._limit_requests = config.requests_per_minute is not None
        self._limit_tokens = config.tokens_per_minute is not None
        self._clock = clock
        self._requests = _Reservoir()
        self._tokens = _Reservoir()
        self._returned_tokens = 0
        self._extra_tokens = 0
        self._refunded_tokens = 0
        self._epoch = ""
        self._chunk_requests = 1
        self._chunk_tokens = 1
        self._paused_until = clock()
        self._pause_checked_at = -math.inf
        self._snapshot_at = -math.inf
        self._lock: asyncio.Lock | None = None
        self._call: asyncio.Future[Grant] | None = None
        self._pause_call: asyncio.Future[None] | None = None

    @classmethod
    def connect(cls, key: str, config: LimitsConfig, client_id: str) -> Limiter:
        """Get or create the key's actor (blocking: call it before the loop starts)."""
        return cls(get_or_create_limiter(key, config), config, client_id)

    @property
    def limited(self) -> bool:
        return self._limit_requests or self._limit_tokens

    async def acquire(self, tokens: int) -> None:
        """Wait until one request and ``tokens`` may be sent, and take them."""
        tokens = max(0, int(tokens)) if self._limit_tokens else 0
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            started = now = self._clock()
            while True:
                self._refresh_pause(now)
                if self._paused_until > now:
                    await asyncio.sleep(self._paused_until - now)
                elif self._take(tokens, now):
                    break
                else:
                    wait = await self._ask(tokens, now)
                    if wait > 0:
                        await asyncio.sleep(max(MIN_WAIT_S, wait))
                now = self._clock()
            self.waited_s += now - started
        self._maybe_prefetch(now)

    def _take(self, tokens: int, now: float) -> bool:
        if not self.limited:
            return True
        have_request = not self._limit_requests or self._requests.level(now) >= 1
        if not have_request or self._tokens.level(now) < tokens:
            return False
        self._requests.take(1 if self._limit_requests else 0, now)
        self._tokens.take(tokens, now)
        return True

    async def _ask(self, tokens: int, now: float) -> float:
        """Ask the actor for what this request is short of; the seconds to wait before looking
        again (0.0: look now). A prefetch in flight is waited for first."""
        if self._call is not None:
            await asyncio.shield(self._call)
            return 0.0
        need_requests = max(0, 1 - self._requests.level(now)) if self._limit_requests else 0
        need_tokens = 0
        if tokens > self._tokens.level(now):  # pool the fragment, ask for the whole request
            self._returned_tokens += self._tokens.lapse_all()
            need_tokens = tokens
        self._call = asyncio.ensure_future(self._call_grant(need_requests, need_tokens, False))
        grant = await asyncio.shield(self._call)
        return 0.0 if grant.granted else grant.wait_s

    def _maybe_prefetch(self, now: float) -> None:
        """Ask for the next chunk while half of the last one is still here."""
        if self._call is not None or not self.limited:
            return
        low = (self._limit_requests and self._requests.level(now) * 2 <= self._chunk_requests) or (
            self._limit_tokens and self._tokens.level(now) * 2 <= self._chunk_tokens
        )
        if low:
            self._call = asyncio.ensure_future(self._call_grant(0, 0, True))

    def _report(self, now: float) -> Report:
        return Report(
            epoch=self._epoch,
            held_requests=self._requests.level(now),
            held_tokens=self._tokens.level(now),
            returned_tokens=self._returned_tokens,
            extra_tokens=self._extra_tokens,
            refunded_tokens=self._refunded_tokens,
        )

    def _sent(self, report: Report) -> None:
        """The actor answered: what the report carried is its now."""
        self._returned_tokens -= report.returned_tokens
        self._extra_tokens -= report.extra_tokens
        self._refunded_tokens -= report.refunded_tokens

    async def _call_grant(self, requests: int, tokens: int, prefetch: bool) -> Grant:
        sent = self._clock()
        report = self._report(sent)
        try:
            ref = self.actor.grant.remote(self.client_id, requests, tokens, report, prefetch)
            grant: Grant = await ref
            self._sent(report)
        except Exception as exc:  # the actor restarting or gone: wait, never send unchecked
            logger.warning("limiter grant failed (%s); waiting", exc)
            grant = Grant(wait_s=FAILED_CALL_WAIT_S, epoch=self._epoch)
        finally:
            self._call = None
        self._absorb(grant, sent)
        return grant

    def _absorb(self, grant: Grant, sent: float) -> None:
        if grant.epoch != self._epoch:  # a new actor or new limits: its count starts at zero
            self._requests.lapse_all()
            self._tokens.lapse_all()
            self._returned_tokens = self._extra_tokens = self._refunded_tokens = 0
            self._epoch = grant.epoch
        self._requests.add(grant.requests, sent + HOLD_S)
        self._tokens.add(grant.tokens, sent + HOLD_S)
        self._chunk_requests = grant.chunk_requests or self._chunk_requests
        self._chunk_tokens = grant.chunk_tokens or self._chunk_tokens
        now = self._clock()
        self._paused_until = max(self._paused_until, now + grant.paused_s)
        self._pause_checked_at = now

    def _refresh_pause(self, now: float) -> None:
        """Keep the fleet's pause at most :data:`PAUSE_POLL_S` stale, without waiting for it."""
        if self._pause_call is None and now - self._pause_checked_at >= PAUSE_POLL_S:
            self._pause_checked_at = now
            self._pause_call = asyncio.ensure_future(self._poll_pause())

    async def _poll_pause(self) -> None:
        try:
            paused, requests, tokens = await self.actor.view.remote()
            self._paused_until = max(self._paused_until, self._clock() + paused)
            # Limits the provider announced hold from now on (never lifted by a poll).
            self._limit_requests = self._limit_requests or requests
            self._limit_tokens = self._limit_tokens or tokens
        except Exception as exc:
            logger.warning("limiter pause poll failed (%s)", exc)
        finally:
            self._pause_call = None

    def settle(self, charged: int, actual: int) -> None:
        """Correct a request's tokens from its usage; sent with the next call to the actor."""
        if not self._limit_tokens:
            return
        if actual > charged:
            self._extra_tokens += actual - charged
        else:
            self._refunded_tokens += charged - actual

    def observe(self, status: int, headers: Mapping[str, str]) -> None:
        """Take one response's rate-limit signals: pause this worker at once and tell the
        actor, but only when that extends the fleet's known pause (64 concurrent 429s are one
        signal), and forward the provider's limits now and then for stats."""
        signal = parse_signal(status, headers)
        now = self._clock()
        pause = pause_s(signal, self._share)
        if pause > 0:
            until = now + pause
            if until - max(self._paused_until, now) < min(SIGNAL_MIN_EXTENSION_S, pause / 2):
                return
            self._paused_until = until
        elif not (signal.has_limits and now - self._snapshot_at >= SIGNAL_SNAPSHOT_S):
            return
        self._snapshot_at = now
        try:
            self.actor.signal.remote(signal)
        except Exception as exc:
            logger.warning("limiter signal failed (%s)", exc)

    def close(self) -> None:
        """Hand back what this worker holds; it takes nothing more afterwards."""
        report = self._report(self._clock())  # what is still here goes back to the bucket
        self._requests.lapse_all()
        self._tokens.lapse_all()
        try:
            self.actor.release.remote(self.client_id, report)
        except Exception as exc:
            logger.warning("limiter release failed (%s)", exc)
