"""The rate limiter without Ray: the token bucket, the provider's headers, and the cluster's
budget (``RateLimiterState``) on a fake clock, with simulated workers that hoard, spend late
and report late, checked against the window guarantee ``count <= capacity + rate * T``."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from inference.config import EngineConfig, LimitsConfig
from inference.limits import (
    DEFAULT_PAUSE_S,
    HOLD_S,
    Grant,
    Limiter,
    ProviderSignal,
    RateLimiterState,
    Report,
    TokenBucket,
    limiter_key,
    limiter_name,
    parse_duration_s,
    parse_signal,
    pause_s,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def worst_window_excess(uses: list[tuple[float, float]], rate: float, capacity: float) -> float:
    """max over all windows [t_i, t_j] of sum(amounts) - (capacity + rate * (t_j - t_i)):
    positive means the window guarantee was broken. O(n) with a suffix maximum."""
    uses = sorted(uses)
    prefix = [0.0]
    for _, amount in uses:
        prefix.append(prefix[-1] + amount)
    worst = -float("inf")
    best_end = -float("inf")
    for i in range(len(uses) - 1, -1, -1):
        t = uses[i][0]
        best_end = max(best_end, prefix[i + 1] - rate * t)
        worst = max(worst, best_end - (prefix[i] - rate * t) - capacity)
    return worst


def test_window_check_sees_a_burst() -> None:
    assert worst_window_excess([(0.0, 1)] * 5, rate=1.0, capacity=4) == 1.0
    assert worst_window_excess([(float(t), 1) for t in range(10)], rate=1.0, capacity=1) <= 0


# ---- the bucket --------------------------------------------------------------------------


def test_bucket_starts_full_then_makes_the_caller_wait() -> None:
    clock = Clock()
    bucket = TokenBucket(rate_per_s=2.0, capacity=4.0, clock=clock)
    assert [bucket.take(1) for _ in range(4)] == [0.0] * 4
    assert bucket.take(1) == pytest.approx(0.5)
    assert bucket.level() == pytest.approx(0.0)  # a refused take took nothing
    clock.advance(0.5)
    assert bucket.take(1) == 0.0


def test_bucket_refills_to_capacity_and_no_further() -> None:
    clock = Clock()
    bucket = TokenBucket(rate_per_s=10.0, capacity=5.0, clock=clock)
    bucket.take(5)
    clock.advance(100)
    assert bucket.level() == 5.0


def test_held_budget_lowers_the_ceiling_but_never_takes() -> None:
    clock = Clock()
    bucket = TokenBucket(rate_per_s=10.0, capacity=5.0, clock=clock)
    assert bucket.level(held=3.0) == 5.0  # already above: nothing is taken away
    bucket.take(5)
    clock.advance(10)
    assert bucket.level(held=3.0) == pytest.approx(2.0)


def test_an_oversized_take_passes_when_full_and_leaves_debt() -> None:
    clock = Clock()
    bucket = TokenBucket(rate_per_s=100.0, capacity=100.0, clock=clock)
    bucket.take(1)
    assert bucket.take(250) == pytest.approx(0.01)  # waits for a full bucket, not for 250
    clock.advance(0.01)
    assert bucket.take(250) == 0.0
    assert bucket.level() == pytest.approx(-150.0)
    assert bucket.wait_s(1) == pytest.approx(1.51)


def test_give_and_charge_correct_the_level() -> None:
    clock = Clock()
    bucket = TokenBucket(rate_per_s=1.0, capacity=10.0, clock=clock)
    bucket.take(8)
    bucket.give(5)
    assert bucket.level() == pytest.approx(7.0)
    bucket.give(50)
    assert bucket.level() == pytest.approx(10.0)
    bucket.charge(15)
    assert bucket.level() == pytest.approx(-5.0)
    assert bucket.take_up_to(3) == 0


def test_take_up_to_takes_whole_units() -> None:
    bucket = TokenBucket(rate_per_s=1.0, capacity=3.5, clock=Clock())
    assert bucket.take_up_to(10) == 3
    assert bucket.level() == pytest.approx(0.5)


def test_bucket_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate_per_s=0.0, capacity=1.0)


# ---- the provider's headers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("1.5m", 90.0),
        ("250us", 0.00025),
        ("0.5", 0.5),
        ("7", 7.0),
        ("", None),
        ("soon", None),
        ("5x", None),
        ("1s later", None),
        (None, None),
    ],
)
def test_durations_parse_like_openai_sends_them(text: str | None, seconds: float | None) -> None:
    assert parse_duration_s(text) == (None if seconds is None else pytest.approx(seconds))


def test_signal_reads_openai_headers_in_any_case() -> None:
    signal = parse_signal(
        429,
        {
            "Retry-After": "3",
            "X-RateLimit-Limit-Requests": "500",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-limit-tokens": "30000",
            "x-ratelimit-remaining-tokens": "29000",
            "x-ratelimit-reset-tokens": "2s",
        },
    )
    assert signal == ProviderSignal(
        status=429,
        retry_after_s=3.0,
        limit_requests=500.0,
        remaining_requests=0.0,
        reset_requests_s=signal.reset_requests_s,
        limit_tokens=30000.0,
        remaining_tokens=29000.0,
        reset_tokens_s=2.0,
    )
    assert signal.reset_requests_s == pytest.approx(0.12)


def test_retry_after_as_a_date_and_in_milliseconds() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert parse_signal(503, {"retry-after": date}, now=now).retry_after_s == 7.0
    assert parse_signal(429, {"retry-after-ms": "1500", "retry-after": "9"}).retry_after_s == 1.5


def test_malformed_headers_are_ignored() -> None:
    signal = parse_signal(200, {"retry-after": "whenever", "x-ratelimit-remaining-requests": "?"})
    assert signal == ProviderSignal(status=200)
    assert pause_s(signal, share=1.0) == 0.0


@pytest.mark.parametrize(
    ("status", "headers", "share", "expected"),
    [
        (429, {"retry-after": "2"}, 1.0, 2.0),
        (503, {"retry-after": "4"}, 1.0, 4.0),
        (429, {}, 1.0, DEFAULT_PAUSE_S),
        (429, {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "5s"}, 1.0, 5.0),
        (200, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}, 1.0, 1),
        (200, {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "1s"}, 1.0, 0),
        # share 0.5 of a limit of 100 leaves 50 to others: 40 remaining is theirs already
        (
            200,
            {
                "x-ratelimit-limit-requests": "100",
                "x-ratelimit-remaining-requests": "40",
                "x-ratelimit-reset-requests": "1.5s",
            },
            0.5,
            1.5,
        ),
        (
            200,
            {
                "x-ratelimit-limit-requests": "100",
                "x-ratelimit-remaining-requests": "60",
                "x-ratelimit-reset-requests": "1.5s",
            },
            0.5,
            0.0,
        ),
        (429, {"retry-after": "99999"}, 1.0, 600.0),
    ],
)
def test_pause_follows_the_provider(
    status: int, headers: dict[str, str], share: float, expected: float
) -> None:
    assert pause_s(parse_signal(status, headers), share) == pytest.approx(expected)


# ---- the cluster's budget ---------------------------------------------------------------


def state(clock: Clock, **limits: Any) -> RateLimiterState:
    return RateLimiterState(LimitsConfig(**limits), clock=clock)


def test_chunks_are_a_quarter_of_the_bucket_and_half_a_second_of_rate() -> None:
    clock = Clock()
    slow = state(clock, requests_per_minute=240).stats()["limits"]
    assert (slow["requests_capacity"], slow["chunk_requests"]) == (4.0, 1)
    fast = state(clock, requests_per_minute=60_000, tokens_per_minute=6_000_000, burst_s=4)
    limits = fast.stats()["limits"]
    assert (limits["requests_capacity"], limits["chunk_requests"]) == (4000.0, 500)
    assert (limits["tokens_capacity"], limits["chunk_tokens"]) == (400_000.0, 50_000)
    tiny = state(clock, requests_per_minute=6).stats()["limits"]
    assert (tiny["requests_capacity"], tiny["chunk_requests"]) == (1.0, 1)


def test_a_grant_gives_a_chunk_then_nothing_and_the_wait() -> None:
    clock = Clock()
    limiter = state(clock, requests_per_minute=6000)  # 100/s, capacity 100, chunk 25
    first = limiter.grant("a", 1, 0)
    assert (first.requests, first.tokens, first.chunk_requests) == (25, 0, 25)
    for _ in range(3):
        limiter.grant("a", 1, 0)
    empty = limiter.grant("b", 1, 0)
    assert not empty.granted
    assert empty.wait_s == pytest.approx(0.01)


def test_budget_held_by_workers_counts_against_the_burst() -> None:
    """Workers take chunks, keep them unspent and report nothing; all spend at once just
    before their chunks lapse. Without counting held budget against the capacity the dump would
    be capacity + rate * HOLD_S; with it, never above the capacity."""
    clock = Clock()
    limiter = state(clock, requests_per_minute=600)  # 10/s, capacity 10, chunk 2
    held: dict[str, deque[list[float]]] = {c: deque() for c in "abcd"}
    while clock.now < 1000.0 + HOLD_S - 0.1:
        for client, chunks in held.items():
            asked = clock.now
            grant = limiter.grant(client, 1, 0, prefetch=True)
            if grant.requests:
                chunks.append([asked + HOLD_S, grant.requests])
        clock.advance(0.05)
    dump = sum(n for chunks in held.values() for expiry, n in chunks if expiry > clock.now)
    assert dump == 10
    assert limiter.stats()["held_requests"] == 10.0
    clock.advance(HOLD_S)  # everything lapsed: the bucket refills again
    assert limiter.grant("a", 1, 0).granted


class SimWorker:
    """A worker that follows the protocol: spends oldest chunks first within their hold, says
    what it still holds when it asks for more, pools a token fragment too small for its next
    request; when lazy, it also hoards and idles."""

    def __init__(self, name: str, rng: random.Random) -> None:
        self.name = name
        self.rng = rng
        self.chunks: deque[list[float]] = deque()  # [expiry, requests, tokens]
        self.epoch = ""

    def level(self, now: float) -> tuple[int, int]:
        while self.chunks and self.chunks[0][0] <= now:
            self.chunks.popleft()
        return int(sum(c[1] for c in self.chunks)), int(sum(c[2] for c in self.chunks))

    def spend(self, tokens: int, now: float) -> bool:
        requests_here, tokens_here = self.level(now)
        if requests_here < 1 or tokens_here < tokens:
            return False
        for index, need in ((1, 1), (2, tokens)):
            for chunk in self.chunks:
                used = min(need, int(chunk[index]))
                chunk[index] -= used
                need -= used
        while self.chunks and self.chunks[0][1] <= 0 and self.chunks[0][2] <= 0:
            self.chunks.popleft()
        return True

    def ask(
        self,
        limiter: RateLimiterState,
        tokens: int,
        now: float,
        prefetch: bool,
        hoard: bool = False,
    ) -> Grant:
        requests_here, tokens_here = self.level(now)
        returned = 0
        if not prefetch and tokens_here < tokens:  # pool the fragment, as Limiter does
            for chunk in self.chunks:
                returned += int(chunk[2])
                chunk[2] = 0
            tokens_here = 0
        report = Report(self.epoch, requests_here, tokens_here, returned_tokens=returned)
        if prefetch:  # a chunk of whatever is down to half a chunk (a hoarder: of both)
            wants = (int(requests_here * 2 <= 2 or hoard), int(tokens_here * 2 <= 250 or hoard))
        else:
            wants = (max(0, 1 - requests_here), max(0, tokens - tokens_here))
        grant = limiter.grant(self.name, *wants, report, prefetch)
        self.epoch = grant.epoch
        if grant.granted:
            self.chunks.append([now + HOLD_S, grant.requests, grant.tokens])
        return grant


def simulate(
    seed: int, seconds: float, lazy: bool
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Four workers with random request sizes against 600 rpm / 60,000 tpm; the times of every
    request spent and of its tokens. ``lazy`` workers also idle (their chunks lapse) and hoard
    (take chunks they do not need yet); the others prefetch only when running low, as
    :class:`Limiter` does."""
    rng = random.Random(seed)
    clock = Clock()
    limiter = state(clock, requests_per_minute=600, tokens_per_minute=60_000)
    workers = [SimWorker(name, rng) for name in "abcd"]
    requests: list[tuple[float, float]] = []
    tokens: list[tuple[float, float]] = []
    start = clock.now
    while clock.now < start + seconds:
        for worker in workers:
            mode = rng.random() if lazy else 1.0
            size = rng.choice([10, 100, 400, 900])
            if mode < 0.1:
                continue
            if mode < 0.2:
                worker.ask(limiter, size, clock.now, prefetch=True, hoard=True)
                continue
            if worker.spend(size, clock.now):
                requests.append((clock.now, 1))
                tokens.append((clock.now, size))
                worker.ask(limiter, size, clock.now, prefetch=True)
            else:
                worker.ask(limiter, size, clock.now, prefetch=False)
        clock.advance(rng.choice([0.001, 0.005, 0.02, 0.05]))
    return requests, tokens


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("lazy", [False, True])
def test_random_workers_never_beat_the_window(seed: int, lazy: bool) -> None:
    requests, tokens = simulate(seed, seconds=20.0, lazy=lazy)
    assert worst_window_excess(requests, rate=10.0, capacity=10.0) <= 1e-6
    # one request larger than the token capacity (1,000) may pass alone: 900 < 1,000 here
    assert worst_window_excess(tokens, rate=1000.0, capacity=1000.0) <= 1e-6
    if not lazy:  # and the budget is used, not stranded (tokens bind: ~350 a request)
        assert sum(n for t, n in tokens if t >= 1002.0) >= 0.9 * 1000.0 * 18.0


