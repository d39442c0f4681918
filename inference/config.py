"""Typed job and service configuration, loaded from YAML.

One root :class:`Config`; each component receives only its own section. Unknown keys are errors,
and a bad file fails with the field path and the reason before any work starts.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inference.errors import ConfigError
from inference.schedule import parse_window

logger = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")


class LoraConfig(_Section):
    """LoRA adapters served per request by the vLLM engine: an item whose ``body.model`` names
    an adapter runs with it."""

    adapters: dict[str, str] = Field(
        description="Adapter name (what body.model says) -> local folder of a PEFT LoRA adapter "
        "(adapter_config.json and weights); a relative folder not found from the working "
        "directory is looked up under models/. Checked when the engine starts.",
        min_length=1,
    )
    max_loras: int = Field(
        4, ge=1, le=256, description="Most distinct adapters in one engine step (vLLM max_loras)."
    )
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        16, description="Highest adapter rank r served (vLLM max_lora_rank; one of its sizes)."
    )

    @model_validator(mode="after")
    def _check_names(self) -> LoraConfig:
        for name, folder in self.adapters.items():
            if not _ADAPTER_NAME.match(name):
                raise ValueError(f"adapter name {name!r}: use 1-128 letters, digits and . _ : / -")
            if not folder.strip():
                raise ValueError(f"adapter {name!r}: the folder is empty")
        return self


class RemoteBatchConfig(_Section):
    """How ``engine.kind: openai_batch`` cuts a job into provider batches."""

    max_lines: int = Field(
        50_000, ge=1, le=50_000, description="Most request lines in one provider batch."
    )
    max_bytes: int = Field(
        200_000_000,
        ge=1024,
        le=200_000_000,
        description="Largest input file of one provider batch, in bytes.",
    )
    window_s: float = Field(
        5.0,
        ge=0,
        description="Wait this long for more items before a partial batch is submitted.",
    )
    poll_s: float = Field(30.0, gt=0, description="How often open provider batches are polled.")
    completion_window: str = Field("24h", description="The provider's completion_window.")
    max_open: int = Field(
        4, ge=1, le=64, description="Provider batches one worker keeps open at a time."
    )


class EngineConfig(_Section):
    kind: Literal["transformers", "vllm", "openai", "openai_batch"] = Field(
        "transformers",
        description="Engine implementation: vllm (GPUs, or its CPU build), transformers "
        "anywhere, openai (any OpenAI-compatible endpoint, request by request), openai_batch "
        "(a provider's Batch API).",
    )
    model: str = Field(
        "tiny-llama",
        description="A bundled model name (tiny-llama, all-minilm-l6-v2) or a local model "
        "folder; for a remote engine, the provider's model name.",
    )
    base_url: str | None = Field(
        None,
        description="Remote engines: the API root, e.g. https://api.openai.com/v1 (an "
        "OpenAI-compatible server: vLLM, LiteLLM, a provider).",
    )
    api_key_env: str | None = Field(
        None,
        description="Remote engines: the name of the environment variable that holds the API "
        "key on the workers (the key itself is never in a config or a record).",
    )
    concurrency: int = Field(
        32, ge=1, le=4096, description="Remote engines: requests one worker keeps in flight."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="Remote engines: longest wait for one response."
    )
    max_retries: int = Field(
        5,
        ge=0,
        le=100,
        description="Remote engines: retries of a transient failure (429, 408, 5xx, timeout, "
        "connection reset) in place, with backoff, before the item goes back to the queue "
        "(an attempt charged).",
    )
    retry_base_s: float = Field(0.5, ge=0, description="Remote engines: first retry backoff.")
    retry_max_s: float = Field(30.0, ge=0, description="Remote engines: longest retry backoff.")
    input_price_per_mtok: float = Field(
        0.0, ge=0, description="Remote engines: price of a million prompt tokens."
    )
    output_price_per_mtok: float = Field(
        0.0, ge=0, description="Remote engines: price of a million completion tokens."
    )
    batch_discount: float = Field(
        0.5,
        ge=0,
        le=1,
        description="openai_batch: the provider's discount on batch traffic (0.5 is half price).",
    )
    batch: RemoteBatchConfig = Field(
        RemoteBatchConfig(), description="openai_batch: how the job is cut into batches."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the transformers engine runs; auto picks cuda when present."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto is float32 on CPU and bfloat16 on CUDA."
    )
    threads: int = Field(
        1, ge=1, le=256, description="torch threads per CPU worker (match the worker's num_cpus)."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context length; defaults to the model's own."
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        le=64,
        description="vLLM: split the model over this many GPUs (tensor parallel ranks). A "
        "worker holds tensor_parallel_size x pipeline_parallel_size GPUs in one Ray placement "
        "group (scaling.gpus_per_worker must say so), or as many cores on CPUs.",
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, le=64, description="vLLM: pipeline parallel stages (each of tensor ranks)."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments passed to the engine: vllm.LLM(...) for vLLM "
        "(enforce_eager, kv_cache_memory_bytes, max_num_seqs, gpu_memory_utilization, ...).",
    )
    schema_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="vLLM: longest compile of one response_format JSON schema; an item whose "
        "schema takes longer is dead-lettered (code schema_timeout), the engine never waits.",
    )
    served_name: str | None = Field(
        None,
        description="One more name body.model may give this model (an entry of engines: "
        "is served under its name).",
    )
    lora: LoraConfig | None = Field(
        None,
        description="vLLM: LoRA adapters served per request (body.model names the adapter); "
        "none by default.",
    )

    @property
    def base_names(self) -> tuple[str, ...]:
        """The names body.model may give the base model: engine.model, its folder's name, and
        the name of its ``engines:`` entry."""
        names = [
            self.model,
            Path(self.model).name,
            *([self.served_name] if self.served_name else []),
        ]
        return tuple(dict.fromkeys(names))

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name this engine serves: the base model's, then its adapters'."""
        adapters = tuple(self.lora.adapters) if self.lora is not None else ()
        return self.base_names + adapters

    @model_validator(mode="after")
    def _check_lora(self) -> EngineConfig:
        if self.lora is None:
            return self
        if self.kind != "vllm":
            raise ValueError(f"lora: LoRA adapters are served by engine.kind vllm, not {self.kind}")
        clash = sorted(set(self.lora.adapters) & set(self.base_names))
        if clash:
            raise ValueError(
                f"lora.adapters: {', '.join(map(repr, clash))} is the base model's name; "
                "name the adapter otherwise"
            )
        return self

    @property
    def remote(self) -> bool:
        """The model runs elsewhere (an API), not on this worker's devices."""
        return self.kind in ("openai", "openai_batch")

    @model_validator(mode="after")
    def _check_remote(self) -> EngineConfig:
        if self.remote:
            if not self.base_url:
                raise ValueError(f"base_url: engine.kind {self.kind} needs the API's base_url")
            if not self.base_url.startswith(("http://", "https://")):
                raise ValueError(f"base_url: {self.base_url!r} is not an http(s) URL")
        elif self.base_url or self.api_key_env:
            raise ValueError(
                f"base_url/api_key_env: engine.kind {self.kind} runs the model here; they are "
                "for engine.kind openai or openai_batch"
            )
        if self.api_key_env is not None and not re.fullmatch(
            r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env
        ):
            raise ValueError(
                f"api_key_env: {self.api_key_env!r} is not an environment variable name (give "
                "the variable's name, never the key)"
            )
        return self

    @property
    def world_size(self) -> int:
        """Ranks of one engine: tensor x pipeline parallel (GPUs of a multi-GPU worker)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @model_validator(mode="after")
    def _check_parallel(self) -> EngineConfig:
        for key in ("tensor_parallel_size", "pipeline_parallel_size"):
            if key in self.options:
                raise ValueError(
                    f"options.{key}: set engine.{key} instead (workers, their placement "
                    "groups and the scaler are sized from it)"
                )
        if self.world_size > 1 and self.kind != "vllm":
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} x pipeline_parallel_size "
                f"{self.pipeline_parallel_size}: a model split over several devices runs on "
                f"engine.kind vllm, not {self.kind}"
            )
        return self


def check_parallel(
    engine: EngineConfig,
    scaling: ScalingConfig,
    engine_path: str = "engine",
    scaling_path: str = "scaling",
) -> None:
    """A worker of a multi-GPU engine holds one GPU per rank: ``scaling.gpus_per_worker`` is
    ``tensor_parallel_size x pipeline_parallel_size``, or 0 to run the ranks on CPUs (vLLM's
    CPU build, cores of their own for each rank). The paths name the sections in the error (an
    entry of ``engines:``). Raises ValueError."""
    world = engine.world_size
    if world == 1:
        return
    ranks = f"{engine_path}.tensor_parallel_size x pipeline_parallel_size is {world}"
    gpus, cpus = scaling.gpus_per_worker, scaling.cpus_per_worker
    if gpus > 0 and gpus != world:
        raise ValueError(
            f"{scaling_path}.gpus_per_worker is {gpus:g} but {ranks}: a multi-GPU worker holds "
            f"one GPU per rank, so set gpus_per_worker: {world} (or 0 to run the ranks on CPUs)"
        )
    if gpus == 0 and cpus < world:
        raise ValueError(
            f"{scaling_path}.cpus_per_worker is {cpus:g} but {ranks} and the ranks run on CPUs "
            f"(gpus_per_worker 0): vLLM's CPU build binds each rank to cores of its own, so "
            f"give the worker at least {world} (or set gpus_per_worker: {world} on GPUs)"
        )


class BatchingConfig(_Section):
    max_batch_size: int = Field(64, ge=1, le=4096, description="Most items in one forward pass.")
    max_batch_tokens: int = Field(
        16384,
        ge=16,
        description="Token budget of one forward pass: rows x (longest prompt + max_tokens).",
    )
    max_wait_ms: int = Field(
        20, ge=0, le=60_000, description="Longest wait for a fuller batch before running a partial."
    )
    pack_items: int = Field(
        1,
        ge=1,
        le=64,
        description="Put this many short chat items into one prompt with numbered answers "
        "(classification-style jobs); unparsable answers fall back to one item per prompt.",
    )
    prefetch_batches: int = Field(
        2, ge=1, le=16, description="Batches a worker keeps leased ahead of the engine."
    )


class LimitsConfig(_Section):
    """Rate limits of a remote engine's API, held for the whole cluster by one limiter."""

    requests_per_minute: float | None = Field(
        None, gt=0, description="Requests per minute all workers together may send."
    )
    tokens_per_minute: float | None = Field(
        None,
        gt=0,
        description="Tokens per minute (prompt estimate + max_tokens, corrected from usage).",
    )
    burst_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="The bucket holds this many seconds of the rate: the most sent at once "
        "after an idle spell.",
    )
    share: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of the limits (and of what the provider reports remaining) this "
        "batch traffic may use; the rest stays free for online traffic on the same key.",
    )
    key: str | None = Field(
        None,
        description="Which limiter: workers and jobs with the same key share one budget "
        "(default: the engine's base_url and model).",
    )


