"""What the remote engine (``engine.kind: openai``) costs against a plain client, and whether
the cluster-wide rate limit holds, on a real vLLM OpenAI-compatible server of the tiny model.

The server (``tests/support/vllm_server.py``: vLLM's CPU build, ``--enforce-eager``, 1 GiB of
KV cache, prefix caching off so every pass over the same prompts costs the server the same)
runs for the whole bench; its access log carries a timestamp per request (a uvicorn log config,
``%(created)f``). The items: ``--items`` greedy chat requests (make_examples'
prompts, ``max_tokens`` = ``--max-tokens``, ``temperature: 0``), the same in every phase.

- baseline: a plain client loop, ``httpx.AsyncClient`` with ``--concurrency`` requests in
  flight (a semaphore), each item's body sent as it is in the file;
- ours: the same items as a job (``inference.runner.run_job``, in this process, on an embedded
  Ray cluster started once) with ``engine.kind: openai`` at the server, ``engine.concurrency``
  = ``--concurrency``, one worker of ``scaling.cpus_per_worker: 0.5``;

``--repeats`` rounds, the order alternating (baseline first in even rounds), since the VM's
speed halves for minutes at a time. Rates are steady-state for both: completions after the
first completion instant over the span from the first to the last one (baseline: each
response's arrival; ours: the output's ``completed_at``), so the worker's start-up is left out;
``ratio`` = median ours / median baseline (target >= 0.95). Also reported: the baseline's
end-to-end rate (N / first send to last response) and the job's whole-run rate (N / run_job's
wall time, worker start and shard commits included).

The job can beat the plain client (a ratio above 1, by 0-50% on the development VM): the
worker refills the engine's free slots between its steps, so new requests reach the server a
few at a time and vLLM prefills them in one forward pass, where the semaphore loop sends each
one the moment a slot frees. The baseline is the plain loop on purpose; it is not an upper
bound on what a client can get from this server.

- limit (``--limit-rpm R``, 0 skips it): ``--limit-items`` items (default 1.75 minutes' worth
  at R) through ``--limit-workers`` workers with ``limits.requests_per_minute: R`` and
  ``limits.burst_s: 1``. The server's access log gives every request's time; the figure is the
  most requests in any sliding ``window_s`` (60 s; 10 s as well, scaled) window against what a
  token bucket allows there (``R * (window_s + burst_s) / 60``), and the mean rate achieved
  (which should come close to R: a limiter that is too careful wastes the budget). The access
  log stamps a request when its response starts, so each time is its send time plus its
  latency (a fraction of a second here, at a few requests per second).

Every vLLM server on this VM binds its model worker to the same core (core 0; vLLM's CPU
default), so another vLLM server at work halves this one's speed for as long as it runs. Each
phase therefore reports ``foreign_vllm_cores``: CPU seconds that vLLM processes not started by
this bench used during the phase, per second of it (0 when the phase had the machine to
itself), and ``ratio_uncontended`` is the median ratio of the rounds where neither phase was
contended; ``--wait-idle S`` waits up to S seconds for other vLLM processes to end first.

Prints progress to stderr and one final JSON line on stdout; ``host_sum_range_us`` holds
``sum(range(1000))`` in microseconds at the start, after each phase and at the end. Run it alone
on the machine (``flock /tmp/heavy.lock``): CPU contention distorts every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from bisect import bisect_left
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from hostspeed import python_loop_us

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.support, when run as bench/remote_bench.py

from tests.support.vllm_server import SERVED_NAME, vllm_server  # noqa: E402

TARGET_RATIO = 0.95
QUIET_CORES = 0.05  # foreign vLLM cores below which a phase counts as uncontended
CHAT_PATH = "POST /v1/chat/completions"
ACCESS_LINE = re.compile(r'^(\d+\.\d+) ACCESS "(\w+ \S+)')
# uvicorn's access lines with the epoch time of each (vLLM's default ones have none).
ACCESS_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "access": {
            "()": "uvicorn.logging.AccessFormatter",
            "fmt": '%(created).6f ACCESS "%(request_line)s" %(status_code)s',
            "use_colors": False,
        },
        "default": {"()": "uvicorn.logging.DefaultFormatter", "use_colors": False},
    },
    "handlers": {
        "access": {
            "class": "logging.StreamHandler",
            "formatter": "access",
            "stream": "ext://sys.stdout",
        },
        "default": {
            "class": "logging.StreamHandler",
            "formatter": "default",
            "stream": "ext://sys.stderr",
        },
    },
    "loggers": {
        "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
        "uvicorn.error": {"level": "INFO"},
        "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
    },
}


def log(message: str) -> None:
    print(f"[remote_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- contention
def _stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2 :].split()  # state ppid pgrp session ...


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = int(_stat_fields(pid)[1])
    return False


def foreign_vllm_cpu_s() -> dict[int, float]:
    """CPU seconds so far of every vLLM process (``VLLM::*``) this bench did not start."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if not (entry / "comm").read_text().startswith("VLLM::"):
                continue
            if _descends_from(pid, os.getpid()):
                continue
            fields = _stat_fields(pid)
        except (OSError, ValueError, IndexError):
            continue
        if fields[0] == "Z":  # exited, not yet reaped: it uses no CPU
            continue
        found[pid] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return found


