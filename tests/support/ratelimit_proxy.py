"""A loopback stand-in for a provider's rate limiting, in front of a real OpenAI-compatible
server (vLLM's, in the remote engine's tests).

::

    python -m tests.support.ratelimit_proxy --upstream http://127.0.0.1:PORT/v1 --port P \\
        --rpm N [--tpm M] [--burst-s S]

It forwards ``/v1/{path}`` (POST, and GET such as ``/v1/models``) to the upstream over one
keep-alive httpx client and speaks OpenAI's rate-limit protocol:

- Requests per minute are a token bucket of rate ``rpm / 60`` per second holding ``burst_s``
  seconds of it (at least one request): with the default ``--burst-s 1`` that is OpenAI's
  "enforced per second" behaviour, not a sliding 60 s window. Tokens per minute likewise, each
  request charged ``characters / 4`` of its prompt plus ``max_tokens`` (16 when absent, 0 for
  embeddings) up front and corrected from the response's ``usage.total_tokens``; a request
  larger than the token bucket passes alone when the bucket is full.
- Over a limit: 429 with ``Retry-After`` (whole seconds, rounded up), ``retry-after-ms`` and an
  OpenAI error body ``{"error": {"message", "type": "requests"|"tokens", "code":
  "rate_limit_exceeded"}}``. Refused requests cost nothing.
- Every answer carries ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` of the limits
  set (reset: the time until the bucket is full again, Go-style: "1s", "250ms", "6m0s").

Control endpoints: ``GET /_stats`` (the monotonic and epoch time, path and status of every
forwarded, refused and faulted request), ``POST /_faults`` with ``{"status": 503, "count": 3,
"path": "chat/completions", "retry_after_s": 1}``, ``{"drop": 2}`` (close the connection
without answering) or ``{"delay_s": 1.5, "count": 1}`` (then forward), queued first in first
out and matched by path (none: any); ``DELETE /_faults``; ``POST /_reset`` (records, faults and
full buckets). Faults come before the limits and cost nothing against them.

:func:`start_proxy` runs it as a subprocess on a free loopback port for a test and stops it by
pid. Streaming responses are not passed through (the body is read whole).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0
DEFAULT_MAX_TOKENS = 16
# Not passed on either way: hop-by-hop, or rewritten by httpx/uvicorn.
_SKIP_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-encoding",
        "accept-encoding",
        "date",
        "server",
    }
)


# ---- the limits ------------------------------------------------------------------------------


class Bucket:
    """A token bucket, kept apart from :mod:`inference.limits` on purpose: the proxy stands
    for the provider the limiter is tested against."""

    def __init__(self, per_minute: float, burst_s: float) -> None:
        self.limit = per_minute
        self.rate_per_s = per_minute / 60.0
        self.capacity = max(1.0, self.rate_per_s * burst_s)
        self.level = self.capacity
        self.at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate_per_s)
        self.at = now

    def take(self, n: float) -> float:
        """Take ``n`` and return 0.0, or take nothing and return the seconds until it could."""
        self._refill()
        short = min(n, self.capacity) - self.level
        if short > 1e-9:
            return short / self.rate_per_s
        self.level -= n
        return 0.0

    def correct(self, n: float) -> None:
        """Add back (or take, when negative) what the estimate got wrong."""
        self._refill()
        self.level = min(self.capacity, self.level + n)

    def headers(self, kind: str) -> dict[str, str]:
        self._refill()
        full_in_s = (self.capacity - self.level) / self.rate_per_s
        return {
            f"x-ratelimit-limit-{kind}": str(int(self.limit)),
            f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(self.level))),
            f"x-ratelimit-reset-{kind}": format_duration(full_in_s),
        }


def format_duration(seconds: float) -> str:
    """Go-style, as OpenAI writes its resets: "20ms", "1s", "1.5s", "6m0s"."""
    seconds = max(0.0, seconds)
    if seconds < 1.0:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds, 3), 60.0)
    return f"{int(minutes)}m{rest:g}s" if minutes else f"{rest:g}s"


def estimate_tokens(path: str, body: Any) -> int:
    """What the proxy charges up front: prompt characters / 4 plus max_tokens."""
    if not isinstance(body, dict):
        return 1
    text = json.dumps(
        body.get("messages") or body.get("prompt") or body.get("input") or "", ensure_ascii=False
    )
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(max_tokens, int):
        max_tokens = 0 if path.startswith("embeddings") else DEFAULT_MAX_TOKENS
    return max(1, len(text) // 4 + max_tokens)


def error_body(message: str, kind: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


# ---- faults and records ----------------------------------------------------------------------


@dataclass
class Fault:
    count: int = 1
    path: str | None = None
    status: int | None = None
    drop: bool = False
    delay_s: float = 0.0
    retry_after_s: float | None = None
    message: str = "injected fault"

    @classmethod
    def parse(cls, spec: dict[str, Any]) -> Fault:
        """``{"drop": N}`` is N drops; otherwise ``count`` (default 1) of status and/or delay."""
        known = {"count", "path", "status", "drop", "delay_s", "retry_after_s", "message"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        drop = spec.get("drop")
        fault = cls(
            count=int(drop if drop else spec.get("count", 1)),
            path=spec.get("path"),
            status=spec.get("status"),
            drop=bool(drop),
            delay_s=float(spec.get("delay_s", 0.0)),
            retry_after_s=spec.get("retry_after_s"),
            message=str(spec.get("message", "injected fault")),
        )
        if fault.count < 1 or not (fault.drop or fault.status or fault.delay_s):
            raise ValueError("a fault needs count >= 1 and one of status, drop, delay_s")
        return fault

    def matches(self, path: str) -> bool:
        return self.path is None or path.strip("/") == self.path.strip("/")


@dataclass
class ProxyState:
    upstream: str
    requests: Bucket | None
    tokens: Bucket | None
    burst_s: float
    faults: deque[Fault] = field(default_factory=deque)
    forwarded: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    faulted: list[dict[str, Any]] = field(default_factory=list)
    client: httpx.AsyncClient | None = None

    def take_fault(self, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(path):
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    def rate_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.requests is not None:
            headers.update(self.requests.headers("requests"))
        if self.tokens is not None:
            headers.update(self.tokens.headers("tokens"))
        return headers

    def reset(self) -> None:
        self.faults.clear()
        for records in (self.forwarded, self.refused, self.faulted):
            records.clear()
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.level = bucket.capacity


def _record(path: str, status: int | str, **extra: Any) -> dict[str, Any]:
    return {"t": time.monotonic(), "epoch": time.time(), "path": path, "status": status, **extra}


# ---- the app ---------------------------------------------------------------------------------


def create_app(
    upstream: str, rpm: float | None = None, tpm: float | None = None, burst_s: float = 1.0
) -> Any:
    """The proxy as an ASGI app (wrapped so a handler can drop its connection)."""
    state = ProxyState(
        upstream=upstream.rstrip("/"),
        requests=Bucket(rpm, burst_s) if rpm else None,
        tokens=Bucket(tpm, burst_s) if tpm else None,
        burst_s=burst_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.client = httpx.AsyncClient(
            timeout=httpx.Timeout(600.0, connect=10.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
        )
        yield
        await state.client.aclose()

    async def stats(request: Request) -> Response:
        return JSONResponse(
            {
                "forwarded": state.forwarded,
                "refused": state.refused,
                "faulted": state.faulted,
                "faults": [asdict(f) for f in state.faults],
                "limits": {
                    "rpm": state.requests.limit if state.requests else None,
                    "tpm": state.tokens.limit if state.tokens else None,
                    "burst_s": state.burst_s,
                },
            }
        )

    async def faults(request: Request) -> Response:
        if request.method == "DELETE":
            state.faults.clear()
            return JSONResponse({"faults": []})
        if request.method == "POST":
            try:
                state.faults.append(Fault.parse(await request.json()))
            except (ValueError, TypeError) as exc:
                return JSONResponse(error_body(str(exc), "invalid_request_error", None), 400)
        return JSONResponse({"faults": [asdict(f) for f in state.faults]})

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"reset": True})

    async def forward(request: Request) -> Response:
        path = request.path_params["path"]
        raw = await request.body()
        fault = state.take_fault(path)
        if fault is not None:
            answer = await _inject(request, path, fault, state)
            if answer is not None:
                return answer
        estimate = 0
        if request.method == "POST" and state.tokens is not None:
            try:
                estimate = estimate_tokens(path, json.loads(raw or b"null"))
            except ValueError:
                estimate = 1
        refusal = _over_limit(state, path, estimate)
        if refusal is not None:
            return refusal
        return await _send_upstream(request, path, raw, estimate, state)

    routes = [
        Route("/_stats", stats, methods=["GET"]),
        Route("/_faults", faults, methods=["GET", "POST", "DELETE"]),
        Route("/_reset", reset, methods=["POST"]),
        Route("/v1/{path:path}", forward, methods=["GET", "POST"]),
    ]
    return _Droppable(Starlette(routes=routes, lifespan=lifespan))


async def _inject(request: Request, path: str, fault: Fault, state: ProxyState) -> Response | None:
    """Play one fault: delay, then drop the connection or answer its status (None: forward)."""
    if fault.delay_s:
        await asyncio.sleep(fault.delay_s)
    if fault.drop:
        state.faulted.append(_record(path, "drop"))
        transport = request.scope.get("proxy.transport")
        if transport is None:
            raise RuntimeError("this server gives no way to drop a connection")
        transport.close()
        for _ in range(3):  # let the server see the connection lost: it then writes nothing
            await asyncio.sleep(0)
        return Response(status_code=500)
    if not fault.status:
        state.faulted.append(_record(path, "delay"))
        return None
    state.faulted.append(_record(path, fault.status))
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
    codes = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}
    headers = state.rate_headers()
    if fault.retry_after_s is not None:
        headers["retry-after"] = str(math.ceil(fault.retry_after_s))
        headers["retry-after-ms"] = str(round(fault.retry_after_s * 1000))
    body = error_body(
        fault.message, kinds.get(fault.status, "server_error"), codes.get(fault.status)
    )
    return JSONResponse(body, fault.status, headers=headers)


def _over_limit(state: ProxyState, path: str, tokens: int) -> Response | None:
    """A 429 when the request does not fit the limits, else None (and the budget is taken)."""
    checks = [(state.requests, 1, "requests"), (state.tokens, tokens, "tokens")]
    for bucket, n, kind in checks:
        if bucket is None:
            continue
        wait = bucket.take(n)
        if wait > 0:
            if kind == "tokens" and state.requests is not None:
                state.requests.correct(1)  # refused requests cost nothing
            state.refused.append(_record(path, 429, kind=kind))
            limit = f"{int(bucket.limit)} per min"
            message = f"Rate limit reached for {kind}: limit {limit}. Retry in {wait:.3f}s."
            headers = {
                **state.rate_headers(),
                "retry-after": str(math.ceil(wait)),
                "retry-after-ms": str(math.ceil(wait * 1000)),
            }
            body = error_body(message, kind, "rate_limit_exceeded")
            return JSONResponse(body, 429, headers=headers)
    return None


async def _send_upstream(
    request: Request, path: str, raw: bytes, estimate: int, state: ProxyState
) -> Response:
    assert state.client is not None
    url = f"{state.upstream}/{path}"
    if request.url.query:
        url = f"{url}?{request.url.query}"
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_HEADERS}
    try:
        upstream = await state.client.request(request.method, url, content=raw, headers=headers)
    except httpx.TimeoutException as exc:
        state.forwarded.append(_record(path, 504))
        return JSONResponse(error_body(f"upstream timed out: {exc!r}", "timeout", None), 504)
    except httpx.HTTPError as exc:
        state.forwarded.append(_record(path, 502))
        return JSONResponse(error_body(f"upstream failed: {exc!r}", "upstream_error", None), 502)
    if state.tokens is not None and estimate:
        state.tokens.correct(estimate - _used_tokens(upstream, estimate))
    state.forwarded.append(_record(path, upstream.status_code))
    passed = {k: v for k, v in upstream.headers.items() if k.lower() not in _SKIP_HEADERS}
    return Response(
        upstream.content, upstream.status_code, headers={**passed, **state.rate_headers()}
    )


def _used_tokens(response: httpx.Response, estimate: int) -> int:
    try:
        total = response.json()["usage"]["total_tokens"]
    except (ValueError, KeyError, TypeError):
        return estimate
    return int(total) if isinstance(total, int) else estimate


class _Droppable:
    """Hands the handlers the connection's transport (uvicorn's), so a fault can close it
    without answering; Starlette shares the scope dict down to the route."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None:
                scope["proxy.transport"] = transport
        await self.app(scope, receive, send)


