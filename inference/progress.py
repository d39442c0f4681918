"""Progress of a job from samples of queue stats: rates over a recent window, ETA and cost.

Pure functions and one small accumulator, so the CLI, the Controller and the dashboard compute
the same figures the same way, and tests can feed synthetic histories.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # seconds (monotonic or wall, but one clock per tracker)
    done: int
    dead: int
    tokens: int  # prompt + completion tokens of completed items


@dataclass(frozen=True, slots=True)
class Progress:
    total: int
    done: int
    dead: int
    pending: int
    leased: int
    fraction: float
    items_per_s: float
    tokens_per_s: float
    eta_s: float | None
    busy_s: float
    cost: float
    cost_to_finish: float | None
    state: str
    next_run_at: float | None = None  # Unix time a job outside its run windows next leases
    models: dict[str, dict[str, Any]] | None = None  # a job of several models: each one's share

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


# pool -> (price of a million prompt tokens, of a million completion tokens), discounts applied:
# what a remote engine's provider charges, beside the workers' hours.
TokenPrices = Mapping[str, tuple[float, float]]


def _tokens_cost(st: Mapping[str, Any], prices: tuple[float, float]) -> float:
    prompt_price, completion_price = prices
    prompt, completion = int(st.get("prompt_tokens", 0)), int(st.get("completion_tokens", 0))
    return (prompt * prompt_price + completion * completion_price) / 1e6


def _to_finish(st: Mapping[str, Any], cost: float) -> float | None:
    """The cost so far per completed item times the items left (None before the first)."""
    done = int(st.get("done", 0))
    if not done:
        return None
    return cost / done * (int(st.get("pending", 0)) + int(st.get("leased", 0)))


def job_cost(
    stats: Mapping[str, Any], cost_per_gpu_hour: float, token_prices: TokenPrices | None = None
) -> tuple[float, float | None]:
    """Cost so far and projected cost to finish: the workers' busy hours at their price, plus
    what remote engines' providers charge for the tokens of each pool (``token_prices``);
    projected as cost per completed item times the items left (None before the first)."""
    busy_s = float(stats.get("busy_s", 0.0))
    cost = busy_s / 3600.0 * cost_per_gpu_hour
    to_finish = _to_finish(stats, cost)
    pools = stats.get("pools") or {}
    for pool, prices in (token_prices or {}).items():
        st = pools.get(pool) or (stats if not pools else None)
        if not st:
            continue
        tokens = _tokens_cost(st, prices)
        cost += tokens
        more = _to_finish(st, tokens)
        if more is not None and to_finish is not None:
            to_finish += more
    return cost, to_finish


def rate(samples: list[Sample], field: str, window_s: float) -> float:
    """Change of ``field`` per second over the last ``window_s`` seconds of samples."""
    if len(samples) < 2:
        return 0.0
    last = samples[-1]
    first = next((s for s in samples if last.t - s.t <= window_s), samples[0])
    if first is last:
        first = samples[-2]
    dt = last.t - first.t
    if dt <= 0:
        return 0.0
    return max(0.0, (getattr(last, field) - getattr(first, field)) / dt)


def eta_s(
    remaining_items: int,
    remaining_tokens: float,
    items_per_s: float,
    tokens_per_s: float,
) -> float | None:
    """Seconds to finish, from tokens when token throughput is known (item sizes vary a lot),
    else from items; None while nothing is moving."""
    if remaining_items <= 0:
        return 0.0
    if tokens_per_s > 0 and remaining_tokens > 0:
        return remaining_tokens / tokens_per_s
    if items_per_s > 0:
        return remaining_items / items_per_s
    return None


class Tracker:
    """Keeps recent samples of one job and turns queue stats into :class:`Progress`."""

    def __init__(
        self,
        window_s: float = 30.0,
        cost_per_hour: float = 0.0,
        models: dict[str, tuple[str, float]] | None = None,
        token_prices: TokenPrices | None = None,
    ) -> None:
        """``models``: for a job of several models, pool -> (served name, cost per hour);
        ``token_prices``: of its pools on remote engines, what their provider charges."""
        self.window_s = window_s
        self.cost_per_hour = cost_per_hour
        self.models = models
        self.token_prices = token_prices
        self.samples: deque[Sample] = deque(maxlen=4096)

    def update(self, t: float, stats: dict[str, Any], finalizing: bool = False) -> Progress:
        tokens = int(stats.get("prompt_tokens", 0)) + int(stats.get("completion_tokens", 0))
        self.samples.append(Sample(t, stats["done"], stats["dead"], tokens))
        while self.samples and t - self.samples[0].t > self.window_s * 4:
            self.samples.popleft()
        recent = list(self.samples)
        items_per_s = rate(recent, "done", self.window_s) + rate(recent, "dead", self.window_s)
        tokens_per_s = rate(recent, "tokens", self.window_s)
        remaining = stats["pending"] + stats["leased"]
        done_items = max(1, stats["done"])
        tokens_per_item = tokens / done_items if stats["done"] else 0.0
        remaining_tokens = remaining * tokens_per_item
        eta = eta_s(remaining, remaining_tokens, items_per_s, tokens_per_s)
        busy_s = float(stats.get("busy_s", 0.0))
        cost, cost_to_finish = job_cost(stats, self.cost_per_hour, self.token_prices)
        models = None
        if self.models is not None:
            models = model_shares(stats.get("pools", {}), self.models, self.token_prices)
            cost = sum(m["cost"] for m in models.values())
            cost_to_finish = sum(m["cost_to_finish"] or 0.0 for m in models.values())
        total = stats["total"]
        settled = stats["done"] + stats["dead"]
        if remaining == 0 and not finalizing:
            state = "completed"
        elif remaining == 0:
            state = "finalizing"
        else:
            state = stats.get("state", "active")
        next_run = float(stats.get("next_run_at") or 0.0)
        waiting = remaining > 0 and state == "active" and next_run > time.time()
        if waiting:
            state = "scheduled"
        fraction = settled / total if total else 1.0
        if state == "finalizing":
            fraction = min(fraction, 0.999)
        return Progress(
            total=total,
            done=stats["done"],
            dead=stats["dead"],
            pending=stats["pending"],
            leased=stats["leased"],
            fraction=fraction,
            items_per_s=items_per_s,
            tokens_per_s=tokens_per_s,
            eta_s=eta,
            busy_s=busy_s,
            cost=cost,
            cost_to_finish=cost_to_finish,
            state=state,
            next_run_at=next_run if waiting else None,
            models=models,
        )


def model_shares(
    pools: dict[str, dict[str, Any]],
    models: dict[str, tuple[str, float]],
    token_prices: TokenPrices | None = None,
) -> dict[str, dict[str, Any]]:
    """Each model's share of a job, from the job's stats by pool: counts, the fraction settled,
    engine seconds, cost so far and to finish (at that model's price per hour, plus its
    provider's token prices for a remote engine)."""
    out: dict[str, dict[str, Any]] = {}
    for pool, (name, per_hour) in models.items():
        st = pools.get(pool)
        if not st:
            continue
        busy_s = float(st["busy_s"])
        settled = st["done"] + st["dead"]
        prices = (token_prices or {}).get(pool)
        cost, to_finish = job_cost(
            {**st, "pools": {}}, per_hour, {pool: prices} if prices else None
        )
        out[name] = {
            "total": st["total"],
            "done": st["done"],
            "dead": st["dead"],
            "pending": st["pending"],
            "leased": st["leased"],
            "fraction": settled / st["total"] if st["total"] else 1.0,
            "busy_s": busy_s,
            "cost": cost,
            "cost_to_finish": to_finish,
        }
    return out


HISTORY_POINTS = 720


@dataclass
class History:
    """Cluster throughput over time for the dashboard's chart: one point per Controller tick
    (the newest ``HISTORY_POINTS``), so every server, and one started later, shows the same."""

    t: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    items_per_s: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    tokens_per_s: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))

    def add(self, t: float, progress: Iterable[Mapping[str, Any]]) -> None:
        """A point at Unix time ``t``: the sum of the rates of the jobs' ``progress``."""
        rows = list(progress)
        self.t.append(t)
        self.items_per_s.append(sum(float(p.get("items_per_s") or 0.0) for p in rows))
        self.tokens_per_s.append(sum(float(p.get("tokens_per_s") or 0.0) for p in rows))

    def as_dict(self) -> dict[str, list[float]]:
        return {
            "t": list(self.t),
            "items_per_s": list(self.items_per_s),
            "tokens_per_s": list(self.tokens_per_s),
        }