class QueueConfig(_Section):
    lease_s: float = Field(60.0, gt=0, description="Visibility timeout of a lease, in seconds.")
    max_attempts: int = Field(3, ge=1, le=100, description="Attempts before an item dead-letters.")
    backoff_base_s: float = Field(1.0, ge=0, description="Base of the exponential retry backoff.")
    backoff_max_s: float = Field(60.0, ge=0, description="Cap of the retry backoff.")
    priority: int = Field(0, ge=0, le=9, description="Priority class of the job: higher first.")
    db_path: str | None = Field(
        None,
        description="SQLite file of the WorkQueue; default <output>/_queue/queue.sqlite for a "
        "local output path.",
    )
    max_item_bytes: int = Field(
        1_000_000, ge=256, description="Largest accepted item payload (JSON bytes)."
    )
    url: str | None = Field(
        None,
        description="PostgreSQL queue instead of the SQLite file: postgresql://user@host/db "
        "(libpq's URL; the password from PGPASSWORD, ~/.pgpass or a service file, never the "
        "URL). The queue's state then lives off the cluster: its actor may run on any node, "
        "and a lost head node loses nothing.",
    )
    shared: bool = Field(
        False,
        description="With url: this cluster's WorkQueue shares the database with other "
        "clusters' (every one with shared: true); they drain the same jobs together, exactly "
        "once. Off: one WorkQueue owns the database.",
    )

    @model_validator(mode="after")
    def _one_database(self) -> QueueConfig:
        if self.url is None:
            if self.shared:
                raise ValueError("shared needs url: only a PostgreSQL queue can be shared")
            return self
        from inference.queue.pg import check_url, is_postgres_url

        if not is_postgres_url(self.url):
            raise ValueError("url must start with postgresql:// (or postgres://)")
        if self.db_path is not None:
            raise ValueError("give db_path (SQLite) or url (PostgreSQL), not both")
        try:
            check_url(self.url)
        except Exception as exc:
            raise ValueError(str(exc)) from None
        return self


