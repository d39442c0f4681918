"""What a job will take before it starts: tokens, duration, cost, and workers for a deadline.

``inference estimate`` and ``POST /v1/jobs/estimate`` call :func:`estimate`; ``inference run``
stores its answer in ``job.json`` beside the actual figures
(:func:`inference.measurements.job_report`). Three steps:

1. **Count** (:mod:`inference.tokens`): prompt tokens with the model's own tokenizer as the
   engine formats them, the output budget from ``max_tokens`` x ``n``; past 10,000 items of a
   pool, extrapolated from characters (the result says so).
2. **Measure** (:mod:`inference.measurements`): the model's recent finished jobs give the
   tokens per second of one worker (else the pool's live rate, else
   ``scaling.assumed_tokens_per_s``), the share of the output budget its answers used, and the
   fixed time of a run besides the engine work.
3. **Compute** (:func:`pool_estimate`, pure): engine-seconds = (prompt + expected output
   tokens) / tokens per second; duration at ``w`` workers = startup + engine-seconds / ``w``;
   cost as ``job.json`` counts it (engine-seconds at ``cost_per_gpu_hour``, plus a remote
   provider's token prices), and the cost of holding the pool for the duration; the workers a
   deadline needs; and the provider's batch price of the tokens where a remote engine with
   prices is configured (the job's own, or ``scaling.overflow``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inference.config import Config, ScalingConfig
from inference.errors import InputError, PermanentError
from inference.inputs import InputProblem, read_input
from inference.measurements import Measured, MeasurementStore, measurements_dir
from inference.schema import Request, decode_payload
from inference.tokens import EXACT_ITEMS, Counted, TokenCounter, count

logger = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_deadline(text: str, now: float) -> float:
    """Seconds from ``now`` (Unix time) to a deadline: a duration (``90s``, ``45m``, ``2h``,
    ``1.5d``) or an ISO 8601 time (UTC when it has no offset). Raises ValueError naming it."""
    match = _DURATION.match(text)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise ValueError(
                f"deadline {text!r} is neither a duration (90s, 45m, 2h, 1d) nor an ISO 8601 time"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        try:
            seconds = when.timestamp() - now
        except (OverflowError, ValueError):
            raise ValueError(f"deadline {text!r} is out of range") from None
    if not math.isfinite(seconds):
        raise ValueError(f"deadline {text!r} is out of range")
    if seconds <= 0:
        raise ValueError(f"deadline {text!r} is not in the future")
    return seconds


# ---------------------------------------------------------------------------- the arithmetic
@dataclass(frozen=True, slots=True)
class Throughput:
    tokens_per_s: float | None  # of one worker
    source: str  # measured | live | assumed | unknown


def throughput(measured: Measured, live_tokens_per_s: float | None, assumed: float) -> Throughput:
    """Measured by finished jobs, else the pool's live rate, else the config's assumption."""
    if measured.tokens_per_s:
        return Throughput(measured.tokens_per_s, "measured")
    if live_tokens_per_s:
        return Throughput(live_tokens_per_s, "live")
    if assumed:
        return Throughput(assumed, "assumed")
    return Throughput(None, "unknown")


def workers_for(engine_s: float, startup_s: float, deadline_s: float) -> int | None:
    """Fewest workers that finish ``engine_s`` of work (plus ``startup_s``) within
    ``deadline_s``; None when the startup alone passes it."""
    room = deadline_s - startup_s
    if room <= 0:
        return None
    return max(1, math.ceil(engine_s / room - 1e-9))


def tokens_cost(prompt: int, output: int, prices: tuple[float, float]) -> float:
    return (prompt * prices[0] + output * prices[1]) / 1e6


def provider_prices(config: Config) -> list[dict[str, Any]]:
    """Each remote engine with prices that the job may use (its own, or its overflow): its
    list prices and what its Batch API charges (``batch_discount`` off)."""
    out = []
    for one in config.models().values():
        for role, engine in (("engine", one.engine), ("overflow", one.scaling.overflow)):
            if engine is None or not engine.remote:
                continue
            if not (engine.input_price_per_mtok or engine.output_price_per_mtok):
                continue
            out.append(
                {
                    "role": role,
                    "kind": engine.kind,
                    "model": engine.model,
                    "input_price_per_mtok": engine.input_price_per_mtok,
                    "output_price_per_mtok": engine.output_price_per_mtok,
                    "batch_discount": engine.batch_discount,
                }
            )
    return out


def pool_estimate(
    counted: Counted,
    measured: Measured,
    rate: Throughput,
    config: Config,
    workers_now: int,
    workers_max: int,
    deadline_s: float | None = None,
    token_prices: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """The estimate of one pool's work (``config``: that pool's one-model config)."""
    prompt = counted.total_prompt_tokens()
    ratio = measured.completion_ratio
    output = round(counted.max_output_tokens * ratio) if ratio is not None else 0
    if ratio is None:
        output = counted.max_output_tokens  # the most the items may generate
    startup_s = measured.startup_s or 0.0
    engine_s = (prompt + output) / rate.tokens_per_s if rate.tokens_per_s else None
    provider = tokens_cost(prompt, output, token_prices) if token_prices else 0.0
    scaling = config.scaling

    def at(workers: int) -> dict[str, Any]:
        workers = max(1, workers)
        if engine_s is None:
            return {"workers": workers, "duration_s": None, "cost": None, "pool_cost": None}
        duration_s = startup_s + engine_s / workers
        return {
            "workers": workers,
            "duration_s": duration_s,
            "cost": engine_s / 3600 * scaling.cost_per_gpu_hour + provider,
            "pool_cost": workers * duration_s / 3600 * scaling.worker_cost_per_hour + provider,
        }

    out: dict[str, Any] = {
        "model": config.engine.model,
        "items": counted.items,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "max_output_tokens": counted.max_output_tokens,
        "counting": {
            "method": counted.method,
            "exact_items": counted.exact_items,
            "extrapolated": counted.sampled,
            "note": counted.note(),
        },
        "output_ratio": ratio,
        "output_source": (
            f"measured ({measured.jobs} job{'' if measured.jobs == 1 else 's'})"
            if ratio is not None
            else "max_tokens (the most)"
        ),
        "tokens_per_s_per_worker": rate.tokens_per_s,
        "throughput_source": rate.source,
        "startup_s": startup_s,
        "engine_s": engine_s,
        "now": at(workers_now),
        "max": at(workers_max),
    }
    if deadline_s is not None:
        needed = None if engine_s is None else workers_for(engine_s, startup_s, deadline_s)
        out["deadline"] = {
            "deadline_s": deadline_s,
            "workers_needed": needed,
            # None: unknown (no throughput); False: not even at max_workers (or the
            # startup alone takes longer).
            "feasible": None if engine_s is None else needed is not None and needed <= workers_max,
        }
    batch = []
    for p in provider_prices(config):
        listed = tokens_cost(
            prompt, output, (p["input_price_per_mtok"], p["output_price_per_mtok"])
        )
        batch.append({**p, "cost": listed, "batch_cost": listed * (1 - p["batch_discount"])})
    if batch:
        out["provider"] = batch
    return out


def combine(pools: dict[str, dict[str, Any]], deadline_s: float | None) -> dict[str, Any]:
    """Totals over a job's pools (they run side by side: the longest one is the duration)."""
    if len(pools) == 1:
        return dict(next(iter(pools.values())))

    def total(key: str) -> int:
        return sum(int(p[key]) for p in pools.values())

    def scenario(name: str) -> dict[str, Any]:
        rows = [p[name] for p in pools.values()]
        known = all(r["duration_s"] is not None for r in rows)
        return {
            "workers": sum(r["workers"] for r in rows),
            "duration_s": max(r["duration_s"] for r in rows) if known else None,
            "cost": sum(r["cost"] for r in rows) if known else None,
            "pool_cost": sum(r["pool_cost"] for r in rows) if known else None,
        }

    out: dict[str, Any] = {
        "model": [p["model"] for p in pools.values()],
        "items": total("items"),
        "prompt_tokens": total("prompt_tokens"),
        "output_tokens": total("output_tokens"),
        "max_output_tokens": total("max_output_tokens"),
        "now": scenario("now"),
        "max": scenario("max"),
        "models": pools,
    }
    if deadline_s is not None:
        needs = [p["deadline"] for p in pools.values()]
        known = all(d["workers_needed"] is not None for d in needs)
        out["deadline"] = {
            "deadline_s": deadline_s,
            "workers_needed": sum(d["workers_needed"] for d in needs) if known else None,
            "feasible": all(d["feasible"] for d in needs)
            if all(d["feasible"] is not None for d in needs)
            else None,
        }
    return out


