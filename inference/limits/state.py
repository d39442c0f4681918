"""The cluster's budget of one key, pure and clocked from outside: :class:`Report` (a worker's
account) and :class:`Grant` (the answer), the per-kind ledger of what each client holds, and
:class:`RateLimiterState`, the logic :class:`~inference.limits.actor.RateLimiterActor` serves,
so the window guarantee is tested without Ray."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inference.limits.bucket import _EPS, ProviderSignal, TokenBucket, pause_s

if TYPE_CHECKING:
    from inference.config import LimitsConfig

logger = logging.getLogger(__name__)

HOLD_S = 2.0  # granted budget lapses this long after it was asked for
CHUNK_OF_CAPACITY = 0.25  # a chunk is at most this share of the bucket...
CHUNK_OF_RATE_S = 0.5  # ...and at most this many seconds of the rate
RESERVATION_GRACE_S = 0.5  # a refused client keeps its turn this long past its wait
TURN_POLL_S = 0.02  # how often others look again while someone else has the turn


@dataclass(frozen=True, slots=True)
class Report:
    """A worker's account, sent with each call: the budget it still holds (the actor counts
    everything else it granted as spent or lapsed: a state, not a running total, so an actor
    that forgot the worker or a call that was lost cannot make it count wrong), and, since its
    last answered call, the tokens it returned unspent (a fragment too small for its next
    request, pooled again rather than stranded) and the corrections from usage."""

    epoch: str
    held_requests: int = 0
    held_tokens: int = 0
    returned_tokens: int = 0
    extra_tokens: int = 0
    refunded_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Grant:
    """The actor's answer: budget granted (0 of a kind that is unlimited or not available), or
    when nothing was, ``wait_s`` before asking again. ``paused_s`` is the fleet's pause."""

    requests: int = 0
    tokens: int = 0
    wait_s: float = 0.0
    paused_s: float = 0.0
    chunk_requests: int = 0
    chunk_tokens: int = 0
    epoch: str = ""

    @property
    def granted(self) -> bool:
        return self.requests > 0 or self.tokens > 0


@dataclass(slots=True)
class _Held:
    expiry: float
    start: int  # the client's cumulative position: grants are spent in order
    end: int


class _Ledger:
    """One kind of budget (requests or tokens) for all clients: the bucket and what is held."""

    def __init__(self, rate_per_s: float, capacity: float, clock: Callable[[], float]) -> None:
        self.bucket = TokenBucket(rate_per_s, capacity, clock)
        self.chunk = max(
            1, math.floor(min(capacity * CHUNK_OF_CAPACITY, rate_per_s * CHUNK_OF_RATE_S))
        )
        self.granted = 0
        self._held: dict[str, deque[_Held]] = {}
        self._issued: dict[str, int] = {}
        self._settled: dict[str, int] = {}

    def held(self) -> float:
        return float(
            sum(
                max(0, g.end - max(g.start, self._settled.get(client, 0)))
                for client, grants in self._held.items()
                for g in grants
            )
        )

    def advance(self, now: float) -> None:
        """Refill up to ``now`` lapsing held budget at its own expiry time, so the ceiling
        ``capacity - held`` is exact at every instant, not only at calls."""
        while True:
            firsts = [(q[0].expiry, client) for client, q in self._held.items() if q]
            if not firsts or min(firsts)[0] > now:
                break
            expiry, client = min(firsts)
            self.bucket.refill(expiry, self.held())
            self._held[client].popleft()
        self.bucket.refill(now, self.held())

    def report(self, client: str, still_held: int) -> None:
        """The client holds ``still_held`` of what it was granted: its newest units, as it
        spends and lapses oldest first; everything before them is settled."""
        settled = self._issued.get(client, 0) - max(0, still_held)
        self._settled[client] = max(self._settled.get(client, 0), settled)
        grants = self._held.get(client)
        while grants and grants[0].end <= self._settled[client]:
            grants.popleft()

    def wait_s(self, n: int) -> float:
        return self.bucket.wait_s(n, self.held()) if n > 0 else 0.0

    def grant(self, client: str, n: int, now: float) -> None:
        if n <= 0:
            return
        start = self._issued.get(client, 0)
        self.bucket.charge(n, self.held())
        self._issued[client] = start + n
        self._held.setdefault(client, deque()).append(_Held(now + HOLD_S, start, start + n))
        self.granted += n

    def chunk_now(self) -> int:
        return max(0, min(self.chunk, math.floor(self.bucket.level(self.held()) + _EPS)))

    def release(self, client: str) -> None:
        """The client will spend nothing more: what it held goes back to the bucket."""
        returned = sum(
            max(0, g.end - max(g.start, self._settled.get(client, 0)))
            for g in self._held.pop(client, ())
        )
        self.bucket.give(returned, self.held())

    def forget(self, client: str) -> None:
        for table in (self._held, self._issued, self._settled):
            table.pop(client, None)


