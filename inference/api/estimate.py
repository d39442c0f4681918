"""``POST /v1/jobs/estimate``: what a job would take, before it is created.

The input comes in the forms the API takes a job's items in: an uploaded batch file
(``input_file_id`` with its ``endpoint``, checked as ``POST /v1/batches`` checks it, the first
problem a 400 naming its line), or inline ``items`` as ``POST /v1/jobs/{job}/items`` takes them
(the same checks and 400s). ``config`` takes the settings ``POST /v1/jobs`` takes. The answer is
:func:`inference.estimate.estimate`'s, at the pool's workers now (at least one: an idle pool
starts one for a job) and at ``max_workers``, with the workers ``deadline`` needs.

Registered before the native routes: ``/v1/jobs/estimate`` is never a job id.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field, model_validator
from starlette.concurrency import run_in_threadpool

from inference.config import Config
from inference.errors import InputError
from inference.estimate import config_deadline_s, parse_deadline, server_estimate

from .batch_input import batch_items, check_batch_file
from .files import CHUNK_BYTES
from .http_errors import ApiError
from .models import BatchEndpoint, EnqueueRequest, ItemIn, JobConfig, Strict
from .native import _check_count, _checked_items, with_job_config
from .server import state_dir
from .state import ServerState, call

router = APIRouter(tags=["jobs"])


class EstimateRequest(Strict):
    input_file_id: str | None = Field(
        None, min_length=1, max_length=128, description="An uploaded file with purpose batch."
    )
    endpoint: BatchEndpoint | None = Field(
        None, description="With input_file_id: the endpoint every line calls."
    )
    items: list[ItemIn] | None = Field(
        None, min_length=1, description="Items as POST /v1/jobs/{job}/items takes them."
    )
    config: JobConfig | None = Field(None, description="Settings over the server's config.")
    deadline: str | None = Field(
        None,
        max_length=64,
        description="Finish within (90s, 45m, 2h, 1d) or by (ISO 8601): the workers it needs.",
    )
    workers: int | None = Field(
        None, ge=1, le=100_000, description="Workers now (default: the pool's, at least one)."
    )

    @model_validator(mode="after")
    def _one_input(self) -> EstimateRequest:
        if (self.input_file_id is None) == (self.items is None):
            raise ValueError("give input_file_id (with endpoint) or items, one of the two")
        if self.input_file_id is not None and self.endpoint is None:
            raise ValueError("endpoint: required with input_file_id")
        return self


@router.post("/v1/jobs/estimate", summary="Estimate a job: tokens, duration, cost, workers")
async def estimate_job(request: Request, body: EstimateRequest) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    config = with_job_config(state.config, body.config)
    now = time.time()
    try:
        deadline_s = (
            parse_deadline(body.deadline, now) if body.deadline else config_deadline_s(config, now)
        )
    except ValueError as exc:
        raise ApiError(400, f"deadline: {exc}", "deadline", "invalid_deadline") from None
    pools = (await state.refresh()).get("pools") or {}
    home = state_dir(config)
    if body.items is not None:
        _check_count(len(body.items), config.api.max_items_per_request)
        items = _checked_items(EnqueueRequest(items=body.items), config)
        pairs = [(it.pool, it.payload) for it in items]
        result = await run_in_threadpool(
            _estimate, config, pairs, home, pools, deadline_s, body.workers
        )
    else:
        assert body.input_file_id is not None and body.endpoint is not None
        result = await _estimate_file(
            state, body.input_file_id, body.endpoint, config, home, pools, deadline_s,
            body.workers,
        )  # fmt: skip
    return {"object": "job.estimate", **result}


def _estimate(
    config: Config,
    pairs: Iterable[tuple[str | None, str]],
    home: str,
    pools: dict[str, Any],
    deadline_s: float | None,
    workers: int | None,
) -> dict[str, Any]:
    try:
        return server_estimate(config, pairs, home, pools, deadline_s=deadline_s, workers=workers)
    except InputError as exc:
        raise ApiError(400, str(exc), None, "invalid_input") from None


async def _estimate_file(
    state: ServerState,
    file_id: str,
    endpoint: str,
    config: Config,
    home: str,
    pools: dict[str, Any],
    deadline_s: float | None,
    workers: int | None,
) -> dict[str, Any]:
    """The uploaded file copied here from the Controller's store (it may be on another node),
    checked as a batch's file, then estimated."""
    doc = await call(state.controller.file.remote(file_id))
    if doc["purpose"] != "batch":
        raise ApiError(
            400,
            f"file {file_id} has purpose {doc['purpose']!r}; an estimate needs 'batch'",
            "input_file_id",
            "invalid_file_purpose",
        )
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as tmp:
        offset, size = 0, int(doc["bytes"])
        while offset < size:
            data = await call(state.controller.read_file.remote(file_id, offset, CHUNK_BYTES))
            if not data:
                break
            tmp.write(data)
            offset += len(data)
        tmp.flush()
        path = Path(tmp.name)
        check = await run_in_threadpool(check_batch_file, path, endpoint, config)
        if check.errors:
            first = check.errors[0]
            where = f"line {first['line']}: " if first.get("line") else ""
            more = f" ({check.error_count} problems in all)" if check.error_count > 1 else ""
            raise ApiError(
                400,
                f"file {file_id}: {where}{first['message']}{more}",
                first.get("param") or "input_file_id",
                first["code"],
            )

        def pairs() -> Iterator[tuple[str | None, str]]:
            for chunk, _ in batch_items(path, endpoint, config):
                for it in chunk:
                    yield it.pool, it.payload

        return await run_in_threadpool(_estimate, config, pairs(), home, pools, deadline_s, workers)