def test_a_large_request_is_not_starved_by_small_ones() -> None:
    clock = Clock()
    limiter = state(clock, tokens_per_minute=60_000)  # 1,000/s, capacity 1,000, chunk 250
    big_waited = 0.0
    big = limiter.grant("big", 0, 900)
    while not big.granted:
        for small in ("s1", "s2", "s3"):
            limiter.grant(small, 0, 50)
        clock.advance(0.01)
        big_waited += 0.01
        big = limiter.grant("big", 0, 900)
    assert big.tokens >= 900
    assert big_waited < HOLD_S + 0.1  # at worst the small ones' held chunks lapse


def test_pause_refuses_every_client_until_it_ends() -> None:
    clock = Clock()
    limiter = state(clock, requests_per_minute=6000)
    assert limiter.signal(parse_signal(429, {"retry-after": "2"})) == pytest.approx(2.0)
    refused = limiter.grant("other", 1, 0)
    assert (refused.granted, refused.wait_s, refused.paused_s) == (False, 2.0, 2.0)
    clock.advance(2.0)
    assert limiter.grant("other", 1, 0).granted


def test_unlimited_state_still_pauses_and_grants_what_is_asked() -> None:
    clock = Clock()
    limiter = state(clock)
    assert limiter.grant("a", 1, 500).requests == 1
    assert limiter.grant("a", 1, 500).tokens == 500
    limiter.signal(parse_signal(200, {"x-ratelimit-remaining-requests": "0"}))
    assert limiter.paused_s() == pytest.approx(DEFAULT_PAUSE_S)


