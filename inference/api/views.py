"""Controller records rendered as the objects clients read: OpenAI's ``batch``, and ``job``."""

from __future__ import annotations

from typing import Any

# Controller status -> OpenAI batch status.
BATCH_STATUS = {
    "validating": "validating",
    "failed": "failed",
    "queued": "in_progress",
    "running": "in_progress",
    "finalizing": "finalizing",
    "expiring": "finalizing",
    "completed": "completed",
    "expired": "expired",
    "cancelling": "cancelling",
    "cancelled": "cancelled",
}
_TIMES = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def _usage(stats: dict[str, Any]) -> dict[str, Any]:
    prompt = int(stats.get("prompt_tokens", 0))
    completion = int(stats.get("completion_tokens", 0))
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def batch_object(rec: dict[str, Any]) -> dict[str, Any]:
    stats = rec.get("stats") or {}
    times = rec.get("times") or {}
    return {
        "id": rec["id"],
        "object": "batch",
        "endpoint": rec["endpoint"],
        "model": rec.get("model"),
        "errors": rec.get("errors"),
        "input_file_id": rec["input_file_id"],
        "completion_window": rec["completion_window"],
        "status": BATCH_STATUS[rec["status"]],
        "output_file_id": rec.get("output_file_id"),
        "error_file_id": rec.get("error_file_id"),
        "created_at": rec["created_at"],
        "expires_at": rec.get("expires_at"),
        **{name: times.get(name) for name in _TIMES},
        "request_counts": {
            "total": int(stats.get("total", 0)),
            "completed": int(stats.get("done", 0)),
            "failed": int(stats.get("dead", 0)),
        },
        "usage": _usage(stats),
        "metadata": rec.get("metadata"),
    }


def job_object(rec: dict[str, Any]) -> dict[str, Any]:
    stats = rec.get("stats") or {}
    times = rec.get("times") or {}
    return {
        "id": rec["id"],
        "object": "job",
        "status": rec["status"],
        "created_at": rec["created_at"],
        "expires_at": rec.get("expires_at"),
        "completion_window": rec.get("completion_window"),
        **{name: times.get(name) for name in _TIMES},
        "request_counts": {
            "total": int(stats.get("total", 0)),
            "pending": int(stats.get("pending", 0)),
            "leased": int(stats.get("leased", 0)),
            "completed": int(stats.get("done", 0)),
            "failed": int(stats.get("dead", 0)),
        },
        "usage": _usage(stats),
        "progress": rec.get("progress"),
        "metadata": rec.get("metadata"),
    }


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor page: ``after`` the ``last_id`` gives the next one."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
