"""Native jobs: create a job, enqueue items into it (one or many, idempotent on ``custom_id``),
read its state, and read one item (waiting for it with ``wait_s``: the urgent lane).

``POST /v1/jobs/{job}/items`` is the hot path: a scan of the bytes that counts the items (a body
over ``api.max_items_per_request`` is refused before any model is built), one JSON parse straight
into the strict model, the project's parser for each body (an item over ``queue.max_item_bytes``
is 413, naming it), then one ``WorkQueue.enqueue`` call, which returns only once the items are
durable. A refused item refuses the whole request: nothing of it is enqueued.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from inference.config import Config
from inference.errors import ConfigError
from inference.export import error_line, find_result, output_line
from inference.queue import NewItem
from inference.shards import JobOutput

from .http_errors import ApiError, validation_error
from .items import ItemRejected, check_item, oversized, route
from .models import (
    ID_PATTERN,
    URGENT_PRIORITY,
    EnqueueRequest,
    EnqueueResponse,
    JobConfig,
    JobCreate,
)
from .state import ServerState, call
from .views import job_object, page

router = APIRouter(tags=["jobs"])
JobId = Annotated[str, Path(pattern=ID_PATTERN, description="The job's id.")]
CustomId = Annotated[str, Path(pattern=ID_PATTERN, description="The item's custom_id.")]
INLINE_BYTES = 64 << 10  # bodies up to this size are parsed on the event loop
_CUSTOM_ID_KEY = re.compile(rb'"custom_id"\s*:')
_ITEM_STATUS = {"pending": "pending", "leased": "running", "done": "completed", "dead": "failed"}


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` inlined (for ``openapi_extra``)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return dict(walk(schema))


_ENQUEUE_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _inline(EnqueueRequest.model_json_schema())}},
    }
}


def with_job_config(config: Config, overrides: JobConfig | None) -> Config:
    """The server's config with a request's ``config`` settings over it (``POST /v1/jobs``,
    ``POST /v1/jobs/estimate``); values each field accepts alone but refused together are a
    400 naming ``config``."""
    if overrides is None:
        return config
    try:
        return config.with_updates(**overrides.model_dump(exclude_none=True))
    except ConfigError as exc:
        raise ApiError(400, str(exc), "config", "invalid_config") from None


@router.post("/v1/jobs", summary="Create a job (the server's engine; queue settings may vary)")
async def create_job(request: Request, body: JobCreate) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    config = with_job_config(state.config, body.config)
    rec = await call(
        state.controller.create_job.remote(
            body.job_id,
            config.stored(),
            state.config.output.path,
            body.metadata,
            body.completion_window,
            max_open_jobs=state.config.api.max_open_jobs,
        )
    )
    return job_object(rec)


@router.get("/v1/jobs", summary="List jobs, newest first")
async def list_jobs(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=128)] = None,
) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    recs, has_more = await call(state.controller.jobs.remote(limit, after))
    return page([job_object(r) for r in recs], has_more)


@router.get("/v1/jobs/{job_id}", summary="A job's state and progress")
async def retrieve_job(request: Request, job_id: JobId) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    return job_object(await call(state.controller.job.remote(job_id)))


@router.post("/v1/jobs/{job_id}/cancel", summary="Cancel a job (results are kept)")
async def cancel_job(request: Request, job_id: JobId) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    state.jobs.pop(job_id, None)
    return job_object(await call(state.controller.cancel_job.remote(job_id)))


@router.post(
    "/v1/jobs/{job_id}/items",
    summary="Enqueue items (durable before the reply; idempotent on custom_id)",
    openapi_extra=_ENQUEUE_BODY,
    response_model=EnqueueResponse,
)
async def enqueue_items(request: Request, job_id: JobId) -> Response:
    state: ServerState = request.app.state.inference
    api = state.config.api
    raw = await request.body()
    if len(raw) > INLINE_BYTES:  # a big body: parse off the event loop, others keep moving
        payload = await run_in_threadpool(_parse, raw, api.max_items_per_request)
    else:
        payload = _parse(raw, api.max_items_per_request)
    _check_count(len(payload.items), api.max_items_per_request)  # keys escaped past the scan
    job = await state.native_job(job_id)
    await state.check_backlog(len(payload.items))
    if len(raw) > INLINE_BYTES:
        items = await run_in_threadpool(_checked_items, payload, state.config)
    else:
        items = _checked_items(payload, state.config)
    statuses = await state.coalescer.enqueue(job_id, items)
    accepted = statuses.count("accepted")
    state.accepted_since_snapshot += accepted
    if accepted:
        state.wake_controller(job)
    data = [{"custom_id": it.item_id, "status": st} for it, st in zip(items, statuses, strict=True)]
    reply = {
        "object": "list",
        "data": data,
        "accepted": accepted,
        "duplicates": len(data) - accepted,
    }
    return Response(json.dumps(reply, separators=(",", ":")), media_type="application/json")


def _parse(raw: bytes, max_items: int) -> EnqueueRequest:
    """The body as the strict model, once its items are known to be within the cap: a scan
    of the bytes counts them first (every item has a ``custom_id`` key), and only a body the
    scan finds over the cap is parsed to be sure (plain JSON, no models), then refused."""
    if len(_CUSTOM_ID_KEY.findall(raw)) > max_items:
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        items = data.get("items") if isinstance(data, dict) else None
        if isinstance(items, list):
            _check_count(len(items), max_items)
    try:
        return EnqueueRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error([dict(e) for e in exc.errors(include_url=False)]) from None


def _check_count(count: int, max_items: int) -> None:
    if count > max_items:
        raise ApiError(
            400,
            f"items: at most {max_items} items per request, got {count}",
            "items",
            "too_many_items",
        )


def _checked_items(payload: EnqueueRequest, config: Config) -> list[NewItem]:
    """Every item through the project's parser and the caps, and to the pool of its model;
    the first bad one refuses all."""
    items: list[NewItem] = []
    for i, item in enumerate(payload.items):
        try:
            checked = check_item(item.url, item.body, config.api)
            pool = route(config, checked.model)
        except ItemRejected as exc:
            param = f"items[{i}].{exc.param}" if exc.param else f"items[{i}]"
            raise ApiError(
                400, f"{param} ({item.custom_id}): {exc.message}", param, exc.code
            ) from None
        if oversized(checked.payload, config.queue.max_item_bytes):
            raise ApiError(
                413,
                f"items[{i}] ({item.custom_id}): the item is larger than "
                f"{config.queue.max_item_bytes} bytes (queue.max_item_bytes)",
                f"items[{i}]",
                "item_too_large",
            )
        priority = URGENT_PRIORITY if item.urgent else item.priority
        items.append(NewItem(item.custom_id, checked.payload, checked.tokens, priority, pool))
    return items


@router.get(
    "/v1/jobs/{job_id}/items/{custom_id}",
    summary="One item's state and result; wait_s waits for it to finish",
)
async def retrieve_item(
    request: Request,
    job_id: JobId,
    custom_id: CustomId,
    wait_s: Annotated[
        float, Query(ge=0, le=3600, description="Wait up to this long for the item to finish.")
    ] = 0.0,
) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    info = await state.job_info(job_id)
    deadline = time.monotonic() + min(wait_s, state.config.api.max_wait_s)
    delay_s = 0.01
    while True:
        item = await call(state.queue.item.remote(job_id, custom_id))
        if item is None:
            raise ApiError(
                404, f"No item {custom_id!r} in job {job_id!r}.", "custom_id", "not_found"
            )
        if item["state"] in ("done", "dead") or time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(delay_s, max(0.0, deadline - time.monotonic())))
        delay_s = min(delay_s * 1.5, 0.25)
    out: dict[str, Any] = {
        "object": "job.item",
        "job_id": job_id,
        "custom_id": custom_id,
        "status": _ITEM_STATUS.get(item["state"], item["state"]),
        "attempts": item["attempts"],
        "response": None,
        "error": None,
    }
    if item["state"] == "done":
        spec = await state.job_spec(job_id)
        output = JobOutput(
            spec.settings["output_path"], job_id, spec.settings.get("output_format", "parquet")
        )
        path = await state.shard_path(job_id, int(item["shard"]))
        row = (
            None if path is None else await run_in_threadpool(find_result, output, path, custom_id)
        )
        if row is not None:
            out.update(output_line(row, item.get("url")))
    elif item["state"] == "dead":
        dead = {
            "job_id": job_id,
            "custom_id": custom_id,
            "error_kind": item["error_kind"],
            "error_code": item["error_code"],
            "message": item["message"],
        }
        out.update(error_line(dead, info.get("end_reason")))
    return out