def test_share_scales_the_rates() -> None:
    limits = state(Clock(), requests_per_minute=240, share=0.5).stats()["limits"]
    assert limits["requests_per_s"] == pytest.approx(2.0)
    assert limits["requests_capacity"] == pytest.approx(2.0)


def test_release_gives_held_budget_back() -> None:
    clock = Clock()
    limiter = state(clock, requests_per_minute=600)  # capacity 10, chunk 2
    grant = limiter.grant("a", 1, 0)
    assert grant.requests == 2
    limiter.release("a", Report(grant.epoch, held_requests=1))  # spent 1, hands back 1
    assert limiter.stats()["held_requests"] == 0.0
    left = 0
    while (chunk := limiter.grant("b", 1, 0, prefetch=True)).granted:
        left += chunk.requests
    assert left == 9


def test_token_corrections_charge_and_refund() -> None:
    clock = Clock()
    limiter = state(clock, tokens_per_minute=60_000)  # 1,000/s, capacity 1,000
    epoch = limiter.grant("a", 0, 1000).epoch
    assert not limiter.grant("a", 0, 1, Report(epoch, extra_tokens=300)).granted
    refused = limiter.grant("a", 0, 1, Report(epoch))
    assert refused.wait_s == pytest.approx(0.301)  # 300 in debt, and 1 more
    assert limiter.grant("a", 0, 150, Report(epoch, refunded_tokens=500)).tokens >= 150
    stats = limiter.stats()
    assert (stats["extra_tokens"], stats["refunded_tokens"]) == (300, 500)


