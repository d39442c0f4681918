"""The ASGI guard in front of every route: where a request may come from, bearer tokens, the
body's type and its size.

In the order they are checked:

- ``Host`` (DNS rebinding): without tokens (so on a loopback bind) only a loopback name or
  address is answered (``localhost``, ``*.localhost``, ``127.0.0.0/8``, ``[::1]``, with or
  without a port, and the names of ``api.allowed_hosts``); anything else is 400. With tokens
  (which a public bind needs) the tokens protect the server and any ``Host`` is answered.
- ``Origin`` (cross-site requests from a browser): a POST, PUT, PATCH or DELETE whose ``Origin``
  names another origin than the ``Host`` it was sent to (``null`` included), or whose
  ``Sec-Fetch-Site`` is ``cross-site`` or ``same-site``, is 403, tokens or not; origins listed
  in ``api.cors_origins`` are allowed.
- ``Authorization: Bearer <token>`` is required when tokens are configured; the presented token
  is compared with every configured one in constant time (``hmac.compare_digest``, no early
  exit). ``/healthz``, ``/openapi.json`` and the dashboard's page stay open.
- A body over ``max_body_bytes`` gets 413 before it is read: at once from ``Content-Length``,
  and, for a body without one, as soon as the bytes received pass the limit.
- A request body must be ``application/json`` (415 otherwise), but on the upload paths
  (``POST /v1/files``: multipart, checked there).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

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
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
UPLOAD_PATHS = frozenset({"/v1/files"})  # multipart bodies; the route checks their type
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` header -> (lower-case name or address without brackets, port or None); None
    when it is not a well-formed host."""
    value = value.strip()
    if not value or any(c in value for c in "/\\@?#% \t"):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, colon, port_text_ = value.rpartition(":")
        if not colon:
            name, port_text_ = value, ""
        if ":" in name:  # a bare IPv6 address is not a Host
            return None
        port_text = port_text_ if colon else None
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    name = name.lower().rstrip(".")
    return (name, port) if name else None


def is_loopback_name(name: str) -> bool:
    """``localhost``, a name under ``.localhost`` (RFC 6761), or a loopback address."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def same_origin(origin: str, host: tuple[str, int | None]) -> bool:
    """Whether an ``Origin`` header names the origin of the ``Host`` it was sent to."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return False
    default = _DEFAULT_PORTS.get(parts.scheme.lower())
    if default is None or not parts.hostname or parts.path or parts.query or parts.username:
        return False
    return (parts.hostname.lower().rstrip("."), port or default) == (host[0], host[1] or default)


def media_type(value: bytes) -> str:
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes the limit; an HTTPException so that code
    reading the body (FastAPI's own parsing included) answers 413, not 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit} bytes.")


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        tokens: list[str],
        max_body_bytes: int,
        *,
        check_host: bool = True,
        allowed_hosts: Iterable[str] = (),
        cors_origins: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.tokens = [t.encode() for t in tokens]
        self.max_body_bytes = max_body_bytes
        self.check_host = check_host
        self.allowed_hosts = frozenset(h.lower().rstrip(".") for h in allowed_hosts)
        self.cors_origins = frozenset(cors_origins)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        value = headers.get(b"authorization", b"")
        scheme, _, presented = value.partition(b" ")
        if scheme.lower() != b"bearer" or not presented:
            return False
        ok = False
        for token in self.tokens:
            ok |= hmac.compare_digest(presented.strip(), token)
        return ok

    def _host_refusal(self, host: tuple[str, int | None] | None, raw: str) -> str | None:
        if not self.check_host:
            return None
        if host is not None and (is_loopback_name(host[0]) or host[0] in self.allowed_hosts):
            return None
        return (
            f"The Host header {raw[:100]!r} is not a name of this server: it answers requests "
            "to localhost, 127.0.0.1 or [::1] only (set api.tokens to serve other names, or "
            "list them in api.allowed_hosts)."
        )

    def _origin_refusal(
        self, headers: dict[bytes, bytes], host: tuple[str, int | None] | None
    ) -> str | None:
        origin = headers.get(b"origin")
        text = origin.decode("latin-1") if origin is not None else None
        if text is not None and text in self.cors_origins:
            return None  # listed for CORS: another origin this server answers on purpose
        site = headers.get(b"sec-fetch-site", b"").strip().lower()
        if site in (b"cross-site", b"same-site"):
            return f"A {site.decode()} request may not change anything here (Sec-Fetch-Site)."
        if text is not None and (host is None or not same_origin(text, host)):
            return (
                f"The Origin {text[:100]!r} is not this server's; requests from other sites "
                "may not change anything here (list trusted origins in api.cors_origins)."
            )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        raw_host = headers.get(b"host", b"").decode("latin-1")
        host = split_host(raw_host)
        refusal = self._host_refusal(host, raw_host)
        if refusal is not None:
            await _reply(send, 400, refusal, "invalid_host")
            return
        method = scope["method"]
        if method in UNSAFE_METHODS:
            refusal = self._origin_refusal(headers, host)
            if refusal is not None:
                await _reply(send, 403, refusal, "cross_origin")
                return
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
        declared = None
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _reply(send, 400, "Content-Length is not a number.", "invalid_header")
                return
            if declared > self.max_body_bytes:
                await _too_large(send, self.max_body_bytes)
                return
        has_body = (declared or 0) > 0 or b"transfer-encoding" in headers
        if (
            has_body
            and method in BODY_METHODS
            and scope["path"] not in UPLOAD_PATHS
            and media_type(headers.get(b"content-type", b"")) != "application/json"
        ):
            await _reply(
                send,
                415,
                "The body must be JSON, sent with Content-Type: application/json.",
                "unsupported_media_type",
            )
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