class OutputConfig(_Section):
    path: str = Field("output", description="Output root: a local folder or a pyarrow.fs URI.")
    format: Literal["parquet", "arrow"] = Field("parquet", description="Shard file format.")
    rows_per_shard: int = Field(1000, ge=1, description="Rows at which a shard is committed.")
    max_shard_age_s: float = Field(
        30.0, gt=0, description="A shard with rows older than this is committed anyway."
    )


class ScalingConfig(_Section):
    min_workers: int = Field(0, ge=0, description="Workers kept even when the queue is empty.")
    max_workers: int = Field(
        0, ge=0, description="Most workers; 0 means one per CPU (or GPU) of the cluster."
    )
    target_drain_s: float = Field(3600.0, gt=0, description="Aim to drain the backlog this fast.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker; 0 runs on CPUs.")
    cpus_per_worker: float = Field(1.0, ge=0, description="CPUs reserved per worker.")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK",
        description="Ray placement group strategy of a multi-GPU worker's GPU bundles (engine."
        "tensor_parallel_size x pipeline_parallel_size > 1); STRICT_PACK keeps its ranks on "
        "one node.",
    )
    cost_per_gpu_hour: float = Field(
        0.0, ge=0, description="Price of one worker-hour (GPU or CPU slot), for cost reports."
    )
    mode: Literal["fixed", "autoscale"] = Field(
        "fixed",
        description="fixed: start the workers up front (max_workers, or one per slot of the "
        "cluster); autoscale: size the pool from the backlog between min_workers and "
        "max_workers, asking Ray's autoscaler for the nodes.",
    )
    cost_ceiling_per_hour: float | None = Field(
        None,
        gt=0,
        description="Most the pool may cost per hour (workers x cost_per_gpu_hour x "
        "gpus_per_worker); caps the worker count below max_workers.",
    )
    deadline: datetime | None = Field(
        None,
        description="The job should be finished by then (ISO 8601; UTC when no offset); the "
        "scaler sizes for it and reports the job at risk when max_workers cannot make it.",
    )
    assumed_tokens_per_s: float = Field(
        0.0,
        ge=0,
        description="Tokens per second one worker is assumed to do until its throughput has "
        "been measured; 0 starts one worker and measures before sizing the pool.",
    )
    cooldown_s: float = Field(
        60.0,
        ge=0,
        description="Least time after any change of the worker count before workers are "
        "drained again; adding workers is never delayed.",
    )
    hysteresis: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Relative band around the current worker count in which the scaler holds: "
        "it adds workers above count x (1 + hysteresis), drains below count x (1 - hysteresis).",
    )
    idle_timeout_s: float = Field(
        300.0,
        ge=0,
        description="Seconds the pool's queue must stay empty before it drains to min_workers "
        "(0 with min_workers 0 gives the nodes back at once).",
    )
    drain_timeout_s: float = Field(
        120.0,
        gt=0,
        description="A draining worker that has not finished what it holds by then hands the "
        "rest back to the queue (no attempt charged) and exits.",
    )
    interval_s: float = Field(
        5.0, gt=0, le=300, description="How often the scaler looks at the queue, in seconds."
    )
    overflow: EngineConfig | None = Field(
        None,
        description="A remote engine (kind openai or openai_batch) for what the pool cannot "
        "finish by a job's deadline even at max_workers: that excess of pending items is "
        "routed to it, and back when the pool catches up. Needs mode: autoscale.",
    )
    overflow_workers: int = Field(
        1, ge=1, le=256, description="Most workers of the overflow pool (remote clients)."
    )
    overflow_cpus_per_worker: float = Field(
        0.25, ge=0, description="CPUs each overflow worker holds (it only waits on HTTP)."
    )

    @property
    def worker_cost_per_hour(self) -> float:
        """Price of one worker for an hour: its GPUs, or one CPU slot for a CPU worker."""
        share = self.gpus_per_worker if self.gpus_per_worker > 0 else 1.0
        return self.cost_per_gpu_hour * share

    @model_validator(mode="after")
    def _check_bounds(self) -> ScalingConfig:
        if self.max_workers and self.min_workers > self.max_workers:
            raise ValueError(
                f"min_workers ({self.min_workers}) exceeds max_workers ({self.max_workers})"
            )
        if self.mode == "autoscale" and self.max_workers < 1:
            raise ValueError("max_workers must be set (>= 1) when mode is autoscale")
        if self.overflow is not None:
            if not self.overflow.remote:
                raise ValueError(
                    f"overflow.kind: the overflow engine is remote (openai or openai_batch), "
                    f"not {self.overflow.kind}"
                )
            if self.mode != "autoscale":
                raise ValueError(
                    "overflow: routing to it follows the scaler's deadline figures; set "
                    "mode: autoscale (with max_workers and a deadline)"
                )
        ceiling = self.cost_ceiling_per_hour
        if ceiling is not None and self.min_workers * self.worker_cost_per_hour > ceiling:
            raise ValueError(
                f"min_workers ({self.min_workers}) cost "
                f"{self.min_workers * self.worker_cost_per_hour:g}/h, over "
                f"cost_ceiling_per_hour ({ceiling:g})"
            )
        return self