def estimate(
    config: Config,
    requests: Iterable[tuple[str, Request | None]],
    store: MeasurementStore,
    workers_now: dict[str, int],
    workers_max: dict[str, int],
    *,
    deadline_s: float | None = None,
    live_tokens_per_s: dict[str, float] | None = None,
    exact_items: int = EXACT_ITEMS,
) -> dict[str, Any]:
    """The estimate of a job of ``config`` over ``(pool, request)`` pairs; the pools' worker
    counts now and at most, by pool name."""
    pools = config.pools()
    counters: dict[str, TokenCounter] = {}
    for name in pools:
        counters[name] = TokenCounter(pools[name].engine)
    counted = count(requests, counters, exact_items)
    if not counted:
        raise InputError("the input holds no items to estimate")
    prices = config.token_prices()
    out: dict[str, dict[str, Any]] = {}
    for name, c in counted.items():
        one = pools[name]
        measured = store.read(name)
        rate = throughput(
            measured, (live_tokens_per_s or {}).get(name), one.scaling.assumed_tokens_per_s
        )
        key = one.engine.served_name or name
        out[key] = pool_estimate(
            c,
            measured,
            rate,
            one,
            workers_now.get(name, 1),
            workers_max.get(name, 1),
            deadline_s,
            prices.get(name),
        )
    result = combine(out, deadline_s)
    notes = [
        f"{k}: {p['counting']['note']}" if len(out) > 1 else p["counting"]["note"]
        for k, p in out.items()
    ]
    for p in out.values():
        if p["throughput_source"] == "unknown":
            notes.append(
                f"{p['model']}: no throughput measured yet and scaling.assumed_tokens_per_s "
                "is 0: durations are unknown until a job of this model has run"
            )
        elif p["throughput_source"] == "assumed":
            notes.append(f"{p['model']}: throughput assumed (scaling.assumed_tokens_per_s)")
        if p["output_ratio"] is None and p["max_output_tokens"]:
            notes.append(
                f"{p['model']}: no output lengths measured yet: every answer is taken to use "
                "its max_tokens (an upper bound)"
            )
        if not p["startup_s"] and p["throughput_source"] != "unknown":
            notes.append(f"{p['model']}: no startup time measured yet (taken as 0)")
    result["notes"] = notes
    return result


