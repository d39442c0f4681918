"""The dashboard: one HTML page with its scripts served from the package (no CDN), the JSON it
polls, and the job actions it offers (redrive dead letters, pause, resume).

``GET /v1/dashboard/state`` gathers in one go what the page shows: every job of the queue with
the Controller's progress (ETA, throughput) and its cost, queue depth by state and priority, dead
letters with their reasons, the workers with their node, GPUs and batches, a throughput history
for the chart, and the Ray dashboard's address. :func:`observe` does the gathering; ``/metrics``
uses it too, so the page and Prometheus show the same figures. Every route here is behind the
server's bearer-token guard like any other.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from inference.progress import TokenPrices, job_cost, model_shares
from inference.queue.actor import NAMESPACE

from .http_errors import ApiError
from .native import JobId
from .state import ServerState, call

logger = logging.getLogger(__name__)

router = APIRouter(tags=["dashboard"])
STATIC = Path(__file__).with_name("static")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")
# The page may talk to this server only: the browser enforces it as well.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_HEADERS = {"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"}
# Controller statuses whose progress is current (the Controller stops tracking the others).
_LIVE = ("queued", "running", "finalizing", "cancelling", "expiring")
MAX_JOBS = 50
DEAD_LETTERS_PER_JOB = 20


@dataclass
class Observation:
    """One look at the cluster: queue stats, Controller records and progress, workers."""

    at: float
    stats: dict[str, dict[str, Any]]
    snapshot: dict[str, Any]
    records: dict[str, dict[str, Any]]
    workers: list[dict[str, Any]]
    cost_per_gpu_hour: dict[str, float]
    models: dict[str, dict[str, tuple[str, float]]]  # job -> pool -> (model, price per hour)
    token_prices: dict[str, TokenPrices]  # job -> pool -> remote engine's token prices

    def progress(self) -> dict[str, dict[str, Any]]:
        """The Controller's progress of each job whose progress is current."""
        out = {}
        for job_id, rec in self.records.items():
            if rec.get("progress") and _live(rec):
                out[job_id] = rec["progress"]
        return out


def _live(rec: dict[str, Any]) -> bool:
    return rec["status"] in _LIVE or (rec["kind"] == "native" and rec["status"] == "completed")


async def observe(request: Request) -> Observation:
    """Gather queue stats, the Controller's records (with progress) and the workers' info."""
    state: ServerState = request.app.state.inference
    stats_ref = call(state.queue.stats.remote(), 10)
    natives_ref = call(state.controller.jobs.remote(100, None), 10)
    batches_ref = call(state.controller.batches.remote(100, None), 10)
    stats, (natives, _), (batches, _) = await asyncio.gather(stats_ref, natives_ref, batches_ref)
    snapshot = await state.refresh()
    records = {r["id"]: r for r in [*natives, *batches]}
    workers = await _workers(request, list(snapshot.get("pools", {})))
    rates, models, tokens = {}, {}, {}
    for job_id in stats["jobs"]:
        rates[job_id], models[job_id], tokens[job_id] = await _prices(state, job_id)
    return Observation(
        time.time(), stats["jobs"], snapshot, records, workers, rates, models, tokens
    )


async def _prices(
    state: ServerState, job_id: str
) -> tuple[float, dict[str, tuple[str, float]], TokenPrices]:
    """A job's cost per GPU-hour; with several models each pool's name and price; the token
    prices of its remote engines."""
    try:
        spec = await state.job_spec(job_id)
    except Exception:  # the job is gone from the queue meanwhile: no cost known
        return 0.0, {}, {}
    models = {
        pool: (name, float(price))
        for pool, (name, price) in spec.settings.get("models", {}).items()
    }
    tokens = {
        pool: (float(p), float(c)) for pool, (p, c) in spec.settings.get("token_prices", {}).items()
    }
    return float(spec.settings.get("cost_per_gpu_hour", 0.0) or 0.0), models, tokens


async def _workers(request: Request, pools: list[str]) -> list[dict[str, Any]]:
    """``info()`` of every worker of the Controller's pools (named actors ``<pool>-<id>``)."""
    if not pools:
        return []
    cache: dict[str, Any] = getattr(request.app.state, "dashboard_workers", None) or {}
    request.app.state.dashboard_workers = cache
    handles = await run_in_threadpool(_worker_handles, pools, cache)
    replies = await asyncio.gather(
        *(asyncio.wait_for(h.info.remote(), 3) for h in handles.values()), return_exceptions=True
    )
    out = []
    for name, reply in zip(handles, replies, strict=True):
        if isinstance(reply, BaseException):
            out.append({"worker": name, "state": "unreachable", "pool": name.rpartition("-")[0]})
        else:
            out.append(reply)
    return sorted(out, key=lambda w: str(w["worker"]))