class ScheduleConfig(_Section):
    not_before: datetime | None = Field(None, description="Items are not leased before this time.")
    windows: list[str] = Field(
        default_factory=list, description="Allowed run windows, e.g. '22:00-06:00'."
    )
    timezone: str = Field("UTC", description="Time zone of the windows (IANA name).")

    @model_validator(mode="after")
    def _check_windows(self) -> ScheduleConfig:
        for window in self.windows:
            parse_window(window)
        try:
            ZoneInfo(self.timezone)
        except (ValueError, ZoneInfoNotFoundError):
            raise ValueError(f"timezone {self.timezone!r} is not a known IANA time zone") from None
        return self


class InputConfig(_Section):
    on_invalid: Literal["reject", "skip"] = Field(
        "reject", description="reject: a bad line stops the job before anything is enqueued."
    )
    text_column: str = Field("text", description="Text column of plain JSONL/CSV/Parquet input.")
    id_column: str | None = Field(None, description="Id column; default is the row number.")
    prompt_template: str = Field("{text}", description="Prompt made from the text column.")
    task: Literal["chat", "completion", "embedding"] = Field(
        "chat", description="Task of plain (non-OpenAI) input rows."
    )
    max_tokens: int = Field(64, ge=1, description="max_tokens of plain input rows.")
    model_column: str | None = Field(
        None,
        description="Column naming each plain row's model (one of engines:); default: the "
        "first model.",
    )