# ---------------------------------------------------------------------------- inputs
def file_requests(path: str | Path, config: Config) -> Iterator[tuple[str, Request | None]]:
    """The good records of an input file (as ``inference run`` reads it) by pool; check the
    file first with :func:`inference.runner.check_input` (problems are skipped here)."""
    default_model = next(iter(config.engines)) if config.engines else config.engine.model
    for record in read_input(
        path, config.input, default_model, max_item_bytes=config.queue.max_item_bytes
    ):
        if isinstance(record, InputProblem):
            continue
        pool = config.pool_of(record.model)
        if pool is None:
            continue
        yield pool, _request(record.payload)


def _request(payload: str) -> Request | None:
    try:
        return decode_payload(payload)
    except PermanentError:
        return None  # valid but unsupported here: a dead letter, no engine time


def payload_requests(
    items: Iterable[tuple[str | None, str]], config: Config
) -> Iterator[tuple[str, Request | None]]:
    """``(pool, payload)`` pairs (a None pool: the job's one engine) as estimate input."""
    for pool, payload in items:
        yield pool or config.engine.model, _request(payload)


# ---------------------------------------------------------------------------- a job's run
def pool_sizes(
    config: Config, slots: Callable[[ScalingConfig], int], workers: int | None = None
) -> tuple[dict[str, int], dict[str, int]]:
    """Each pool's workers now and at most, as a job would run: ``max_workers`` or the
    cluster's ``slots`` (shared by the models of a fixed job); a fixed pool starts them all, an
    autoscaled one at least one. ``workers`` sets the count now (of every pool)."""
    pools = config.pools()
    models = len(config.models())
    now: dict[str, int] = {}
    most: dict[str, int] = {}
    for name, one in pools.items():
        s = one.scaling
        share = models if s.mode == "fixed" else 1
        most[name] = max(s.max_workers or slots(s) // share, s.min_workers, 1)
        now[name] = most[name] if s.mode == "fixed" else max(s.min_workers, 1)
        if workers is not None:
            now[name] = workers
    return now, most


def config_deadline_s(config: Config, now: float) -> float | None:
    """Seconds to ``scaling.deadline`` (None without one, or once it has passed)."""
    deadline = config.scaling.deadline
    if deadline is None:
        return None
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=UTC)
    left = deadline.timestamp() - now
    return left if left > 0 else None


def run_estimate(
    path: str | Path, config: Config, workers_now: dict[str, int], workers_max: dict[str, int]
) -> dict[str, Any] | None:
    """The estimate ``inference run`` makes before it enqueues (and keeps in ``job.json``);
    None, logged, when it cannot be made: an estimate never stops a job."""
    try:
        return estimate(
            config,
            file_requests(path, config),
            MeasurementStore(measurements_dir(config)),
            workers_now,
            workers_max,
            deadline_s=config_deadline_s(config, time.time()),
        )
    except Exception as exc:
        logger.warning("no estimate of %s: %s", path, exc)
        return None