# ---- running it ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--port-file", help="write the port here once listening")
    parser.add_argument("--rpm", type=float, help="requests per minute (none: unlimited)")
    parser.add_argument("--tpm", type=float, help="tokens per minute (none: unlimited)")
    parser.add_argument("--burst-s", type=float, default=1.0, help="seconds of rate a bucket holds")
    args = parser.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    if args.port_file:
        tmp = Path(f"{args.port_file}.tmp")
        tmp.write_text(str(sock.getsockname()[1]))
        tmp.replace(args.port_file)
    app = create_app(args.upstream, args.rpm, args.tpm, args.burst_s)
    config = uvicorn.Config(app, log_level="warning", proxy_headers=False, timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])


@dataclass
class Proxy:
    """A running proxy: ``base_url`` is ``http://127.0.0.1:PORT/v1`` for the engine's config."""

    root: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.root}/_stats", timeout=10).raise_for_status().json())

    def fault(self, **spec: Any) -> None:
        """Queue a fault: ``fault(status=503, count=2, path="chat/completions")``,
        ``fault(drop=1)``, ``fault(delay_s=2.0)``."""
        httpx.post(f"{self.root}/_faults", json=spec, timeout=10).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.root}/_reset", timeout=10).raise_for_status()

    def stop(self) -> None:
        """Terminate the process (by its pid), SIGKILL after 5 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_proxy(
    upstream: str,
    rpm: float | None = None,
    tpm: float | None = None,
    burst_s: float = 1.0,
    log_dir: Path | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Proxy:
    """Start the proxy in a subprocess on a free loopback port and wait until it answers;
    ``with start_proxy(...) as proxy:`` stops it at the end, or call ``proxy.stop()``."""
    folder = Path(log_dir or tempfile.mkdtemp(prefix="ratelimit-proxy-", dir="/tmp"))
    folder.mkdir(parents=True, exist_ok=True)
    port_file = folder / f"port-{os.getpid()}-{time.monotonic_ns()}"
    log = port_file.with_suffix(".log")
    command = [sys.executable, "-m", "tests.support.ratelimit_proxy", "--upstream", upstream]
    command += ["--port", "0", "--port-file", str(port_file), "--burst-s", str(burst_s)]
    command += ["--rpm", str(rpm)] if rpm else []
    command += ["--tpm", str(tpm)] if tpm else []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        root = _wait_ready(process, port_file, log, ready_timeout_s)
    except BaseException:
        Proxy("", process, log).stop()
        raise
    return Proxy(root, process, log)


def _wait_ready(
    process: subprocess.Popen[bytes], port_file: Path, log: Path, timeout_s: float
) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"proxy exited {process.returncode}: {log.read_text()[-3000:]}")
        if port_file.exists():
            root = f"http://127.0.0.1:{port_file.read_text().strip()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{root}/_stats", timeout=2).status_code == 200:
                    return root
        time.sleep(0.05)
    raise RuntimeError(f"proxy did not answer within {timeout_s:g} s: {log.read_text()[-3000:]}")


if __name__ == "__main__":
    main()
