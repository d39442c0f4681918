"""One request item checked the way every entry point checks it.

The body is judged by the project's single parser, :func:`inference.schema.parse_request`,
exactly as the file readers judge a batch line: a malformed request is refused (naming the field),
a valid one that no engine here can run (``unsupported``) is accepted and dead-lettered with its
reason by the worker. On top of that the API's caps on ``max_tokens`` and ``n`` apply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from inference.config import ApiConfig, Config
from inference.errors import PermanentError
from inference.schema import RESPONSES_URL, encode_payload, estimate_tokens, parse_request

_PARAM = re.compile(r"^((?:body|url)(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*)")


class ItemRejected(ValueError):
    """An item that is refused before anything is enqueued; ``param`` names the field."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_request") -> None:
        super().__init__(message, param, code)
        self.message = message
        self.param = param
        self.code = code

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class CheckedItem:
    payload: str  # canonical JSON of url and body (the queue's payload)
    tokens: int  # estimated tokens, for the lease budget
    model: str


def route(config: Config, model: str) -> str | None:
    """The pool for an item's body.model: None (the job's) with one engine; with ``engines:``
    the pool of that model, and a rejection naming the served models for an unknown one."""
    if not config.engines:
        return None
    pool = config.pool_of(model)
    if pool is None:
        raise ItemRejected(
            f"The model {model!r} is not served here; served: {', '.join(config.served_names())}.",
            "body.model",
            "model_not_found",
        )
    return pool


def check_item(url: Any, body: Any, api: ApiConfig) -> CheckedItem:
    """Parse and cap one request; raises :class:`ItemRejected` naming the field."""
    try:
        request = parse_request(url, body)
    except PermanentError as exc:
        if exc.code != "unsupported":
            match = _PARAM.match(exc.message)
            raise ItemRejected(exc.message, match.group(1) if match else None) from None
        # Valid but not runnable here: accepted, and dead-lettered with the reason by the worker.
        model = body.get("model", "") if isinstance(body, dict) else ""
        return CheckedItem(encode_payload(str(url), dict(body)), 1, str(model))
    if request.max_tokens > api.max_tokens and request.task != "embedding":
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        if url == RESPONSES_URL:
            name = "max_output_tokens"
        raise ItemRejected(
            f"body.{name} must be at most {api.max_tokens} on this server, got "
            f"{request.max_tokens}",
            f"body.{name}",
        )
    if request.n > api.max_n:
        raise ItemRejected(
            f"body.n must be at most {api.max_n} on this server, got {request.n}", "body.n"
        )
    return CheckedItem(encode_payload(url, body), estimate_tokens(request), request.model)


def oversized(payload: str, max_bytes: int) -> bool:
    """Whether a payload passes ``queue.max_item_bytes`` (the queue would refuse it)."""
    # A character is at most 4 bytes in UTF-8: short payloads need no encoding to be sure.
    return len(payload) * 4 > max_bytes and len(payload.encode()) > max_bytes