WEBHOOK_EVENTS = (
    "batch.completed",
    "batch.failed",
    "batch.expired",
    "batch.cancelled",
    "job.completed",
    "job.failed",
    "job.expired",
    "job.cancelled",
)


class WebhookEndpoint(_Section):
    """One receiver of signed webhooks (``api.webhooks``): only server config names one, never a
    request."""

    url: str = Field(description="Where events are POSTed: an http:// or https:// URL.")
    secret_env: str = Field(
        description="The environment variable (of the Controller's process, on the head node) "
        "holding the signing secret: whsec_<base64> as OpenAI gives, or a raw string."
    )
    events: list[str] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS),
        description=f"The event types sent here (default all: {', '.join(WEBHOOK_EVENTS)}).",
    )

    @model_validator(mode="after")
    def _check_endpoint(self) -> WebhookEndpoint:
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"url {self.url!r}: a webhook URL must be http:// or https:// and name a host"
            )
        if parts.username or parts.password:
            raise ValueError(f"url {self.url!r}: no credentials in a webhook URL (it is signed)")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.secret_env):
            raise ValueError(f"secret_env {self.secret_env!r} is not an environment variable name")
        unknown = [e for e in self.events if e not in WEBHOOK_EVENTS]
        if unknown or not self.events:
            raise ValueError(
                f"events {unknown or self.events!r}: each must be one of "
                + ", ".join(WEBHOOK_EVENTS)
            )
        return self


