"""The rate-limit proxy (``tests/support/ratelimit_proxy.py``) in its own process, in front of
a trivial OpenAI-shaped upstream served from this process: it forwards, refuses over its limits
with OpenAI's headers and body, and plays faults the given number of times."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from inference.limits import parse_signal, pause_s
from tests.support.ratelimit_proxy import Proxy, estimate_tokens, format_duration, start_proxy

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
CHAT_15 = {**CHAT, "max_tokens": 15}


async def _completion(request: Request) -> Response:
    body = await request.json()
    return JSONResponse(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "m"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hello"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        },
        headers={"x-request-id": "req-1"},
    )


async def _embedding(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"index": 0, "embedding": [0.0]}]})


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """A chat-completion server on a loopback port, in a thread of this process."""
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", _completion, methods=["POST"]),
            Route("/v1/embeddings", _embedding, methods=["POST"]),
        ]
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def proxy(upstream: str, request: pytest.FixtureRequest) -> Iterator[Proxy]:
    limits: dict[str, Any] = getattr(request, "param", {})
    with start_proxy(upstream, **limits) as running:
        yield running
    assert running.process.poll() is not None  # stopped by pid


def chat(proxy: Proxy, client: httpx.Client, path: str = "chat/completions") -> httpx.Response:
    return client.post(f"{proxy.base_url}/{path}", json=CHAT)


@pytest.mark.parametrize("proxy", [{"rpm": 600}], indirect=True)
def test_it_forwards_and_adds_rate_limit_headers(proxy: Proxy) -> None:
    with httpx.Client() as client:
        response = chat(proxy, client)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "hello"
    assert response.headers["x-request-id"] == "req-1"
    assert response.headers["x-ratelimit-limit-requests"] == "600"
    assert response.headers["x-ratelimit-remaining-requests"] == "9"
    assert response.headers["x-ratelimit-reset-requests"].endswith("ms")
    stats = proxy.stats()
    assert [(r["path"], r["status"]) for r in stats["forwarded"]] == [("chat/completions", 200)]
    assert stats["refused"] == []


@pytest.mark.parametrize("proxy", [{"rpm": 60}], indirect=True)
def test_it_refuses_over_the_limit_like_openai(proxy: Proxy) -> None:
    with httpx.Client() as client:
        assert chat(proxy, client).status_code == 200
        refused = chat(proxy, client)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        headers = refused.headers
        assert headers["retry-after"] == "1"
        assert 900 <= int(headers["retry-after-ms"]) <= 1000
        assert headers["x-ratelimit-remaining-requests"] == "0"
        # the limiter reads these headers as a pause of about the wait
        pause = pause_s(parse_signal(429, headers), share=1.0)
        assert 0.85 <= pause <= 1.0
        time.sleep(int(headers["retry-after-ms"]) / 1000)
        assert chat(proxy, client).status_code == 200
    stats = proxy.stats()
    assert (len(stats["forwarded"]), len(stats["refused"])) == (2, 1)
    assert stats["forwarded"][0]["t"] < stats["refused"][0]["t"] < stats["forwarded"][1]["t"]


@pytest.mark.parametrize("proxy", [{"tpm": 600, "burst_s": 4}], indirect=True)
def test_it_limits_tokens_and_corrects_them_from_usage(proxy: Proxy) -> None:
    """The bucket holds 40 tokens and refills 10/s; a request is charged 23 (34 characters of
    messages / 4, plus max_tokens 15) and its usage says 7, so 16 come back each time."""
    assert estimate_tokens("chat/completions", CHAT_15) == 23
    with httpx.Client() as client:
        first = client.post(f"{proxy.base_url}/chat/completions", json=CHAT_15)
        assert first.status_code == 200
        assert int(first.headers["x-ratelimit-remaining-tokens"]) >= 33  # 40 - 23 + 16
        statuses = [
            client.post(f"{proxy.base_url}/chat/completions", json=CHAT_15).status_code
            for _ in range(3)
        ]
    assert statuses == [200, 200, 429]  # 33 and 26 fit 23; 19 does not
    assert proxy.stats()["refused"][0]["kind"] == "tokens"


def test_faults_fire_count_times_then_stop(proxy: Proxy) -> None:
    proxy.fault(status=503, count=2, path="chat/completions", retry_after_s=1)
    with httpx.Client() as client:
        assert chat(proxy, client, "embeddings").status_code == 200  # another path: untouched
        first, second, third = (chat(proxy, client) for _ in range(3))
    assert (first.status_code, second.status_code, third.status_code) == (503, 503, 200)
    assert first.json()["error"]["type"] == "server_error"
    assert first.headers["retry-after"] == "1"
    assert [f["status"] for f in proxy.stats()["faulted"]] == [503, 503]


@pytest.mark.parametrize(("status", "kind"), [(401, "authentication_error"), (400, None)])
def test_client_error_faults_carry_openai_bodies(
    proxy: Proxy, status: int, kind: str | None
) -> None:
    proxy.fault(status=status)
    with httpx.Client() as client:
        response = chat(proxy, client)
    assert response.status_code == status
    assert response.json()["error"]["type"] == (kind or "invalid_request_error")


def test_drop_closes_the_connection_without_an_answer(proxy: Proxy) -> None:
    proxy.fault(drop=2)
    with httpx.Client() as client:
        for _ in range(2):
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                chat(proxy, client)
        assert chat(proxy, client).status_code == 200
    assert [f["status"] for f in proxy.stats()["faulted"]] == ["drop", "drop"]


def test_delay_holds_the_answer_then_forwards(proxy: Proxy) -> None:
    proxy.fault(delay_s=0.5)
    with httpx.Client() as client:
        started = time.monotonic()
        assert chat(proxy, client).status_code == 200
        assert time.monotonic() - started >= 0.5
        started = time.monotonic()
        assert chat(proxy, client).status_code == 200
        assert time.monotonic() - started < 0.5


def test_a_bad_fault_is_refused(proxy: Proxy) -> None:
    response = httpx.post(f"{proxy.root}/_faults", json={"count": 2})
    assert response.status_code == 400
    assert httpx.post(f"{proxy.root}/_faults", json={"stauts": 500}).status_code == 400


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.02, "20ms"), (1.0, "1s"), (1.5, "1.5s"), (360.0, "6m0s")]
)
def test_durations_are_written_like_openai(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
