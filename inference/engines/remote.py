"""The remote engine (``engine.kind: openai``): any OpenAI-compatible API, request by request.

The model runs elsewhere (a provider, vLLM's server, a LiteLLM proxy); this worker keeps
``engine.concurrency`` requests in flight from an asyncio loop in a thread of its own, so one
CPU slot drives a remote fleet. It is a :class:`~inference.engines.base.ContinuousEngine`: the
worker submits items as they are leased and each comes back from the ``step`` that saw its
response, exactly as vLLM's are.

Every request first takes budget from the cluster-wide limiter (:mod:`inference.limits`), so
all workers together keep ``limits.requests_per_minute`` / ``tokens_per_minute``; the tokens
are charged from an estimate (prompt bytes / 4 + ``max_tokens`` x ``n``) and corrected from the
response's ``usage``. Every response's rate-limit headers go back to the limiter, which slows
the whole fleet when the provider says so.

Failures are classified at this boundary:

- 429, 408, 409, 5xx, timeouts and connection errors are transient: retried here up to
  ``engine.max_retries`` times with exponential backoff and jitter (``Retry-After`` honoured),
  then handed back to the queue as a :class:`~inference.errors.TransientError` (an attempt
  charged, the queue's backoff applies);
- other 4xx (400, 404, 413, 422) are the item's own fault: a
  :class:`~inference.errors.PermanentError` carrying the provider's message;
- 401 and 403 doom the worker, not the items: :class:`~inference.errors.EngineFatalError`, so
  the leases go back uncharged and a bad key never dead-letters the backlog.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import queue
import random
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import httpx

from inference.config import EngineConfig, LimitsConfig
from inference.engines.base import Prepared
from inference.errors import EngineFatalError, ItemError, PermanentError, TransientError
from inference.schema import Choice, Request, Result

logger = logging.getLogger(__name__)

_PATHS = {"chat": "chat/completions", "completion": "completions", "embedding": "embeddings"}
_STEP_WAIT_S = 0.05  # longest a step blocks for the next response
_TRANSIENT = frozenset({408, 409, 429})
_FATAL = frozenset({401, 403})
_MESSAGE_TOKENS = 4  # what a chat message's role and separators add to its text's tokens


class _Fatal(Exception):
    """A response that dooms the engine (a bad key): the item is not to blame."""


def estimate_prompt_tokens(request: Request) -> int:
    """A tokenizer-free estimate of the prompt's tokens (about 4 bytes a token for English
    text, plus each chat message's framing): what the limiter charges before the response's
    usage says the truth."""
    size = len(request.text.encode())
    return max(1, math.ceil(size / 4) + _MESSAGE_TOKENS * len(request.messages))


def request_body(request: Request, model: str) -> dict[str, Any]:
    """The API body of a parsed request: only the fields :func:`~inference.schema.parse_request`
    checked, so what is sent is what was validated."""
    if request.task == "embedding":
        return {"model": model, "input": request.prompt}
    body: dict[str, Any] = {
        "model": model,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "n": request.n,
    }
    if request.task == "chat":
        body["messages"] = [dict(m) for m in request.messages]
        body["max_completion_tokens"] = request.max_tokens
        if request.logprobs:
            body["logprobs"] = True
            if request.top_logprobs:
                body["top_logprobs"] = request.top_logprobs
    else:
        body["prompt"] = request.prompt
        body["max_tokens"] = request.max_tokens
        if request.logprobs:
            body["logprobs"] = request.top_logprobs
    if request.stop:
        body["stop"] = list(request.stop)
    if request.seed is not None:
        body["seed"] = request.seed
    if request.presence_penalty:
        body["presence_penalty"] = request.presence_penalty
    if request.frequency_penalty:
        body["frequency_penalty"] = request.frequency_penalty
    if request.response_format is not None:
        body["response_format"] = request.response_format
    return body


def _token_bytes(token: str) -> list[int]:
    return list(token.encode())


def _completion_logprobs(raw: Mapping[str, Any] | None) -> list[dict[str, Any]] | None:
    """Legacy completions logprobs (parallel lists) as the chat ``logprobs.content`` list the
    output keeps for every task."""
    if not raw:
        return None
    tokens = raw.get("tokens") or []
    values = raw.get("token_logprobs") or []
    tops = raw.get("top_logprobs") or [None] * len(tokens)
    out = []
    for token, value, top in zip(tokens, values, tops, strict=False):
        alternatives = [
            {"token": t, "logprob": lp, "bytes": _token_bytes(t)} for t, lp in (top or {}).items()
        ]
        out.append(
            {
                "token": token,
                "logprob": value,
                "bytes": _token_bytes(token),
                "top_logprobs": alternatives,
            }
        )
    return out


def parse_response(request: Request, data: Mapping[str, Any]) -> Result:
    """A provider's response as a :class:`~inference.schema.Result`; the token counts are the
    response's ``usage``. Raises ValueError when it is not the shape its endpoint answers."""
    usage = data.get("usage") or {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    if request.task == "embedding":
        vector = data["data"][0]["embedding"]
        return Result(embedding=[float(x) for x in vector], prompt_tokens=prompt_tokens)
    raw = sorted(data["choices"], key=lambda c: int(c.get("index", 0)))
    if not raw:
        raise ValueError("the response has no choices")
    total = int(usage.get("completion_tokens") or 0)
    share, extra = divmod(total, len(raw))  # usage is per response: spread over its choices
    choices = []
    for i, c in enumerate(raw):
        if request.task == "chat":
            text = (c.get("message") or {}).get("content") or ""
            logprobs = (c.get("logprobs") or {}).get("content") if request.logprobs else None
        else:
            text = c.get("text") or ""
            logprobs = _completion_logprobs(c.get("logprobs")) if request.logprobs else None
        choices.append(
            Choice(
                index=i,
                text=text,
                finish_reason=c.get("finish_reason") or "stop",
                completion_tokens=share + (1 if i < extra else 0),
                logprobs=logprobs,
            )
        )
    return Result.from_choices(request, choices, prompt_tokens)


def provider_message(response: httpx.Response) -> str:
    """The error message a provider put in its body (OpenAI's ``error.message``), or the
    body's start."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:1000]
        if isinstance(error, str):
            return error[:1000]
        if data.get("message"):
            return str(data["message"])[:1000]
    return json.dumps(data)[:300]


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` (seconds; OpenAI also sends ``retry-after-ms``), None when absent."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            return None  # an HTTP date: rare from model APIs; the backoff applies instead
    return None


def auth_headers(config: EngineConfig) -> dict[str, str]:
    """The Authorization header from the variable ``engine.api_key_env`` names (none without
    one); a named variable that is not set dooms the worker, never the items."""
    if not config.api_key_env:
        return {}
    key = os.environ.get(config.api_key_env)
    if not key:
        raise EngineFatalError(
            f"engine.api_key_env names {config.api_key_env}, which is not set on this "
            "worker (set it in the Ray job's runtime_env or the node's environment)"
        )
    return {"Authorization": f"Bearer {key}"}


Finished = tuple[Prepared, Result | ItemError]


def take_finished(done: queue.SimpleQueue[Finished], wait_s: float) -> list[Finished]:
    """What has finished: the first within ``wait_s``, and all that came with it."""
    finished = []
    try:
        finished.append(done.get(timeout=wait_s))
        while True:
            finished.append(done.get_nowait())
    except queue.Empty:
        pass
    return finished


class RemoteEngine:
    """What the remote engines share: no tokenizer here (the prompt's tokens are estimated),
    every task the API serves, fed continuously."""

    continuous = True
    tasks = frozenset({"chat", "completion", "embedding"})

    def prepare(self, request: Request) -> Prepared:
        if request.task not in self.tasks:
            raise PermanentError(f"{request.task} requests are not served here", code="unsupported")
        return Prepared(
            request=request, prompt_ids=[], prompt_estimate=estimate_prompt_tokens(request)
        )

    def run(self, batch: list[Prepared]) -> list[Result | ItemError]:
        """Batch at a time (the contract's other half): submit all, wait for all."""
        self.submit(batch)
        results: dict[int, Result | ItemError] = {}
        while len(results) < len(batch):
            for item, result in self.step():
                results[id(item)] = result
        return [results[id(item)] for item in batch]

    def in_flight_tokens(self) -> int:
        return 0  # the remote fleet's memory is not ours to budget; the limiter holds tokens

    def submit(self, items: list[Prepared]) -> list[tuple[Prepared, ItemError]]:
        raise NotImplementedError

    def step(self) -> list[tuple[Prepared, Result | ItemError]]:
        raise NotImplementedError


class OpenAIEngine(RemoteEngine):
    """Requests to an OpenAI-compatible API, ``engine.concurrency`` at a time."""

    def __init__(
        self, config: EngineConfig, limits: LimitsConfig | None = None, client_id: str = ""
    ) -> None:
        assert config.base_url is not None  # the config checks it
        self.config = config
        self.model_name = config.model
        self.max_batch_size = config.concurrency
        self.context_len = config.max_model_len or 1 << 30  # the provider checks it
        self._headers = auth_headers(config)
        from inference.limits import Limiter, limiter_key  # Ray's side: the worker's only

        self._limiter = Limiter.connect(
            limiter_key(config, limits or LimitsConfig()), limits or LimitsConfig(), client_id
        )
        self._done: queue.SimpleQueue[tuple[Prepared, Result | ItemError]] = queue.SimpleQueue()
        self._in_flight: dict[int, tuple[Prepared, Future[Result | ItemError]]] = {}
        self._lock = threading.Lock()
        self._fatal: str | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="remote", daemon=True)
        self._thread.start()
        self._client = self._call(self._make_client())

    # ------------------------------------------------------------------ the loop thread
    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _make_client(self) -> httpx.AsyncClient:
        n = self.config.concurrency
        return httpx.AsyncClient(
            base_url=self.config.base_url.rstrip("/") + "/",  # type: ignore[union-attr]
            headers=self._headers,
            timeout=httpx.Timeout(self.config.request_timeout_s, connect=30.0),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        )

    # ------------------------------------------------------------------ the contract
    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def submit(self, items: list[Prepared]) -> list[tuple[Prepared, ItemError]]:
        for item in items:
            future = asyncio.run_coroutine_threadsafe(self._one(item), self._loop)
            with self._lock:
                self._in_flight[id(item)] = (item, future)
            future.add_done_callback(functools.partial(self._finished, item))
        return []

    def step(self) -> list[tuple[Prepared, Result | ItemError]]:
        finished = take_finished(self._done, _STEP_WAIT_S)
        if self._fatal is not None:
            # Hand the finished ones back as aborted too: the worker releases them uncharged.
            raise EngineFatalError(self._fatal)
        with self._lock:
            for item, _ in finished:
                self._in_flight.pop(id(item), None)
        return finished

    def abort(self) -> list[Prepared]:
        with self._lock:
            held = list(self._in_flight.values())
            self._in_flight.clear()
        for _, future in held:
            future.cancel()
        return [item for item, _ in held]

    def close(self) -> None:
        self.abort()
        try:
            self._call(self._client.aclose())
        finally:
            self._limiter.close()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ one request
    def _finished(self, item: Prepared, future: Future[Result | ItemError]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if isinstance(exc, _Fatal):
            self._fatal = str(exc)  # the item stays in flight: abort hands it back
            return
        if exc is not None:  # a bug here, not the item's fault: hand it back to the queue
            logger.exception("remote request failed", exc_info=exc)
            result: Result | ItemError = TransientError(f"engine error: {exc}", "engine_error")
        else:
            result = future.result()
        self._done.put((item, result))

    async def _one(self, item: Prepared) -> Result | ItemError:
        request = item.request
        body = request_body(request, self.config.model)
        path = _PATHS[request.task]
        charged = item.cost_tokens
        attempt = 0
        while True:
            await self._limiter.acquire(charged)
            wait: float | None = None
            try:
                response = await self._client.post(path, json=body)
            except httpx.TimeoutException:
                self._limiter.settle(charged, 0)
                error: ItemError = TransientError(
                    f"no response from {self.config.base_url} within "
                    f"{self.config.request_timeout_s:g} s",
                    "timeout",
                )
            except httpx.TransportError as exc:
                self._limiter.settle(charged, 0)
                error = TransientError(
                    f"connection to {self.config.base_url} failed: {exc!r}", "connection_error"
                )
            else:
                status = response.status_code
                self._limiter.observe(status, response.headers)
                if status == 200:
                    return self._result(request, response, charged)
                self._limiter.settle(charged, 0)
                message = provider_message(response)
                if status in _FATAL:
                    raise _Fatal(
                        f"HTTP {status} from {self.config.base_url}: {message} (check the key "
                        f"in {self.config.api_key_env or 'engine.api_key_env'})"
                    )
                if status not in _TRANSIENT and status < 500:
                    return PermanentError(f"HTTP {status}: {message}", f"http_{status}")
                error = TransientError(f"HTTP {status}: {message}", f"http_{status}")
                wait = retry_after_s(response.headers)
            if attempt >= self.config.max_retries:
                return error
            backoff = min(self.config.retry_max_s, self.config.retry_base_s * 2**attempt)
            await asyncio.sleep(max(wait or 0.0, backoff * random.uniform(0.5, 1.5)))
            attempt += 1

    def _result(
        self, request: Request, response: httpx.Response, charged: int
    ) -> Result | ItemError:
        try:
            result = parse_response(request, response.json())
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            self._limiter.settle(charged, charged)
            return TransientError(
                f"unreadable response from {self.config.base_url}: {exc!r}", "bad_response"
            )
        self._limiter.settle(charged, result.prompt_tokens + result.completion_tokens)
        return result