class ApiConfig(_Section):
    host: str = Field(
        "127.0.0.1", description="Address `inference serve` binds; non-loopback needs tokens."
    )
    port: int = Field(8000, ge=0, le=65535, description="Port `inference serve` listens on.")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Server processes sharing the port (each a Ray driver); more use more cores.",
    )
    tokens: list[str] = Field(default_factory=list, description="Accepted bearer tokens.")
    state_dir: str | None = Field(
        None,
        description="Folder of the Controller's job registry and file store (on the head node); "
        "default: the folder of the queue database.",
    )
    max_body_bytes: int = Field(50_000_000, ge=1024, description="Largest request body.")
    max_items_per_request: int = Field(10_000, ge=1, description="Items in one enqueue call.")
    max_backlog_items: int = Field(
        10_000_000, ge=1, description="Pending items above which enqueues get 429."
    )
    max_tokens: int = Field(
        32_768, ge=1, description="Largest max_tokens (or max_completion_tokens) of one item."
    )
    max_n: int = Field(8, ge=1, le=128, description="Largest n (choices) of one item.")
    max_batch_lines: int = Field(
        50_000, ge=1, description="Most requests in one uploaded batch file (OpenAI's limit)."
    )
    max_wait_s: float = Field(
        60.0, ge=0, le=3600, description="Longest wait_s of a request waiting for an item."
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed by CORS (exact origins; '*' is refused). Empty: no CORS.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names answered besides the loopback ones where the Host header is "
        "checked (without tokens): e.g. a reverse proxy's name.",
    )
    max_files: int = Field(
        10_000, ge=1, description="Files the file store may hold (uploads over it get 429)."
    )
    max_file_store_bytes: int = Field(
        100_000_000_000,
        ge=1,
        description="Bytes the file store may hold (uploads that would pass it get 429).",
    )
    max_open_jobs: int = Field(
        1_000,
        ge=1,
        description="Jobs and batches not yet finished at once (creations over it get 429).",
    )

    webhooks: list[WebhookEndpoint] = Field(
        default_factory=list,
        description="Receivers of signed job and batch events (see the README's Webhooks).",
    )
    webhook_retry_s: float = Field(
        72 * 3600.0,
        gt=0,
        description="How long a delivery is retried (from the event) before it is given up.",
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Timeout of one delivery attempt (connect, each read)."
    )
    webhook_backoff_s: float = Field(
        5.0,
        gt=0,
        description="Delay before the first retry; doubled each attempt (to an hour at most), "
        "with jitter.",
    )

    def redacted(self) -> ApiConfig:
        """This section without its secrets (the tokens), for what is stored or shipped."""
        return self.model_copy(update={"tokens": []})

    @model_validator(mode="after")
    def _check_api(self) -> ApiConfig:
        if any(origin.strip() == "*" or "*" in origin for origin in self.cors_origins):
            raise ValueError("cors_origins: wildcard origins are refused; list exact origins")
        if any(not token or len(token) < 16 for token in self.tokens):
            raise ValueError("tokens: every token must have at least 16 characters")
        urls = [endpoint.url for endpoint in self.webhooks]
        if len(set(urls)) != len(urls):
            raise ValueError("webhooks: each url may be listed once (give it all its events)")
        return self


class ModelEngineConfig(EngineConfig):
    """One entry of ``engines:``: an engine, and where its pool differs from the job's
    ``scaling`` and ``batching``, the fields that differ."""

    scaling: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields of scaling that this model's pool sets otherwise (cpus_per_worker, "
        "gpus_per_worker, max_workers, cost_per_gpu_hour, ...).",
    )
    batching: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields of batching that this model's pool sets otherwise.",
    )

    def engine(self) -> EngineConfig:
        return EngineConfig.model_validate(self.model_dump(exclude={"scaling", "batching"}))