def _rates(config: LimitsConfig) -> tuple[float | None, float | None]:
    per_s = [
        None if per_min is None else per_min / 60.0 * config.share
        for per_min in (config.requests_per_minute, config.tokens_per_minute)
    ]
    return per_s[0], per_s[1]


class RateLimiterState:
    """The budget of one key, for the whole cluster: what :class:`RateLimiterActor` serves.

    Pure and clocked from outside, so the window guarantee is tested without Ray.
    """

    def __init__(self, config: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._paused_until = clock()
        self._signals = 0
        self._provider: dict[str, float | None] = {}
        self._reserved: tuple[str, float, float] | None = None  # client, ready_at, until
        self._asked = config  # what the workers configured
        self.config = config  # what holds: that, and the provider's limits where it sets none
        self._build()

    def configure(self, config: LimitsConfig) -> bool:
        """Adopt ``config`` (the latest connecting worker's); True when that changed the limits.
        A change starts a new epoch: workers drop their reservoirs and counts."""
        if config == self._asked:
            return False
        self._asked = config
        self.config = self._effective()
        self._build()
        return True

    def _effective(self) -> LimitsConfig:
        """The configured limits, with the provider's own (``x-ratelimit-limit-*``, per
        minute) for a kind the config leaves unlimited: so a fleet with no limit set is paced
        by the provider's rate instead of bursting into 429s after every pause."""
        asked, learned = self._asked, {}
        limit_requests = self._provider.get("limit_requests")
        limit_tokens = self._provider.get("limit_tokens")
        if asked.requests_per_minute is None and limit_requests:
            learned["requests_per_minute"] = float(limit_requests)
        if asked.tokens_per_minute is None and limit_tokens:
            learned["tokens_per_minute"] = float(limit_tokens)
        return asked.model_copy(update=learned) if learned else asked

    def limited(self) -> tuple[bool, bool]:
        """Whether requests and tokens are limited now (configured or learned)."""
        return (
            self.config.requests_per_minute is not None,
            self.config.tokens_per_minute is not None,
        )

    def view(self) -> tuple[float, bool, bool]:
        """What a worker polls: the fleet's pause, and whether requests and tokens are limited
        (a worker configured with no limit learns here that the provider's hold)."""
        return (self.paused_s(), *self.limited())

    def _build(self) -> None:
        config = self.config
        self.epoch = uuid.uuid4().hex[:8]
        rps, tps = _rates(config)
        self._requests = (
            None if rps is None else _Ledger(rps, max(1.0, rps * config.burst_s), self._clock)
        )
        self._tokens = (
            None if tps is None else _Ledger(tps, max(1.0, tps * config.burst_s), self._clock)
        )
        self._seen: dict[str, float] = {}
        self._extra_tokens = 0
        self._refunded_tokens = 0

    def _ledgers(self) -> list[_Ledger]:
        return [ledger for ledger in (self._requests, self._tokens) if ledger is not None]

    def _apply(self, client: str, report: Report | None, now: float) -> None:
        self._seen[client] = now
        if report is None:
            return
        if self._requests is not None:
            self._requests.report(client, report.held_requests)
        if self._tokens is None:
            return
        self._tokens.report(client, report.held_tokens)
        if report.epoch != self.epoch:  # corrections of other limits, or of an actor gone
            return
        bucket, held = self._tokens.bucket, self._tokens.held()
        # Returned units have just left ``held``: the bucket takes them back, and
        # ``level + held`` cannot pass the capacity by it.
        bucket.give(max(0, report.returned_tokens), held)
        bucket.charge(max(0, report.extra_tokens), held)
        bucket.give(max(0, report.refunded_tokens), held)
        self._extra_tokens += max(0, report.extra_tokens)
        self._refunded_tokens += max(0, report.refunded_tokens)

    def _answer(self, requests: int = 0, tokens: int = 0, wait_s: float = 0.0) -> Grant:
        return Grant(
            requests=requests,
            tokens=tokens,
            wait_s=wait_s,
            paused_s=self.paused_s(),
            chunk_requests=self._requests.chunk if self._requests else 0,
            chunk_tokens=self._tokens.chunk if self._tokens else 0,
            epoch=self.epoch,
        )

    def grant(
        self,
        client_id: str,
        requests: int,
        tokens: int,
        report: Report | None = None,
        prefetch: bool = False,
    ) -> Grant:
        """Grant at least ``requests`` and ``tokens`` (what the client is short of; 0 for a
        kind it has enough of) and up to a chunk of each kind it is short of, or nothing and how
        long to wait. A ``prefetch`` asks for a chunk of each kind given as more than 0, takes
        whatever part of it is here and never queues. A client refused for what it needs holds
        the next turn (others wait) until it is served, so a large request is not starved by
        small ones."""
        now = self._clock()
        for ledger in self._ledgers():
            ledger.advance(now)
        self._apply(client_id, report, now)
        self._forget_idle(now)
        if self._paused_until > now:
            return self._answer(wait_s=self._paused_until - now)
        pairs = [(ledger, need) for ledger, need in self._needs(requests, tokens) if need > 0]
        turn = self._reserved
        if turn is not None and turn[0] != client_id and turn[2] > now:
            return self._answer(wait_s=max(TURN_POLL_S, turn[1] - now))
        if prefetch:
            amounts = [ledger.chunk_now() for ledger, _ in pairs]
            if pairs and not any(amounts):
                return self._answer(wait_s=max(ledger.wait_s(1) for ledger, _ in pairs))
        else:
            wait = max((ledger.wait_s(need) for ledger, need in pairs), default=0.0)
            if wait > 0.0:
                self._reserved = (client_id, now + wait, now + wait + RESERVATION_GRACE_S)
                return self._answer(wait_s=wait)
            amounts = [max(need, ledger.chunk_now()) for ledger, need in pairs]
            if turn is not None and turn[0] == client_id:
                self._reserved = None
        for (ledger, _), amount in zip(pairs, amounts, strict=True):
            ledger.grant(client_id, amount, now)
        got = {id(ledger): amount for (ledger, _), amount in zip(pairs, amounts, strict=True)}
        # A kind this actor does not limit is granted as asked (a worker whose config limits it
        # is out of date, never stuck).
        return self._answer(
            requests=got.get(id(self._requests), 0 if self._requests or prefetch else requests),
            tokens=got.get(id(self._tokens), 0 if self._tokens or prefetch else tokens),
        )

    def _needs(self, requests: int, tokens: int) -> list[tuple[_Ledger, int]]:
        pairs: list[tuple[_Ledger, int]] = []
        if self._requests is not None:
            pairs.append((self._requests, max(0, requests)))
        if self._tokens is not None:
            pairs.append((self._tokens, max(0, tokens)))
        return pairs

    def release(self, client_id: str, report: Report | None = None) -> None:
        """A client that closes hands back what it holds (it promises to spend none of it)."""
        now = self._clock()
        for ledger in self._ledgers():
            ledger.advance(now)
        self._apply(client_id, report, now)
        for ledger in self._ledgers():
            ledger.release(client_id)
        if self._reserved is not None and self._reserved[0] == client_id:
            self._reserved = None

    def _forget_idle(self, now: float, idle_s: float = 300.0) -> None:
        for client, seen in list(self._seen.items()):
            if now - seen > idle_s:
                del self._seen[client]
                for ledger in self._ledgers():
                    ledger.forget(client)

    def signal(self, signal: ProviderSignal) -> float:
        """Take the provider's word: pause every grant for as long as it says. Returns the
        fleet's pause, in seconds."""
        now = self._clock()
        self._signals += 1
        if signal.has_limits:
            self._provider = {
                "limit_requests": signal.limit_requests,
                "remaining_requests": signal.remaining_requests,
                "limit_tokens": signal.limit_tokens,
                "remaining_tokens": signal.remaining_tokens,
            }
            effective = self._effective()
            if effective != self.config:
                logger.info(
                    "limiter: the provider's limits hold where none is configured: %s rpm, %s tpm",
                    effective.requests_per_minute,
                    effective.tokens_per_minute,
                )
                self.config = effective
                self._build()
        pause = pause_s(signal, self.config.share)
        if pause > 0 and now + pause > self._paused_until:
            self._paused_until = now + pause
            logger.info("limiter paused %.2fs (provider status %d)", pause, signal.status)
        return self.paused_s()

    def paused_s(self) -> float:
        return max(0.0, self._paused_until - self._clock())

    def stats(self) -> dict[str, Any]:
        rps, tps = _rates(self.config)
        paused = self.paused_s()
        return {
            "epoch": self.epoch,
            "granted_requests": self._requests.granted if self._requests else 0,
            "granted_tokens": self._tokens.granted if self._tokens else 0,
            "held_requests": self._requests.held() if self._requests else 0.0,
            "held_tokens": self._tokens.held() if self._tokens else 0.0,
            "extra_tokens": self._extra_tokens,
            "refunded_tokens": self._refunded_tokens,
            "paused_s": paused,
            "paused_until": time.time() + paused if paused > 0 else None,
            "signals": self._signals,
            "clients": len(self._seen),
            "learned": self.config != self._asked,
            "limits": {
                "requests_per_minute": self.config.requests_per_minute,
                "tokens_per_minute": self.config.tokens_per_minute,
                "share": self.config.share,
                "burst_s": self.config.burst_s,
                "requests_per_s": rps,
                "tokens_per_s": tps,
                "requests_capacity": self._requests.bucket.capacity if self._requests else None,
                "tokens_capacity": self._tokens.bucket.capacity if self._tokens else None,
                "chunk_requests": self._requests.chunk if self._requests else None,
                "chunk_tokens": self._tokens.chunk if self._tokens else None,
            },
            "provider": dict(self._provider),
        }
