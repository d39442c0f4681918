"""The ASGI guard in front of every route: bearer tokens and the request body limit.

- ``Authorization: Bearer <token>`` is required when tokens are configured; the presented token
  is compared with every configured one in constant time (``hmac.compare_digest``, no early
  exit). ``/healthz`` and ``/openapi.json`` stay open.
- A body over ``max_body_bytes`` gets 413 before it is read: at once from ``Content-Length``,
  and, for a body without one, as soon as the bytes received pass the limit.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from .http_errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/dashboard"})
# The dashboard's page and static files hold no data (the page asks for a token and then reads
# /v1/dashboard/state, which stays behind it), so a browser can open them from the address bar.
OPEN_PREFIXES = ("/dashboard/static/",)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes the limit; an HTTPException so that code
    reading the body (FastAPI's own parsing included) answers 413, not 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit} bytes.")


class Guard:
    def __init__(self, app: ASGIApp, tokens: list[str], max_body_bytes: int) -> None:
        self.app = app
        self.tokens = [t.encode() for t in tokens]
        self.max_body_bytes = max_body_bytes

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        value = headers.get(b"authorization", b"")
        scheme, _, presented = value.partition(b" ")
        if scheme.lower() != b"bearer" or not presented:
            return False
        ok = False
        for token in self.tokens:
            ok |= hmac.compare_digest(presented.strip(), token)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.tokens and not is_open(scope["path"]) and not self._authorized(headers):
            await _reply(
                send,
                401,
                "Missing or invalid bearer token (Authorization: Bearer <token>).",
                "invalid_api_key",
                {"www-authenticate": "Bearer"},
            )
            return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _reply(send, 400, "Content-Length is not a number.", "invalid_header")
                return
            if declared > self.max_body_bytes:
                await _too_large(send, self.max_body_bytes)
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _too_large(send, self.max_body_bytes)


async def _too_large(send: Send, limit: int) -> None:
    await _reply(send, 413, f"The request body is larger than {limit} bytes.", "body_too_large")


async def _reply(
    send: Send, status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps(error_body(status, message, None, code)).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