class Contention:
    """How many cores other vLLM processes kept busy between ``start`` and ``cores``."""

    def __init__(self) -> None:
        self._before = foreign_vllm_cpu_s()
        self._started = time.monotonic()

    def cores(self) -> float:
        after = foreign_vllm_cpu_s()
        used = sum(after[pid] - self._before.get(pid, 0.0) for pid in after)
        return round(used / max(time.monotonic() - self._started, 1e-9), 2)


def wait_idle(wait_s: float) -> None:
    """Wait up to ``wait_s`` for other vLLM processes to end (checked every 15 s)."""
    deadline = time.monotonic() + wait_s
    while others := foreign_vllm_cpu_s():
        if time.monotonic() >= deadline:
            if wait_s:
                log(f"WARNING: {len(others)} other vLLM process(es) still running")
            return
        log(f"waiting for {len(others)} other vLLM process(es) to end")
        time.sleep(15)


# ----------------------------------------------------------------------------- items
def _make_examples() -> Any:
    spec = importlib.util.spec_from_file_location(
        "make_examples", REPO / "examples/make_examples.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_items(count: int, seed: int, max_tokens: int, path: Path) -> list[dict[str, Any]]:
    """Greedy chat items (make_examples' prompts, a fixed ``max_tokens``), written to ``path``
    as an OpenAI batch file; their bodies are returned."""
    bodies = []
    with path.open("w") as out:
        for line in _make_examples().generate("chat", count, seed):
            item = json.loads(line)
            item["body"]["max_tokens"] = max_tokens
            item["body"]["temperature"] = 0
            bodies.append(item["body"])
            out.write(json.dumps(item) + "\n")
    return bodies


def steady_items_per_s(times: Sequence[float]) -> float | None:
    """Completions after the first completion instant over the span from the first to the last
    (items sharing the first instant all left out); None when all share one instant."""
    first, last = min(times), max(times)
    after = sum(1 for t in times if t > first)
    return after / (last - first) if last > first else None


# ----------------------------------------------------------------------------- baseline
async def _send_all(
    base_url: str, bodies: Sequence[dict[str, Any]], concurrency: int
) -> tuple[float, list[float], int]:
    """Every body to ``/chat/completions``, ``concurrency`` at a time: the start, each
    response's arrival (``time.monotonic()``) and the completion tokens."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    times: list[float] = []
    tokens = 0

    async def one(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
        nonlocal tokens
        async with gate:
            response = await client.post("chat/completions", json=body)
        response.raise_for_status()
        times.append(time.monotonic())
        tokens += int(response.json()["usage"]["completion_tokens"])

    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/") + "/", timeout=600, limits=limits
    ) as client:
        start = time.monotonic()
        await asyncio.gather(*(one(client, body) for body in bodies))
    return start, times, tokens


def measure_baseline(
    base_url: str, bodies: Sequence[dict[str, Any]], concurrency: int
) -> dict[str, Any]:
    contention = Contention()
    start, times, tokens = asyncio.run(_send_all(base_url, bodies, concurrency))
    return {
        "foreign_vllm_cores": contention.cores(),
        "items_per_s": steady_items_per_s(times),
        "end_to_end_items_per_s": len(times) / (max(times) - start),
        "wall_s": max(times) - start,
        "completion_tokens": tokens,
    }


# ----------------------------------------------------------------------------- ours
def job_config(
    base_url: str,
    folder: Path,
    concurrency: int,
    workers: int,
    limits: dict[str, Any] | None = None,
) -> Any:
    from inference.config import parse_config

    return parse_config(
        {
            "engine": {
                "kind": "openai",
                "model": SERVED_NAME,
                "base_url": base_url,
                "concurrency": concurrency,
            },
            "output": {
                "path": str(folder / "out"),
                "rows_per_shard": 1000,
                "max_shard_age_s": 5,
            },
            "queue": {"db_path": str(folder / "queue.sqlite"), "lease_s": 120},
            "scaling": {"cpus_per_worker": 0.5, "max_workers": workers},
            "limits": limits or {},
        },
        source="remote_bench",
    )


def measure_job(path: Path, config: Any, job_id: str, items: int) -> dict[str, Any]:
    from inference.runner import run_job
    from inference.shards import read_results

    contention = Contention()
    summary = run_job(path, config, job_id=job_id)
    foreign = contention.cores()
    table = read_results(summary.output)
    if table.num_rows != items or summary.dead:
        raise RuntimeError(
            f"{job_id}: {table.num_rows} rows and {summary.dead} dead letters for {items} "
            f"items (see {summary.output})"
        )
    times = [t.timestamp() for t in table["completed_at"].to_pylist()]
    return {
        "items_per_s": steady_items_per_s(times),
        "whole_job_items_per_s": items / summary.wall_s,
        "wall_s": summary.wall_s,
        "completion_tokens": summary.completion_tokens,
        "workers": summary.workers,
        "instants": len(set(times)),
        "foreign_vllm_cores": foreign,
    }


# ----------------------------------------------------------------------------- limit
def access_times(log_path: Path, request: str = CHAT_PATH) -> list[float]:
    """Epoch times of the server's access lines for ``request`` (method and path)."""
    times = []
    for line in log_path.read_text(errors="replace").splitlines():
        match = ACCESS_LINE.match(line)
        if match and match.group(2) == request:
            times.append(float(match.group(1)))
    return sorted(times)


def max_in_window(times: Sequence[float], window_s: float) -> int:
    """The most of ``times`` (sorted) in any half-open window ``[t, t + window_s)``."""
    best = 0
    for i, start in enumerate(times):
        best = max(best, bisect_left(times, start + window_s, lo=i) - i)
    return best


def limit_report(
    times: Sequence[float], rpm: float, burst_s: float, windows_s: Sequence[float]
) -> dict[str, Any]:
    """Per window: the most requests in it and what a token bucket of ``rpm`` holding
    ``burst_s`` of it allows there; and the mean rate achieved, in requests per minute."""
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    report: dict[str, Any] = {
        "requests": len(times),
        "span_s": round(span, 1),
        "achieved_rpm": round((len(times) - 1) / span * 60, 1) if span else None,
        "windows": {},
    }
    for window_s in windows_s:
        allowed = rpm * (window_s + burst_s) / 60
        most = max_in_window(times, window_s)
        report["windows"][f"{window_s:g}"] = {
            "max_requests": most,
            "allowed": round(allowed, 1),
            "ok": most <= allowed,
            "complete": span >= window_s,  # a shorter run never fills this window
        }
    return report


def measure_limit(
    path: Path,
    base_url: str,
    server_log: Path,
    folder: Path,
    args: argparse.Namespace,
    items: int,
) -> dict[str, Any]:
    burst_s = 1.0
    config = job_config(
        base_url,
        folder,
        args.concurrency,
        args.limit_workers,
        {"requests_per_minute": args.limit_rpm, "burst_s": burst_s},
    )
    since = time.time()
    job = measure_job(path, config, "limit", items)
    times = [t for t in access_times(server_log) if t >= since]
    if len(times) < items:
        raise RuntimeError(f"limit: {len(times)} requests in {server_log} for {items} items")
    return {**job, **limit_report(times, args.limit_rpm, burst_s, (60.0, 10.0))}


# ----------------------------------------------------------------------------- main
def _round(value: float | None, digits: int = 2) -> float | None:
    return round(value, digits) if value is not None else None


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def run_rounds(
    path: Path, bodies: list[dict[str, Any]], base_url: str, folder: Path, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    host: dict[str, float] = {}
    rounds = []
    config = job_config(base_url, folder, args.concurrency, 1)
    for index in range(args.repeats):
        order = ("baseline", "ours") if index % 2 == 0 else ("ours", "baseline")
        result: dict[str, Any] = {"order": "-".join(order)}
        for phase in order:
            if phase == "baseline":
                result[phase] = measure_baseline(base_url, bodies, args.concurrency)
            else:
                result[phase] = measure_job(path, config, f"ours-{index}", len(bodies))
            log(f"round {index} {phase}: {json.dumps(result[phase])}")
            host[f"after_{phase}_{index}"] = python_loop_us()
        ours, base = result["ours"]["items_per_s"], result["baseline"]["items_per_s"]
        result["ratio"] = _round(ours / base if ours and base else None, 3)
        rounds.append(result)
    return rounds, host


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    baseline = _median([r["baseline"]["items_per_s"] for r in rounds])
    ours = _median([r["ours"]["items_per_s"] for r in rounds])
    ratio = ours / baseline if ours and baseline else None
    return {
        "baseline_items_per_s": _round(baseline),
        "ours_items_per_s": _round(ours),
        "ratio": _round(ratio, 3),
        "round_ratios": [r["ratio"] for r in rounds],
        "baseline_end_to_end_items_per_s": _round(
            _median([r["baseline"]["end_to_end_items_per_s"] for r in rounds])
        ),
        "ours_whole_job_items_per_s": _round(
            _median([r["ours"]["whole_job_items_per_s"] for r in rounds])
        ),
        "ours_whole_job_wall_s": _round(_median([r["ours"]["wall_s"] for r in rounds]), 1),
        "baseline_wall_s": _round(_median([r["baseline"]["wall_s"] for r in rounds]), 1),
        "target_ratio": TARGET_RATIO,
        "target_met": ratio is not None and ratio >= TARGET_RATIO,
        "foreign_vllm_cores_max": max(
            r[phase]["foreign_vllm_cores"] for r in rounds for phase in ("baseline", "ours")
        ),
        "ratio_uncontended": _round(_median([r["ratio"] for r in rounds if quiet(r)]), 3),
        "uncontended_rounds": sum(1 for r in rounds if quiet(r)),
    }


def quiet(round_: dict[str, Any]) -> bool:
    """Neither phase of the round shared the machine with another vLLM server at work."""
    return all(round_[p]["foreign_vllm_cores"] < QUIET_CORES for p in ("baseline", "ours"))


def warm_up(base_url: str, bodies: list[dict[str, Any]], concurrency: int) -> None:
    """A few requests first, so no measured phase pays the server's first-request costs."""
    measure_baseline(base_url, bodies[: 2 * concurrency], concurrency)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=4, help="rounds, alternating the order")
    parser.add_argument("--limit-rpm", type=float, default=300, help="0 skips the limit phase")
    parser.add_argument("--limit-items", type=int, help="default: 1.75 minutes at --limit-rpm")
    parser.add_argument("--limit-workers", type=int, default=3)
    parser.add_argument(
        "--wait-idle", type=float, default=0, help="seconds to wait for other vLLM servers to end"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")
    args = parser.parse_args()
    if args.items < 2 or args.concurrency < 1 or args.repeats < 1:
        parser.error("--items >= 2, --concurrency >= 1 and --repeats >= 1")
    return args


def main() -> None:
    args = parse_args()
    # Terminated: unwind through the server's and Ray's cleanup.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wait_idle(args.wait_idle)
    folder = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))
    log(f"working in {folder}")
    host: dict[str, float] = {"start": python_loop_us()}
    path = folder / "chat.jsonl"
    bodies = make_items(args.items, args.seed, args.max_tokens, path)
    limit_items = args.limit_items or max(2, round(args.limit_rpm * 1.75))
    limit_path = folder / "limit.jsonl"
    make_items(limit_items, args.seed + 1, args.max_tokens, limit_path)
    log_config = folder / "access-log.json"
    log_config.write_text(json.dumps(ACCESS_LOG_CONFIG))
    import ray

    from inference.cluster import connect

    started = time.monotonic()
    server_args = ["--no-enable-prefix-caching", "--log-config-file", str(log_config)]
    with vllm_server(folder, extra_args=server_args) as base_url:
        server_log = next(folder.glob("vllm-server-*.log"))
        log(f"server {base_url} ready in {time.monotonic() - started:.1f} s (log {server_log})")
        connect(num_cpus=os.cpu_count() or 2, temp_dir=str(folder / "ray"))
        try:
            warm_up(base_url, bodies, args.concurrency)
            rounds, round_host = run_rounds(path, bodies, base_url, folder, args)
            host.update(round_host)
            limit: dict[str, Any] = {}
            if args.limit_rpm > 0:
                limit = measure_limit(limit_path, base_url, server_log, folder, args, limit_items)
                log(f"limit: {json.dumps(limit)}")
                host["after_limit"] = python_loop_us()
        finally:
            ray.shutdown()
    host["end"] = python_loop_us()
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    window = limit.get("windows", {}).get("60", {})
    print(
        json.dumps(
            {
                "bench": "remote",
                "items": args.items,
                "concurrency": args.concurrency,
                "max_tokens": args.max_tokens,
                "repeats": args.repeats,
                **summarize(rounds),
                "limit_rpm": args.limit_rpm or None,
                "max_window_requests": window.get("max_requests"),
                "window_s": 60 if window else None,
                "window_allowed": window.get("allowed"),
                "limit": limit or None,
                "rounds": rounds,
                "host_sum_range_us": host,
                "cpus": os.cpu_count(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
