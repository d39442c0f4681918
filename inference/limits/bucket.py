"""The token bucket and the provider's word: :class:`TokenBucket` (a rate refilling a capacity,
with the budget held elsewhere lowering its ceiling), :class:`ProviderSignal` and the parsing of
a response's ``Retry-After`` and ``x-ratelimit-*`` headers (:func:`parse_signal`,
:func:`parse_duration_s`) into how long the fleet should pause (:func:`pause_s`)."""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

DEFAULT_PAUSE_S = 1.0  # a 429 that says nothing about when to come back
MAX_PAUSE_S = 600.0
_EPS = 1e-9


class TokenBucket:
    """``rate_per_s`` refilling a bucket of ``capacity``.

    ``held`` is budget taken earlier and still spendable elsewhere: the bucket refills only to
    ``capacity - held``, so what waits in reservoirs counts as part of the burst. A take larger
    than the capacity passes once the bucket is full and leaves it in debt, so one oversized
    request is never stuck and the long-run rate still holds.
    """

    def __init__(
        self, rate_per_s: float, capacity: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate_per_s <= 0 or capacity <= 0:
            raise ValueError("rate_per_s and capacity must be positive")
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self._clock = clock
        self._level = capacity
        self._at = clock()

    def refill(self, now: float, held: float = 0.0) -> None:
        """Add what the rate gave up to ``now``, to at most ``capacity - held``; never take."""
        if now <= self._at:
            return
        ceiling = self.capacity - held
        if self._level < ceiling:
            self._level = min(ceiling, self._level + (now - self._at) * self.rate_per_s)
        self._at = now

    def level(self, held: float = 0.0) -> float:
        self.refill(self._clock(), held)
        return self._level

    def wait_s(self, n: float, held: float = 0.0) -> float:
        """Seconds until ``n`` could be taken at this rate (0.0: now)."""
        short = min(n, self.capacity) - self.level(held)
        return 0.0 if short <= _EPS else short / self.rate_per_s

    def take(self, n: float, held: float = 0.0) -> float:
        """Take ``n`` and return 0.0 when it can be had now; else take nothing and return the
        seconds to wait."""
        wait = self.wait_s(n, held)
        if wait == 0.0:
            self._level -= n
        return wait

    def take_up_to(self, n: int, held: float = 0.0) -> int:
        """Take as many whole units as are here now, at most ``n``."""
        got = max(0, min(n, math.floor(self.level(held) + _EPS)))
        self._level -= got
        return got

    def give(self, n: float, held: float = 0.0) -> None:
        """Put back unused budget (a refund), to at most ``capacity - held``."""
        self.refill(self._clock(), held)
        self._level = max(self._level, min(self.capacity - held, self._level + n))

    def charge(self, n: float, held: float = 0.0) -> None:
        """Take ``n`` whatever the level, into debt if need be: usage found above its estimate,
        or a grant already checked against :meth:`wait_s`."""
        self.refill(self._clock(), held)
        self._level -= n


# ---- provider signals -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderSignal:
    """What one response said about the provider's limits (None: not said)."""

    status: int
    retry_after_s: float | None = None
    limit_requests: float | None = None
    remaining_requests: float | None = None
    reset_requests_s: float | None = None
    limit_tokens: float | None = None
    remaining_tokens: float | None = None
    reset_tokens_s: float | None = None

    @property
    def has_limits(self) -> bool:
        return self.limit_requests is not None or self.limit_tokens is not None


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration_s(text: str | None) -> float | None:
    """Seconds in a Go-style duration as OpenAI sends it ("1s", "6m0s", "20ms", "1h2m3.5s"),
    or a bare number of seconds; None when it is neither."""
    if text is None:
        return None
    text = text.strip()
    with contextlib.suppress(ValueError):
        return max(0.0, float(text))
    if not text or _DURATION.sub("", text):
        return None
    return sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION.findall(text))


def _number(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def _retry_after_s(headers: Mapping[str, str], now: datetime | None) -> float | None:
    ms = _number(headers.get("retry-after-ms"))
    if ms is not None:
        return max(0.0, ms / 1000.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _number(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def parse_signal(
    status: int, headers: Mapping[str, str], now: datetime | None = None
) -> ProviderSignal:
    """Read ``Retry-After`` (seconds, an HTTP date, or ``retry-after-ms``) and OpenAI's
    ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``; malformed values are ignored."""
    h = {k.lower(): v.strip() for k, v in headers.items()}
    return ProviderSignal(
        status=status,
        retry_after_s=_retry_after_s(h, now),
        limit_requests=_number(h.get("x-ratelimit-limit-requests")),
        remaining_requests=_number(h.get("x-ratelimit-remaining-requests")),
        reset_requests_s=parse_duration_s(h.get("x-ratelimit-reset-requests")),
        limit_tokens=_number(h.get("x-ratelimit-limit-tokens")),
        remaining_tokens=_number(h.get("x-ratelimit-remaining-tokens")),
        reset_tokens_s=parse_duration_s(h.get("x-ratelimit-reset-tokens")),
    )


def pause_s(signal: ProviderSignal, share: float) -> float:
    """How long the fleet should send nothing after this response (0.0: carry on).

    Retry-After is obeyed whatever the status. Remaining budget at or below the part reserved
    for other traffic, ``(1 - share) * limit``, pauses until the provider's reset. A 429 with
    neither pauses :data:`DEFAULT_PAUSE_S`.
    """
    pauses: list[float] = []
    if signal.retry_after_s is not None:
        pauses.append(signal.retry_after_s)
    for limit, remaining, reset in (
        (signal.limit_requests, signal.remaining_requests, signal.reset_requests_s),
        (signal.limit_tokens, signal.remaining_tokens, signal.reset_tokens_s),
    ):
        reserved = (1.0 - share) * limit if limit is not None else 0.0
        if remaining is not None and remaining <= reserved:
            pauses.append(reset if reset is not None else DEFAULT_PAUSE_S)
    if signal.status == 429 and not pauses:
        pauses.append(DEFAULT_PAUSE_S)
    return min(MAX_PAUSE_S, max(pauses, default=0.0))
