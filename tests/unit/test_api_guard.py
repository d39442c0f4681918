"""The ASGI guard alone (no server, no Ray): which Host names it answers, which cross-site
requests it refuses, and which bodies it lets through to the routes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from inference.api.guard import Guard

TOKEN = "unit-token-0123456789abcdef"


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def call(
    guard: Guard,
    method: str = "GET",
    path: str = "/v1/jobs",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, dict[str, Any]]:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if body and not any(k == b"content-length" for k, _ in raw):
        raw.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": method, "path": path, "headers": raw}
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    status = sent[0]["status"]
    payload = json.loads(b"".join(m.get("body", b"") for m in sent[1:]) or b"{}")
    return status, payload


def guard(**kwargs: Any) -> Guard:
    return Guard(_ok, kwargs.pop("tokens", []), kwargs.pop("max_body_bytes", 1 << 20), **kwargs)


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:8000",
        "LOCALHOST:8000",
        "app.localhost:8000",
        "127.0.0.1",
        "127.0.0.1:8000",
        "127.5.6.7:80",
        "[::1]",
        "[::1]:8000",
    ],
)
def test_without_tokens_loopback_hosts_are_answered(host: str) -> None:
    assert call(guard(), headers={"host": host})[0] == 200


@pytest.mark.parametrize(
    "host",
    [
        "evil.example.com",
        "evil.example.com:8000",
        "localhost.evil.example.com",
        "127.0.0.1.nip.io",
        "192.0.2.10:8000",
        "0.0.0.0:8000",
        "[::]:8000",
        "::1",
        "localhost:notaport",
        "user@localhost",
        "",
    ],
)
def test_without_tokens_any_other_host_is_refused_with_a_json_error(host: str) -> None:
    headers = {"host": host} if host else {}
    status, body = call(guard(), headers=headers)
    assert status == 400
    assert body["error"]["code"] == "invalid_host" and "Host" in body["error"]["message"]


def test_the_host_check_is_off_when_tokens_guard_a_public_bind() -> None:
    public = guard(tokens=[TOKEN], check_host=False)
    auth = {"authorization": f"Bearer {TOKEN}", "host": "inference.example.com"}
    assert call(public, headers=auth)[0] == 200
    assert call(public, headers={"host": "inference.example.com"})[0] == 401
    listed = guard(allowed_hosts=["inference.internal"])
    assert call(listed, headers={"host": "inference.internal:8000"})[0] == 200
    assert call(listed, headers={"host": "other.internal:8000"})[0] == 400


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize(
    "extra",
    [
        {"origin": "http://evil.example.com"},
        {"origin": "http://127.0.0.1:9999"},  # another port is another origin
        {"origin": "null"},
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
    ],
)
def test_state_changes_from_another_origin_are_refused(method: str, extra: dict) -> None:
    for tokens in ([], [TOKEN]):
        headers = {"host": "127.0.0.1:8000", "authorization": f"Bearer {TOKEN}", **extra}
        status, body = call(guard(tokens=tokens), method, headers=headers)
        assert status == 403, (tokens, extra)
        assert body["error"]["code"] == "cross_origin"
        assert body["error"]["type"] == "permission_error"


def test_same_origin_listed_origins_and_reads_pass() -> None:
    g = guard(cors_origins=["https://ops.example.com"])
    host = {"host": "127.0.0.1:8000"}
    same = {**host, "origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"}
    assert call(g, "POST", headers=same)[0] == 200
    assert call(g, "POST", headers={"host": "localhost", "origin": "http://localhost"})[0] == 200
    listed = {**host, "origin": "https://ops.example.com", "sec-fetch-site": "cross-site"}
    assert call(g, "POST", headers=listed)[0] == 200
    typed = {**host, "sec-fetch-site": "none"}  # the user typed it: no site sent it
    assert call(g, "POST", headers=typed)[0] == 200
    reading = {**host, "origin": "http://evil.example.com"}  # CORS keeps the answer from it
    assert call(g, "GET", headers=reading)[0] == 200


def test_a_body_must_be_json_except_on_the_upload_path() -> None:
    g = guard()
    host = {"host": "127.0.0.1:8000"}
    data = b'{"job_id": "x"}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {**host, **({"content-type": content_type} if content_type else {})}
        status, body = call(g, "POST", "/v1/jobs", headers, data)
        assert status == 415, content_type
        assert body["error"]["code"] == "unsupported_media_type"
    json_type = {**host, "content-type": "application/json; charset=utf-8"}
    assert call(g, "POST", "/v1/jobs", json_type, data)[0] == 200
    assert call(g, "POST", "/v1/jobs/x/cancel", host)[0] == 200  # no body, no type needed
    multipart = {**host, "content-type": "multipart/form-data; boundary=b"}
    assert call(g, "POST", "/v1/files", multipart, b"--b--\r\n")[0] == 200
    chunked = {**host, "transfer-encoding": "chunked", "content-type": "text/plain"}
    assert call(g, "POST", "/v1/jobs", chunked, data)[0] == 415
