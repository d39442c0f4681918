"""``/v1/batches``: OpenAI's Batch API (create, retrieve, list, cancel) over the Controller.

Creating a batch passes the same backlog cap as a native enqueue (429 with ``Retry-After``,
counting the file's requests) and the cap on open jobs (``api.max_open_jobs``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from .models import BatchCreate
from .state import ServerState, call
from .views import batch_object, page

router = APIRouter(tags=["batches"])
BatchId = Annotated[str, Path(max_length=128, description="A batch id (batch_...).")]


@router.post("/v1/batches", summary="Create a batch from an uploaded file")
async def create_batch(request: Request, body: BatchCreate) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    # The backlog cap of native enqueues holds for batches too, before anything is created.
    requests = int(await call(state.controller.file_requests.remote(body.input_file_id)))
    await state.check_backlog(requests)
    rec = await call(
        state.controller.create_batch.remote(
            body.input_file_id,
            body.endpoint,
            body.completion_window,
            body.metadata,
            state.config.stored(),
            state.config.output.path,
            max_open_jobs=state.config.api.max_open_jobs,
            output_expires_after_s=expiry.seconds
            if (expiry := body.output_expires_after)
            else None,
        )
    )
    state.accepted_since_snapshot += requests  # the loop enqueues them within a tick
    return batch_object(rec)


@router.get("/v1/batches/{batch_id}", summary="Retrieve a batch")
async def retrieve_batch(request: Request, batch_id: BatchId) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    return batch_object(await call(state.controller.batch.remote(batch_id)))


@router.get("/v1/batches", summary="List batches, newest first")
async def list_batches(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    after: Annotated[
        str | None, Query(max_length=128, description="The last id of the previous page.")
    ] = None,
) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    recs, has_more = await call(state.controller.batches.remote(limit, after))
    return page([batch_object(r) for r in recs], has_more)


@router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch (results are kept)")
async def cancel_batch(request: Request, batch_id: BatchId) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    return batch_object(await call(state.controller.cancel_batch.remote(batch_id)))