def _worker_handles(pools: list[str], cache: dict[str, Any]) -> dict[str, Any]:
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE and any(a["name"].startswith(p + "-") for p in pools)
    ]
    for gone in set(cache) - set(names):
        del cache[gone]
    for name in names:
        if name not in cache:
            try:
                cache[name] = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:  # ended between the listing and now
                continue
    return {n: cache[n] for n in names if n in cache}


def _job_row(
    job_id: str,
    st: dict[str, Any],
    rec: dict[str, Any] | None,
    rate: float,
    prices: dict[str, tuple[str, float]],
    now: float,
    token_prices: TokenPrices | None = None,
) -> dict[str, Any]:
    progress = (rec or {}).get("progress") if rec and _live(rec) else None
    total = int(st["total"])
    settled = int(st["done"]) + int(st["dead"])
    status = rec["status"] if rec else ("completed" if settled == total and total else st["state"])
    if st["state"] in ("paused", "cancelled") and status not in ("completed", "cancelled"):
        status = st["state"]
    remaining = int(st["pending"]) + int(st["leased"])
    # From the fresh counts; never 100% before the Controller has finalized the output.
    fraction = settled / total if total else 0.0
    if rec and status not in ("completed", "failed", "cancelled", "expired"):
        fraction = min(fraction, 0.999)
    eta_s = (progress.get("eta_s") if remaining else 0.0) if progress else None
    cost, to_finish = job_cost(st, rate, token_prices)
    models = _model_shares(st, prices, rate, token_prices)
    if models:
        cost = sum(m["cost"] for m in models.values())
        to_finish = sum(m["cost_to_finish"] or 0.0 for m in models.values())
    next_run = float(st.get("next_run_at") or 0.0)  # 0: it may lease now
    return {
        "id": job_id,
        "kind": rec["kind"] if rec else "run",
        "status": status,
        "queue_state": st["state"],
        "pool": st.get("pool"),
        "priority": st.get("priority"),
        "created_at": (rec or {}).get("created_at") or st.get("created_at"),
        "total": total,
        "done": int(st["done"]),
        "dead": int(st["dead"]),
        "pending": int(st["pending"]),
        "waiting": int(st.get("waiting", 0)),
        "leased": int(st["leased"]),
        "fraction": fraction,
        "items_per_s": float(progress["items_per_s"]) if progress else None,
        "tokens_per_s": float(progress["tokens_per_s"]) if progress else None,
        "eta_s": eta_s,
        "busy_s": float(st.get("busy_s", 0.0)),
        "prompt_tokens": int(st.get("prompt_tokens", 0)),
        "completion_tokens": int(st.get("completion_tokens", 0)),
        "lease_expiries": int(st.get("lease_expiries", 0)),
        "oldest_pending_s": st.get("oldest_pending_s"),
        "cost": cost,
        "cost_to_finish": to_finish,
        "cost_per_gpu_hour": rate,
        "models": models,
        "remote_batches": st.get("remote_batches"),  # an openai_batch engine's, by state
        "starts_at": next_run if next_run > now else None,
        "windows": st.get("windows") or [],
    }


def _model_shares(
    st: dict[str, Any],
    prices: dict[str, tuple[str, float]],
    rate: float,
    token_prices: TokenPrices | None = None,
) -> dict[str, dict[str, Any]] | None:
    """Each model's share of a job of several (None for one), by the names and prices of its
    ``engines:`` (a pool of none: its own name, at the job's price)."""
    pools = st.get("pools") or {}
    if len(pools) < 2 and not prices:
        return None
    return model_shares(
        pools, {pool: prices.get(pool, (pool, rate)) for pool in pools}, token_prices
    )


