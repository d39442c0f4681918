"""``/healthz`` and ``/metrics`` (Prometheus text format, rendered here: no global registry).

Metrics now: queue items by job and state, pending items by priority, jobs by kind and status,
workers and lost workers per pool, the backlog and its drain rate, and HTTP requests by route and
status. Issue 8 adds throughput, tokens, cost and batch figures.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from inference import metrics as job_metrics

from .dashboard import observe
from .state import ServerState

router = APIRouter(tags=["operations"])
Family = tuple[str, str, str, list[tuple[dict[str, str], float]]]


@router.get("/healthz", summary="Liveness of the server, the WorkQueue and the Controller")
async def healthz(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.inference
    checks: dict[str, Any] = {}
    for name, handle in (("queue", state.queue), ("controller", state.controller)):
        try:
            await asyncio.wait_for(handle.ping.remote(), 5)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    if ok:
        try:
            snapshot = await state.refresh()
            checks["pool_errors"] = snapshot.get("pool_errors", {})
            checks["loop_alive"] = snapshot.get("loop_alive", False)
            ok = bool(checks["loop_alive"])
        except Exception as exc:
            checks["snapshot"] = f"unavailable: {type(exc).__name__}"
            ok = False
    body = {"status": "ok" if ok else "unavailable", "server": state.server_id, **checks}
    return JSONResponse(body, 200 if ok else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.inference
    obs = await observe(request)  # the dashboard's figures: progress, cost, workers
    counters = await state.counter_totals()  # of every server process
    families = _families(obs.stats, obs.snapshot, counters) + _webhook_families(obs.snapshot)
    families += job_metrics.families(
        obs.stats, obs.progress(), obs.workers, obs.cost_per_gpu_hour, obs.token_prices
    )
    return Response(job_metrics.render(families), media_type="text/plain; version=0.0.4")


def _families(
    stats: dict[str, dict[str, Any]],
    snapshot: dict[str, Any],
    counters: dict[tuple[str, ...], float],
) -> list[Family]:
    items = [
        ({"job": job_id, "state": s}, float(st[s]))
        for job_id, st in stats.items()
        for s in ("pending", "leased", "done", "dead")
    ]
    by_state: dict[str, float] = defaultdict(float)
    by_priority: dict[str, float] = defaultdict(float)
    for st in stats.values():
        for s in ("pending", "leased", "done", "dead"):
            by_state[s] += st[s]
        for priority, n in st["pending_by_priority"].items():
            by_priority[str(priority)] += n
    jobs = []
    for key, n in snapshot.get("jobs", {}).items():
        kind, _, status = key.partition(":")
        jobs.append(({"kind": kind, "status": status}, float(n)))
    pools = snapshot.get("pools", {})
    return [
        ("inference_queue_items", "gauge", "Items by job and state.", items),
        (
            "inference_queue_depth",
            "gauge",
            "Items of every job by state.",
            [({"state": s}, n) for s, n in by_state.items()],
        ),
        (
            "inference_queue_pending_by_priority",
            "gauge",
            "Pending items by priority class.",
            [({"priority": p}, n) for p, n in by_priority.items()],
        ),
        ("inference_jobs", "gauge", "Controller jobs by kind and status.", jobs),
        (
            "inference_workers",
            "gauge",
            "Workers running per engine pool.",
            [({"pool": p}, float(v["workers"])) for p, v in pools.items()],
        ),
        (
            "inference_workers_lost_total",
            "counter",
            "Workers lost (and replaced) per engine pool since the Controller started.",
            [({"pool": p}, float(v.get("lost", 0))) for p, v in pools.items()],
        ),
        (
            "inference_workers_desired",
            "gauge",
            "Workers the scaler wants per autoscaled engine pool.",
            [
                ({"pool": p}, float(v["desired"]))
                for p, v in pools.items()
                if v.get("desired") is not None
            ],
        ),
        (
            "inference_workers_draining",
            "gauge",
            "Workers draining (finishing what they hold before they exit) per pool.",
            [({"pool": p}, float(v.get("draining", 0))) for p, v in pools.items()],
        ),
        (
            "inference_backlog_items",
            "gauge",
            "Pending items of active jobs.",
            [({}, float(snapshot.get("backlog", 0)))],
        ),
        (
            "inference_settled_items_per_second",
            "gauge",
            "Items completed or dead-lettered per second (smoothed).",
            [({}, float(snapshot.get("items_per_s", 0.0)))],
        ),
        (
            "inference_enqueue_requests_total",
            "counter",
            "Enqueue requests served (their items shared queue calls when they overlapped).",
            [({}, counters.get(("enqueue_requests",), 0.0))],
        ),
        (
            "inference_enqueue_queue_calls_total",
            "counter",
            "WorkQueue.enqueue calls made for those requests.",
            [({}, counters.get(("enqueue_queue_calls",), 0.0))],
        ),
        (
            "inference_http_requests_total",
            "counter",
            "HTTP requests by method, route and status (of every server process).",
            [
                (dict(zip(("method", "route", "status"), key[1:], strict=True)), n)
                for key, n in counters.items()
                if key[0] == "http"
            ],
        ),
    ]


def _webhook_families(snapshot: dict[str, Any]) -> list[Family]:
    """Webhook deliveries by event type and outcome (``delivered``, ``failed``: an attempt that
    failed, ``given_up``: a delivery abandoned at the retry bound), and events not delivered."""
    hooks = snapshot.get("webhooks") or {}
    return [
        (
            "inference_webhook_deliveries_total",
            "counter",
            "Webhook delivery attempts by event type and outcome since the Controller started.",
            [
                ({"type": c["type"], "outcome": c["outcome"]}, float(c["n"]))
                for c in hooks.get("deliveries", [])
            ],
        ),
        (
            "inference_webhook_undelivered",
            "gauge",
            "Webhook deliveries due (not delivered yet, not given up).",
            [({}, float(hooks.get("undelivered", 0)))],
        ),
    ]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(families: list[Family]) -> str:
    """Prometheus text exposition format 0.0.4."""
    lines = []
    for name, kind, help_text, samples in families:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
                lines.append(f"{name}{{{inner}}} {value}")
            else:
                lines.append(f"{name} {value}")
    return "\n".join(lines) + "\n"
