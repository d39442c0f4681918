"""``GET /v1/jobs/{job}/results``: a job's committed results as JSONL while it runs.

Each call answers the results committed since the reader's cursor (``after``), whole shards in
the order of their numbers, as OpenAI batch output lines (each in the shape of its item's
endpoint), and says in headers where the reader now stands::

    inference-cursor: 12.14          the ``after`` of the next call
    inference-job-status: running    the job's status when the call began
    inference-complete: false        true once the job is settled and everything is read

A reader follows a job to its end by calling with the last cursor until ``inference-complete``
is ``true``, and gets every completed item exactly once (a native job that takes more items
later continues from the same cursor). ``wait_s`` holds a call open until something commits.
Dead letters are not results: they are in the job's error file and per item.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from inference.results import Cursor, advance, shard_jsonl
from inference.shards import JobOutput

from .http_errors import ApiError
from .models import ID_PATTERN
from .state import ServerState, call

router = APIRouter(tags=["jobs"])
JobId = Annotated[str, Path(pattern=ID_PATTERN, description="The job's id.")]
SETTLED = ("completed", "failed", "cancelled", "expired")


@router.get(
    "/v1/jobs/{job_id}/results",
    summary="Committed results since a cursor, as JSONL (follow a running job)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/jsonl": {}}}},
)
async def job_results(
    request: Request,
    job_id: JobId,
    after: Annotated[
        str | None,
        Query(max_length=65536, description="The inference-cursor of the previous call."),
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=1_000_000, description="About this many results at most.")
    ] = 10_000,
    wait_s: Annotated[
        float, Query(ge=0, le=3600, description="Wait up to this long for new results.")
    ] = 0.0,
) -> StreamingResponse:
    state: ServerState = request.app.state.inference
    await state.job_info(job_id)  # 404 for a job this server does not know
    try:
        cursor = Cursor.decode(after)
    except ValueError as exc:
        raise ApiError(400, str(exc), "after", "invalid_cursor") from None
    spec = await state.job_spec(job_id)
    output = JobOutput(
        spec.settings["output_path"], job_id, spec.settings.get("output_format", "parquet")
    )
    deadline = time.monotonic() + min(wait_s, state.config.api.max_wait_s)
    delay_s = 0.05
    while True:
        # The status first: a job settled by then has every shard committed by the read below.
        brief = await call(state.controller.job_brief.remote(job_id))
        status = brief["status"] if brief else "unknown"
        shards = await call(state.queue.shards_from.remote(job_id, cursor.low))
        given, following = advance(cursor, shards, limit)
        if given or time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(delay_s, max(0.0, deadline - time.monotonic())))
        delay_s = min(delay_s * 1.5, 0.5)
    left = [s for s in shards if s["n"] not in cursor.seen and s not in given]
    complete = status in SETTLED and not left
    endpoint = brief.get("endpoint") if brief else None  # a batch's; a job's rows say theirs

    async def body() -> AsyncIterator[bytes]:
        for shard in given:
            yield await run_in_threadpool(shard_jsonl, output.fs, str(shard["path"]), endpoint)

    return StreamingResponse(
        body(),
        media_type="application/jsonl",
        headers={
            "inference-cursor": following.encode(),
            "inference-job-status": status,
            "inference-complete": "true" if complete else "false",
        },
    )