def test_corrections_of_another_epoch_are_ignored_but_holdings_are_not() -> None:
    clock = Clock()
    limiter = state(clock, requests_per_minute=600, tokens_per_minute=60_000)
    grant = limiter.grant("a", 1, 10)
    assert limiter.stats()["held_requests"] == 2.0
    limiter.grant("a", 0, 0, Report("stale", extra_tokens=500), prefetch=True)
    assert limiter.stats()["extra_tokens"] == 0
    assert limiter.stats()["held_requests"] == 0.0  # it said it holds nothing: believed
    assert not limiter.configure(LimitsConfig(requests_per_minute=600, tokens_per_minute=60_000))
    assert limiter.configure(LimitsConfig(requests_per_minute=1200))
    assert limiter.grant("a", 1, 0).epoch != grant.epoch


def test_a_client_forgotten_while_idle_is_counted_right_when_it_returns() -> None:
    clock = Clock()
    limiter = state(clock, requests_per_minute=600)
    epoch = limiter.grant("a", 1, 0).epoch
    clock.advance(301)
    limiter.grant("b", 1, 0)  # a is forgotten
    assert limiter.stats()["clients"] == 1
    assert limiter.grant("a", 1, 0, Report(epoch, held_requests=0)).requests == 2
    assert limiter.stats()["held_requests"] == 4.0  # b's 2 and a's new 2