async def _dead_letters(state: ServerState, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with_dead = [j["id"] for j in jobs if j["dead"]][:10]
    pages = await asyncio.gather(
        *(call(state.queue.dead_letters.remote(j, DEAD_LETTERS_PER_JOB, 0), 10) for j in with_dead),
        return_exceptions=True,
    )
    out = []
    for job_id, page in zip(with_dead, pages, strict=True):
        if isinstance(page, BaseException):
            continue
        for d in page:
            out.append(
                {
                    "job": job_id,
                    "custom_id": d["custom_id"],
                    "reason": d["reason"],
                    "error_kind": d["error_kind"],
                    "error_code": d["error_code"],
                    "message": (d["message"] or "")[:300],
                    "attempts": d["attempts"],
                    "last_attempt_at": d["last_attempt_at"],
                }
            )
    return out


def _ray_dashboard_url(request: Request) -> str | None:
    try:
        url = ray._private.worker.get_dashboard_url()
    except Exception:
        return None
    if not url:
        return None
    if not url.startswith("http"):
        url = "http://" + url
    host = request.url.hostname or "127.0.0.1"
    return url.replace("://0.0.0.0", f"://{host}")


def _order(job: dict[str, Any]) -> tuple[int, float]:
    active = job["status"] not in ("completed", "failed", "cancelled", "expired")
    return (0 if active else 1, -float(job["created_at"] or 0))


# ---------------------------------------------------------------------- routes
@router.get("/dashboard", summary="The dashboard (HTML)", include_in_schema=False)
async def dashboard() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", media_type="text/html", headers=_HEADERS)


@router.get("/dashboard/static/{name}", summary="The dashboard's files", include_in_schema=False)
async def static_file(name: str) -> FileResponse:
    path = STATIC / name
    if not _NAME.match(name) or not path.is_file():
        raise ApiError(404, f"No dashboard file {name!r}.", "name", "not_found")
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if name.endswith(".js"):
        media_type = "text/javascript"
    return FileResponse(path, media_type=media_type, headers=_HEADERS)


@router.get("/v1/dashboard/state", summary="Everything the dashboard shows, in one object")
async def dashboard_state(request: Request) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    obs = await observe(request)
    jobs = sorted(
        (
            _job_row(
                job_id,
                st,
                obs.records.get(job_id),
                obs.cost_per_gpu_hour[job_id],
                obs.models[job_id],
                obs.at,
                obs.token_prices[job_id],
            )
            for job_id, st in obs.stats.items()
        ),
        key=_order,
    )
    by_state = {s: 0 for s in ("pending", "waiting", "leased", "done", "dead")}
    by_priority: dict[str, int] = {}
    for st in obs.stats.values():
        for s in by_state:
            by_state[s] += int(st.get(s, 0))
        for priority, n in (st.get("pending_by_priority") or {}).items():
            by_priority[str(priority)] = by_priority.get(str(priority), 0) + int(n)
    return {
        "object": "dashboard.state",
        "at": obs.at,
        "jobs": jobs[:MAX_JOBS],
        "jobs_total": len(jobs),
        "queue": {"by_state": by_state, "by_priority": by_priority},
        "backlog": obs.snapshot.get("backlog", 0),
        "dead_letters": await _dead_letters(state, jobs[:MAX_JOBS]),
        "workers": obs.workers,
        "pools": obs.snapshot.get("pools", {}),
        "pool_errors": obs.snapshot.get("pool_errors", {}),
        "webhooks": obs.snapshot.get("webhooks", {}),
        "throughput": await call(state.controller.throughput.remote(), 10),
        "ray_dashboard_url": _ray_dashboard_url(request),
    }


async def _queue_job(state: ServerState, job_id: str) -> dict[str, Any]:
    """The job's queue stats; 404 when the queue has no such job."""
    try:
        return dict(await call(state.queue.stats.remote(job_id), 10))
    except ApiError as exc:
        if exc.status == 409:  # the queue's "unknown job"
            raise ApiError(
                404, f"No job found with id {job_id!r}.", "job_id", "not_found"
            ) from None
        raise


@router.post("/v1/jobs/{job_id}/redrive", summary="Send a job's dead letters back to pending")
async def redrive(request: Request, job_id: JobId) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    await _queue_job(state, job_id)
    n = int(await call(state.controller.redrive.remote(job_id)))
    state.jobs.pop(job_id, None)
    if n:
        state.controller.wake.remote()
    logger.info("redrive job=%s items=%d", job_id, n)
    return {"object": "job.redrive", "id": job_id, "redriven": n}


async def _set_state(request: Request, job_id: str, new: str) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    await _queue_job(state, job_id)
    await call(state.queue.set_job_state.remote(job_id, new), 10)
    state.controller.wake.remote()
    logger.info("job state job=%s state=%s", job_id, new)
    return {"object": "job.state", "id": job_id, "queue_state": new}


@router.post("/v1/jobs/{job_id}/pause", summary="Stop leasing a job's items (leased ones finish)")
async def pause(request: Request, job_id: JobId) -> dict[str, Any]:
    return await _set_state(request, job_id, "paused")


@router.post("/v1/jobs/{job_id}/resume", summary="Lease a paused job's items again")
async def resume(request: Request, job_id: JobId) -> dict[str, Any]:
    return await _set_state(request, job_id, "active")
