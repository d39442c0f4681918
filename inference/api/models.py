"""Strict request models of the HTTP API: unknown fields are refused, every field described.

Response bodies follow OpenAI's objects (see :mod:`.views`); the models here that describe them
exist for the OpenAPI document.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inference.schedule import parse_window
from inference.schema import CUSTOM_ID

ID_PATTERN = CUSTOM_ID.pattern
URGENT_PRIORITY = 9


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if len(value) > 16:
        raise ValueError("at most 16 key-value pairs")
    for key, item in value.items():
        if len(key) > 64:
            raise ValueError(f"key {key[:20]!r}... is longer than 64 characters")
        if len(item) > 512:
            raise ValueError(f"value of {key!r} is longer than 512 characters")
    return value


Metadata = dict[str, str]


# ---------------------------------------------------------------------------- OpenAI batches
class OutputExpiresAfter(Strict):
    anchor: Literal["created_at"] = Field(description="What the expiry counts from.")
    seconds: int = Field(ge=3600, le=2_592_000, description="Seconds the output files are kept.")


BatchEndpoint = Literal[
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"
]  # the endpoints a batch file's lines may call


class BatchCreate(Strict):
    input_file_id: str = Field(
        min_length=1, max_length=128, description="An uploaded file with purpose batch."
    )
    endpoint: BatchEndpoint = Field(description="The endpoint every line of the file calls.")
    completion_window: str = Field(
        pattern=r"^[1-9]\d{0,6}[smhd]$",
        description="Time to finish, e.g. '24h' (OpenAI's only value); here 1s to 30d.",
    )
    metadata: Metadata | None = Field(
        None, description="Up to 16 pairs; keys up to 64 characters, values up to 512."
    )
    output_expires_after: OutputExpiresAfter | None = Field(
        None,
        description="When the output and error files are deleted: seconds after the batch's"
        " creation (kept until deleted without it).",
    )

    _metadata = field_validator("metadata")(_check_metadata)


# ---------------------------------------------------------------------------- native jobs
class QueueOverrides(Strict):
    priority: int | None = Field(None, ge=0, le=9, description="Priority class: higher first.")
    max_attempts: int | None = Field(None, ge=1, le=100, description="Attempts before dead letter.")
    backoff_base_s: float | None = Field(None, ge=0, le=3600, description="Retry backoff base.")
    backoff_max_s: float | None = Field(None, ge=0, le=86400, description="Retry backoff cap.")


class OutputOverrides(Strict):
    rows_per_shard: int | None = Field(None, ge=1, le=1_000_000, description="Rows per shard.")
    max_shard_age_s: float | None = Field(
        None, gt=0, le=86400, description="Commit a shard whose rows are older than this."
    )


class ScheduleOverrides(Strict):
    not_before: datetime | None = Field(None, description="Items are not leased before this.")
    windows: list[str] | None = Field(
        None,
        max_length=24,
        description="Daily run windows 'HH:MM-HH:MM' (e.g. '22:00-06:00'); leased only inside.",
    )
    timezone: str | None = Field(None, max_length=64, description="IANA zone of the windows.")

    @field_validator("windows")
    @classmethod
    def _windows(cls, windows: list[str] | None) -> list[str] | None:
        for text in windows or []:
            parse_window(text)
        return windows


class JobConfig(Strict):
    """What a job created over HTTP may set; the engine, scaling, output location and API
    settings are the server's."""

    queue: QueueOverrides | None = Field(None, description="Queue semantics of the job.")
    output: OutputOverrides | None = Field(None, description="Shard sizes of the job.")
    schedule: ScheduleOverrides | None = Field(None, description="When the job may run.")


class JobCreate(Strict):
    job_id: str | None = Field(
        None, pattern=ID_PATTERN, description="Job id; generated when absent. Unique."
    )
    config: JobConfig | None = Field(None, description="Settings over the server's config.")
    completion_window: str | None = Field(
        None,
        pattern=r"^[1-9]\d{0,6}[smhd]$",
        description="Items not done in this time expire (dead letters with batch_expired).",
    )
    metadata: Metadata | None = Field(None, description="Up to 16 string pairs.")

    _metadata = field_validator("metadata")(_check_metadata)

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, value: str | None) -> str | None:
        if value in (".", ".."):  # the pattern's characters, but not a folder of its own
            raise ValueError(f"{value!r} is not a job id: it names no folder of its own")
        return value


class ItemIn(Strict):
    custom_id: str = Field(pattern=ID_PATTERN, description="The item's id, unique in its job.")
    method: Literal["POST"] = Field("POST", description="Always POST (as in a batch file).")
    url: str = Field(
        description="/v1/chat/completions, /v1/completions, /v1/embeddings or /v1/responses.",
        max_length=64,
    )
    body: dict[str, Any] = Field(description="The request body, as OpenAI's API takes it.")
    urgent: bool = Field(
        False, description="Enqueue at the top priority (and wait on it with wait_s)."
    )
    priority: int | None = Field(
        None, ge=0, le=9, description="Priority class of this item; default the job's."
    )


class EnqueueRequest(Strict):
    items: list[ItemIn] = Field(min_length=1, description="One or more items.")


class ItemStatus(Strict):
    custom_id: str = Field(description="The item's id.")
    status: Literal["accepted", "duplicate"] = Field(
        description="accepted: new and durable; duplicate: the job held it already."
    )


class EnqueueResponse(Strict):
    object: Literal["list"] = "list"
    data: list[ItemStatus] = Field(description="One entry per item, in request order.")
    accepted: int = Field(description="Items new to the job.")
    duplicates: int = Field(description="Items the job held already.")