class Config(BaseModel):
    """The root config of a job (and of `inference serve`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineConfig = Field(EngineConfig(), description="The engine.")
    engines: dict[str, ModelEngineConfig] = Field(
        default_factory=dict,
        description="Several models in one job: the name items give as body.model -> its "
        "engine. Each model is a pool of its own, scaled from its own backlog; items without "
        "a model go to the first. Instead of engine:.",
    )
    batching: BatchingConfig = Field(BatchingConfig(), description="Batching.")
    queue: QueueConfig = Field(QueueConfig(), description="Queue semantics.")
    output: OutputConfig = Field(OutputConfig(), description="Where results go.")
    scaling: ScalingConfig = Field(ScalingConfig(), description="Worker pool.")
    schedule: ScheduleConfig = Field(ScheduleConfig(), description="When to run.")
    input: InputConfig = Field(InputConfig(), description="Input mapping.")
    api: ApiConfig = Field(ApiConfig(), description="HTTP API settings.")
    limits: LimitsConfig = Field(LimitsConfig(), description="Remote engines' rate limits.")

    @model_validator(mode="before")
    @classmethod
    def _first_model_is_the_engine(cls, data: Any) -> Any:
        """With ``engines:``, ``engine`` is the first entry's engine (what items without a
        model get, and what code reading one engine sees)."""
        if isinstance(data, dict) and isinstance(data.get("engines"), dict) and data["engines"]:
            first = next(iter(data["engines"].values()))
            if isinstance(first, dict) and "engine" not in data:
                rest = {k: v for k, v in first.items() if k not in ("scaling", "batching")}
                data = {**data, "engine": rest}
        return data

    @model_validator(mode="after")
    def _check_engines(self) -> Config:
        if not self.engines:
            return self
        if self.engine != next(iter(self.engines.values())).engine():
            raise ValueError("give engine: (one model) or engines: (several), not both")
        pools: dict[str, str] = {}
        served: set[str] = set()
        for name, entry in self.engines.items():
            if not _MODEL_NAME.fullmatch(name):
                raise ValueError(
                    f"engines: model name {name!r} must be 1-64 letters, digits or ._:- "
                    "(items name it in body.model)"
                )
            if entry.model in pools:
                raise ValueError(
                    f"engines: {pools[entry.model]!r} and {name!r} both serve {entry.model}; "
                    "each entry is the one pool of its model"
                )
            pools[entry.model] = name
            for adapter in _adapters(entry):
                if adapter in self.engines or adapter in served:
                    raise ValueError(
                        f"engines.{name}.lora.adapters: {adapter!r} is also the name of "
                        "another model here; body.model must say one thing"
                    )
                served.add(adapter)
            for section, fields in (("scaling", entry.scaling), ("batching", entry.batching)):
                try:
                    getattr(self, section).model_validate(
                        {**getattr(self, section).model_dump(), **fields}
                    )
                except ValidationError as exc:
                    problems = "; ".join(
                        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
                    )
                    raise ValueError(f"engines.{name}.{section}: {problems}") from None
        return self

    @property
    def multi_model(self) -> bool:
        return bool(self.engines)

    def models(self) -> dict[str, Config]:
        """A one-model config per served name (its engine, scaling and batching merged in),
        in the order of ``engines:``; for a one-model config, itself under its model's name."""
        if not self.engines:
            return {self.engine.model: self}
        data = self.model_dump(exclude={"engines"})
        out = {}
        for name, entry in self.engines.items():
            merged = {
                **data,
                "engine": {**entry.engine().model_dump(), "served_name": name},
                "scaling": {**data["scaling"], **entry.scaling},
                "batching": {**data["batching"], **entry.batching},
            }
            out[name] = Config.model_validate(merged)
        return out

    def pool_of(self, model: str) -> str | None:
        """The engine pool that serves an item whose body.model is ``model``: with one engine,
        that engine's for any name (as before ``engines:``); with several, the entry of that
        name (or whose LoRA adapter it is), the first entry for none, None for an unknown
        name."""
        if not self.engines:
            return self.engine.model
        if not model:
            return next(iter(self.engines.values())).model
        entry = self.engines.get(model)
        if entry is not None:
            return entry.model
        for entry in self.engines.values():
            if model in _adapters(entry):
                return entry.model
        return None

    def stored(self) -> dict[str, Any]:
        """This config as it may be stored (job records, a shared queue) and shipped to
        workers: the API's tokens left out."""
        return self.model_copy(update={"api": self.api.redacted()}).model_dump(mode="json")

    def pools(self) -> dict[str, Config]:
        """Every engine pool of the job by name: each model's (named by its ``engine.model``)
        and, where ``scaling.overflow`` is set, its overflow pool (``<model>+overflow``) of
        remote clients, autoscaled from 0 to ``overflow_workers`` on what is routed to it."""
        out: dict[str, Config] = {}
        for one in self.models().values():
            out[one.engine.model] = one
            scaling = one.scaling
            if scaling.overflow is None:
                continue
            data = one.model_dump()
            data["engine"] = scaling.overflow.model_dump()
            data["scaling"] = {
                **data["scaling"],
                "overflow": None,
                "min_workers": 0,
                "max_workers": scaling.overflow_workers,
                "gpus_per_worker": 0.0,
                "cpus_per_worker": scaling.overflow_cpus_per_worker,
                "cost_per_gpu_hour": 0.0,
                "cost_ceiling_per_hour": None,
            }
            out[overflow_pool(one.engine.model)] = Config.model_validate(data)
        return out

    def token_prices(self) -> dict[str, tuple[float, float]]:
        """Of each pool on a remote engine with prices: what its provider charges for a
        million prompt and completion tokens (the batch discount applied)."""
        out = {}
        for pool, one in self.pools().items():
            engine = one.engine
            if engine.remote and (engine.input_price_per_mtok or engine.output_price_per_mtok):
                share = 1.0 - engine.batch_discount if engine.kind == "openai_batch" else 1.0
                out[pool] = (
                    engine.input_price_per_mtok * share,
                    engine.output_price_per_mtok * share,
                )
        return out

    def served_names(self) -> list[str]:
        """What body.model may say (with ``engines:``): the entries' names and adapters."""
        names = list(self.engines)
        for entry in self.engines.values():
            names.extend(_adapters(entry))
        return names

    @model_validator(mode="after")
    def _check_parallel(self) -> Config:
        """Each model's workers: one GPU per rank of a multi-GPU engine (check_parallel)."""
        if not self.engines:
            check_parallel(self.engine, self.scaling)
        for name, entry in self.engines.items():
            try:
                scaling = ScalingConfig.model_validate(
                    {**self.scaling.model_dump(), **entry.scaling}
                )
            except ValidationError:
                continue  # _check_engines names the bad field
            check_parallel(entry, scaling, f"engines.{name}", f"engines.{name}.scaling")
        return self

    def with_updates(self, **sections: dict[str, Any]) -> Config:
        """A copy with some fields of some sections replaced (validated again)."""
        data = self.model_dump()
        for name, values in sections.items():
            data[name] = {**data[name], **values}
        return parse_config(data, source="<override>")


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def overflow_pool(pool: str) -> str:
    """The name of the pool that takes a pool's overflow."""
    return f"{pool}+overflow"