# ---------------------------------------------------------------------------- the command
def local_slots(scaling: ScalingConfig) -> int:
    """Workers of this shape the cluster holds: the one ``RAY_ADDRESS`` names (joined), else
    this machine, as the embedded cluster ``inference run`` starts would have them."""
    if os.environ.get("RAY_ADDRESS"):
        from inference.cluster import cluster_slots, connect

        connect()
        return cluster_slots(scaling.cpus_per_worker, scaling.gpus_per_worker)
    if scaling.gpus_per_worker > 0:
        gpus = len([p for p in Path("/dev").glob("nvidia[0-9]*")])
        return int(gpus // scaling.gpus_per_worker)
    if scaling.cpus_per_worker <= 0:
        return 1
    return max(1, int((os.cpu_count() or 1) // scaling.cpus_per_worker))


def estimate_input(
    path: str | Path, config: Config, deadline: str | None = None, workers: int | None = None
) -> dict[str, Any]:
    """``inference estimate``: the input checked as ``inference run`` checks it (InputError
    naming the file and lines), then estimated; ``deadline`` as :func:`parse_deadline` takes
    it (default ``scaling.deadline``). ValueError for a bad deadline."""
    from inference.runner import check_input

    now = time.time()
    deadline_s = parse_deadline(deadline, now) if deadline else config_deadline_s(config, now)
    check_input(Path(path), config)
    workers_now, workers_max = pool_sizes(config, local_slots, workers)
    return estimate(
        config,
        file_requests(path, config),
        MeasurementStore(measurements_dir(config)),
        workers_now,
        workers_max,
        deadline_s=deadline_s,
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d} ({seconds:,.0f} s)"


def _money(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.4f}"


def estimate_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """An estimate as the label and text of each row of a table."""
    rows = [("items", f"{result['items']:,}"), ("model", str(result["model"]))]
    pools = result.get("models") or {"": result}
    for name, p in pools.items():
        tag = f" ({name})" if name else ""
        c = p["counting"]
        how = c["method"] + (f", first {c['exact_items']:,} exact" if c["extrapolated"] else "")
        rows.append((f"prompt tokens{tag}", f"{p['prompt_tokens']:,} ({how})"))
        share = (
            "embeddings generate none"
            if not p["max_output_tokens"]
            else f"{p['output_ratio']:.2f} of max_tokens, {p['output_source']}"
            if p["output_ratio"] is not None
            else "max_tokens: no output lengths measured yet"
        )
        rows.append(
            (
                f"output tokens{tag}",
                f"{p['output_tokens']:,} of {p['max_output_tokens']:,} ({share})",
            )
        )
        rate = p["tokens_per_s_per_worker"]
        rows.append(
            (
                f"throughput{tag}",
                "unknown"
                if rate is None
                else f"{rate:,.1f} tokens/s per worker "
                f"({p['throughput_source']}), startup {p['startup_s']:.1f} s",
            )
        )
    for key, label in (("now", "pool now"), ("max", "at max_workers")):
        at = result[key]
        rows.append(
            (
                label,
                f"{at['workers']} workers: {_duration(at['duration_s'])}, cost "
                f"{_money(at['cost'])} (pool held: {_money(at['pool_cost'])})",
            )
        )
    if "deadline" in result:
        d = result["deadline"]
        needed = d["workers_needed"]
        rows.append(
            (
                "deadline",
                f"{_duration(d['deadline_s'])}: "
                + (
                    "workers unknown (no throughput)"
                    if d["feasible"] is None
                    else "cannot be met (the startup alone is longer)"
                    if needed is None
                    else f"{needed} worker{'' if needed == 1 else 's'}"
                    + ("" if d["feasible"] else " (more than max_workers)")
                ),
            )
        )
    for p in pools.values():
        for prov in p.get("provider", []):
            rows.append(
                (
                    f"provider ({prov['role']})",
                    f"{prov['kind']} {prov['model']}: batch {_money(prov['batch_cost'])}, "
                    f"list {_money(prov['cost'])}",
                )
            )
    return rows


def server_estimate(
    config: Config,
    payloads: Iterable[tuple[str | None, str]],
    state_dir: str | Path,
    pools: dict[str, dict[str, Any]],
    *,
    deadline_s: float | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """An estimate on a serving cluster (Ray connected): ``(pool, payload)`` pairs as the API
    checked them, the measurements in the Controller's ``state_dir``, and its pools'
    snapshot (``Controller.snapshot()["pools"]``) for the workers now (at least one: an idle
    pool starts one for a job) and their live rates."""
    from inference.cluster import cluster_slots

    live = {n: float(p["tokens_per_s"]) for n, p in pools.items() if p.get("tokens_per_s")}
    _, workers_max = pool_sizes(
        config, lambda s: cluster_slots(s.cpus_per_worker, s.gpus_per_worker)
    )
    workers_now = {
        name: workers or max(int((pools.get(name) or {}).get("workers") or 0), 1)
        for name in workers_max
    }
    if deadline_s is None:
        deadline_s = config_deadline_s(config, time.time())
    return estimate(
        config,
        payload_requests(payloads, config),
        MeasurementStore(Path(state_dir) / "measurements"),
        workers_now,
        workers_max,
        deadline_s=deadline_s,
        live_tokens_per_s=live,
    )
