"""``/v1/batches``: OpenAI's Batch API (create, retrieve, list, cancel) over the Controller."""

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
    rec = await call(
        state.controller.create_batch.remote(
            body.input_file_id,
            body.endpoint,
            body.completion_window,
            body.metadata,
            state.config.model_dump(mode="json"),
            state.config.output.path,
        )
    )
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