def _adapters(entry: EngineConfig) -> list[str]:
    """The LoRA adapter names an engine serves (none without ``engine.lora``)."""
    lora = getattr(entry, "lora", None)
    return list(getattr(lora, "adapters", {}) or {})


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {path}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    _warn_wasteful(config)
    return config


def load_config(path: str | Path) -> Config:
    """Load and validate a YAML config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {path}: {exc}") from None
    return parse_config(data, source=str(path))


def _warn_wasteful(config: Config) -> None:
    if config.engines:  # each model's pool as it runs
        for one in config.models().values():
            _warn_wasteful(one)
        return
    scaling = config.scaling
    if (
        config.engine.kind == "vllm"
        and scaling.gpus_per_worker == 0
        and scaling.cpus_per_worker < 2
    ):
        logger.warning(
            "engine.kind is vllm on CPUs (scaling.gpus_per_worker is 0) with "
            "scaling.cpus_per_worker %g: vLLM's CPU engine binds its OpenMP threads to cores "
            "and keeps one for itself, so workers sharing cores slow each other badly; give "
            "each worker the cores it uses (2 or more), or set gpus_per_worker on GPUs",
            scaling.cpus_per_worker,
        )
    if config.queue.lease_s < 5:
        logger.warning(
            "queue.lease_s=%s is short: slow batches may lose their lease", config.queue.lease_s
        )