def test_key_and_name() -> None:
    engine = EngineConfig(kind="openai", base_url="https://api.example.com/v1", model="m1")
    assert limiter_key(engine, LimitsConfig()) == "https://api.example.com/v1 m1"
    assert limiter_key(engine, LimitsConfig(key="team-a")) == "team-a"
    assert limiter_name("team-a") == limiter_name("team-a")
    assert limiter_name("team-a").startswith("limiter:") and len(limiter_name("x")) == 20
    assert limiter_name("team-a") != limiter_name("team-b")


# ---- the worker's side against the real state, in process -----------------------------


class _Done:
    """An awaitable holding a value: what a Ray ObjectRef is to the Limiter."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Iterator[Any]:
        return self.value
        yield


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> _Done:
        return _Done(self.fn(*args))


class InProcessHandle:
    """The actor handle's protocol (``handle.method.remote(...)`` awaitable) over a real
    ``RateLimiterState``, so the worker's logic runs in milliseconds without Ray."""

    def __init__(self, limiter: RateLimiterState) -> None:
        self.state = limiter

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.state, name))


def test_limiter_keeps_two_workers_within_the_window() -> None:
    config = LimitsConfig(requests_per_minute=12_000)  # 200/s, capacity 200, chunk 50
    handle = InProcessHandle(RateLimiterState(config))
    stamps: list[tuple[float, float]] = []

    async def worker(limiter: Limiter, until: float) -> None:
        while time.monotonic() < until:
            await limiter.acquire(0)
            stamps.append((time.monotonic(), 1))
            await asyncio.sleep(0)

    async def main() -> float:
        start = time.monotonic()
        limiters = [Limiter(handle, config, f"w{i}") for i in range(2)]
        await asyncio.gather(*(worker(lim, start + 0.6) for lim in limiters for _ in range(8)))
        return start

    start = asyncio.run(main())
    assert worst_window_excess(stamps, rate=200.0, capacity=200.0) <= 1e-6
    assert len([t for t, _ in stamps if t >= start + 0.1]) >= 0.8 * 200 * 0.5


