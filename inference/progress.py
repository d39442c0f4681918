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
    ) -> None:
        """``models``: for a job of several models, pool -> (served name, cost per hour)."""
        self.window_s = window_s
        self.cost_per_hour = cost_per_hour
        self.models = models
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
        cost = busy_s / 3600.0 * self.cost_per_hour
        cost_to_finish = None
        if stats["done"]:
            cost_to_finish = busy_s / stats["done"] * remaining / 3600.0 * self.cost_per_hour
        models = None
        if self.models is not None:
            models = model_shares(stats.get("pools", {}), self.models)
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
    pools: dict[str, dict[str, Any]], models: dict[str, tuple[str, float]]
) -> dict[str, dict[str, Any]]:
    """Each model's share of a job, from the job's stats by pool: counts, the fraction settled,
    engine seconds, cost so far and to finish (at that model's price per hour)."""
    out: dict[str, dict[str, Any]] = {}
    for pool, (name, per_hour) in models.items():
        st = pools.get(pool)
        if not st:
            continue
        busy_s = float(st["busy_s"])
        remaining = st["pending"] + st["leased"]
        settled = st["done"] + st["dead"]
        out[name] = {
            "total": st["total"],
            "done": st["done"],
            "dead": st["dead"],
            "pending": st["pending"],
            "leased": st["leased"],
            "fraction": settled / st["total"] if st["total"] else 1.0,
            "busy_s": busy_s,
            "cost": busy_s / 3600.0 * per_hour,
            "cost_to_finish": busy_s / st["done"] * remaining / 3600.0 * per_hour
            if st["done"]
            else None,
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