def test_limiter_honours_a_pause_it_observed_and_tells_the_actor_once() -> None:
    handle = InProcessHandle(RateLimiterState(LimitsConfig()))
    limiter = Limiter(handle, LimitsConfig(), "w0")

    async def main() -> float:
        await limiter.acquire(0)  # unlimited: no wait
        for _ in range(64):
            limiter.observe(429, {"retry-after": "0.3"})
        started = time.monotonic()
        await limiter.acquire(0)
        return time.monotonic() - started

    assert asyncio.run(main()) == pytest.approx(0.3, abs=0.05)
    assert handle.state.stats()["signals"] == 1


def test_with_no_limit_configured_the_providers_own_limits_hold() -> None:
    clock = Clock()
    limiter = state(clock)  # nothing configured
    assert limiter.limited() == (False, False)
    assert limiter.grant("a", 1, 0).granted  # unlimited: granted as asked
    limiter.signal(
        ProviderSignal(200, limit_requests=120, remaining_requests=119, limit_tokens=6000)
    )
    assert limiter.limited() == (True, True)
    stats = limiter.stats()
    assert stats["learned"] and stats["limits"]["requests_per_minute"] == 120
    assert stats["limits"]["requests_capacity"] == 2.0  # 2/s, a 1 s burst
    assert not limiter.configure(LimitsConfig())  # a worker connecting unlimited: kept
    assert limiter.limited() == (True, True)
    granted = 0
    for _ in range(10):  # the bucket holds 2 requests, no more
        grant = limiter.grant("a", 1, 0)
        granted += grant.requests
        if not grant.granted:
            break
    assert granted == 2
    configured = state(clock, requests_per_minute=30)
    configured.signal(ProviderSignal(200, limit_requests=120))
    assert configured.stats()["limits"]["requests_per_minute"] == 30  # the config wins
    assert configured.stats()["limits"]["tokens_per_minute"] is None


def test_a_worker_configured_unlimited_learns_the_providers_limit_from_the_actor() -> None:
    handle = InProcessHandle(RateLimiterState(LimitsConfig()))
    limiter = Limiter(handle, LimitsConfig(), "w0")

    async def main() -> list[float]:
        await limiter.acquire(0)
        limiter.observe(200, {"x-ratelimit-limit-requests": "600"})  # 10/s, capacity 10
        await asyncio.sleep(0.6)  # past a pause poll
        await limiter.acquire(0)
        started, stamps = time.monotonic(), []
        while time.monotonic() - started < 1.0:
            await limiter.acquire(0)
            stamps.append(time.monotonic())
        return stamps

    stamps = asyncio.run(main())
    assert limiter.limited
    assert 10 <= len(stamps) <= 10 + 10 + 1  # a full bucket and a second of the rate
