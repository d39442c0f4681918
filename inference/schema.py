"""Requests, results and the Arrow schemas of what users read.

An item's payload is the OpenAI batch line's ``url`` and ``body``. :func:`parse_request` turns it
into a typed :class:`Request`; every layer (input reader, HTTP API, worker) uses that one parser,
so an item is judged the same way wherever it enters.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

from inference.errors import PermanentError

Task = Literal["chat", "completion", "embedding"]

CUSTOM_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
RESPONSES_URL = "/v1/responses"
URL_TASKS: dict[str, Task] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
    RESPONSES_URL: "chat",  # a Responses body is read as a chat request (inference.responses)
}
# Body fields an engine here cannot honour; a request that sets them is refused, never ignored.
_UNSUPPORTED = ("tools", "functions", "tool_choice", "logit_bias", "stream")
_MAX_TOKENS_DEFAULT = 256
_SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's json_schema.name, fullmatch
_LOGPROB_FLOOR = -9999.0  # what OpenAI (and vLLM's server) report for a -inf logprob


@dataclass(frozen=True, slots=True)
class Request:
    """One item, parsed: what to run and how to sample."""

    task: Task
    model: str = ""
    messages: tuple[dict[str, str], ...] = ()
    prompt: str = ""
    max_tokens: int = _MAX_TOKENS_DEFAULT
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False  # token logprobs wanted (completions' legacy ``logprobs: N`` too)
    top_logprobs: int = 0  # alternatives per token (completions' legacy N)
    # None, {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}; checked
    # here, compiled by the engine.
    response_format: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """All input text, for size estimates."""
        if self.messages:
            return "\n".join(m["content"] for m in self.messages)
        return self.prompt


def _invalid(message: str) -> PermanentError:
    return PermanentError(message, code="invalid_request")


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(f"body.{name} must be a number")
    if not lo <= value <= hi:
        raise _invalid(f"body.{name} must be between {lo} and {hi}, got {value}")
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"body.{name} must be an integer")
    if not lo <= value <= hi:
        raise _invalid(f"body.{name} must be between {lo} and {hi}, got {value}")
    return value


def _messages(body: dict[str, Any]) -> tuple[dict[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("body.messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"body.messages[{i}] must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant", "developer"):
            raise _invalid(f"body.messages[{i}].role must be system, user or assistant")
        if isinstance(content, list):  # OpenAI content parts: text only
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise PermanentError(
                        f"body.messages[{i}].content: only text parts are supported",
                        code="unsupported",
                    )
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        if not isinstance(content, str):
            raise _invalid(f"body.messages[{i}].content must be a string")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return tuple(out)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise _invalid("body.stop must be a string or a list of up to 4 non-empty strings")
    return tuple(stop)


def _logprobs(body: dict[str, Any], task: Task) -> tuple[bool, int]:
    """(logprobs, top_logprobs). Chat: ``logprobs`` a boolean, ``top_logprobs`` 0..20 with it.
    Completions: the legacy ``logprobs`` integer 0..5, the number of alternatives."""
    raw = body.get("logprobs")
    if task == "completion":
        if body.get("top_logprobs") is not None:
            raise PermanentError(
                "body.top_logprobs is a chat parameter; /v1/completions takes body.logprobs "
                "(an integer 0..5)",
                code="unsupported",
            )
        if raw is None or raw is False:
            return False, 0
        if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 5:
            raise _invalid("body.logprobs must be an integer between 0 and 5")
        return True, raw
    if raw is not None and not isinstance(raw, bool):
        raise _invalid("body.logprobs must be a boolean")
    top = _integer(body, "top_logprobs", None, 0, 20)
    if top is not None and not raw:
        raise _invalid("body.top_logprobs requires body.logprobs: true")
    return bool(raw), top or 0


def _response_format(body: dict[str, Any], task: Task) -> dict[str, Any] | None:
    """The response format, normalised: None for plain text, else a json_object or a
    json_schema format whose schema is checked (not compiled: that is the engine's job)."""
    value = body.get("response_format")
    if value is None:
        return None
    if task != "chat":
        raise PermanentError(
            "body.response_format is supported for chat requests only", code="unsupported"
        )
    where = "body.response_format"
    if not isinstance(value, dict):
        raise _invalid(f"{where} must be an object")
    kind = value.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise _invalid(f"{where}.type must be text, json_object or json_schema, got {kind!r:.40}")
    _known_keys(value, where, {"type", "json_schema"} if kind == "json_schema" else {"type"})
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    where += ".json_schema"
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _invalid(f"{where} must be an object")
    _known_keys(spec, where, {"name", "description", "schema", "strict"})
    return json_schema_format(spec, where)


def json_schema_format(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """The normalised ``json_schema`` response format of ``spec`` (its ``name``, ``schema``
    and optional ``description`` and ``strict``), checked; errors name fields under ``where``.
    Chat nests these under ``response_format.json_schema``, Responses has them flat in
    ``text.format``: both come here."""
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise _invalid(f"{where}.name must be 1 to 64 letters, digits, underscores or dashes")
    out: dict[str, Any] = {"name": name}
    for key, kinds, noun in (("description", str, "a string"), ("strict", bool, "a boolean")):
        if spec.get(key) is not None:
            if not isinstance(spec[key], kinds):
                raise _invalid(f"{where}.{key} must be {noun}")
            out[key] = spec[key]
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise _invalid(f"{where}.schema must be an object")
    try:
        problem = _json_schema_problem(_CANONICAL(schema))
    except RecursionError:
        problem = "it is nested too deeply"
    if problem is not None:
        raise _invalid(f"{where}.schema is not a valid JSON Schema: {problem}")
    out["schema"] = schema
    return {"type": "json_schema", "json_schema": out}


def _known_keys(value: dict[str, Any], where: str, known: set[str]) -> None:
    unknown = sorted(set(value) - known, key=str)
    if unknown:
        raise _invalid(f"{where}.{unknown[0]} is not a known field here")


@functools.lru_cache(maxsize=256)
def _json_schema_problem(text: str) -> str | None:
    """Why the JSON Schema in ``text`` is not a valid Draft 2020-12 schema, or None. Cached by
    the schema's canonical text: a job sends one schema for many items. Without ``jsonschema``
    (a dependency of Ray, so normally there) the engine's compiler is the only judge."""
    try:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError
    except ImportError:  # pragma: no cover
        return None
    try:
        Draft202012Validator.check_schema(json.loads(text))
    except SchemaError as exc:
        return f"{exc.message} (at {exc.json_path})"
    except RecursionError:
        return "it is nested too deeply"
    return None


def parse_request(url: Any, body: Any) -> Request:
    """Parse an OpenAI batch request; raises PermanentError naming the field and the reason.

    ``code`` is ``invalid_request`` for a malformed request and ``unsupported`` for a valid one
    that no engine here can run.
    """
    task = URL_TASKS.get(url) if isinstance(url, str) else None
    if task is None:
        raise _invalid(f"url must be one of {', '.join(URL_TASKS)}, got {url!r}")
    if url == RESPONSES_URL:
        from inference.responses import parse_responses  # built on this module's helpers

        return parse_responses(body)
    if not isinstance(body, dict):
        raise _invalid("body must be a JSON object")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise _invalid("body.model must be a string")
    if task == "embedding":
        text = body.get("input")
        if isinstance(text, list) and len(text) == 1:
            text = text[0]
        if not isinstance(text, str):
            raise _invalid("body.input must be a string (one input per item)")
        if not text:
            raise _invalid("body.input must not be empty")
        return Request(task="embedding", model=model, prompt=text, max_tokens=0)
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False):
            raise PermanentError(f"body.{name} is not supported", code="unsupported")
    if task == "chat":
        messages, prompt = _messages(body), ""
        limit_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    else:
        raw = body.get("prompt")
        if isinstance(raw, list) and len(raw) == 1:
            raw = raw[0]
        if not isinstance(raw, str):
            raise _invalid("body.prompt must be a string (one prompt per item)")
        messages, prompt, limit_name = (), raw, "max_tokens"
    max_tokens = _integer(body, limit_name, _MAX_TOKENS_DEFAULT, 1, 1_000_000)
    seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
    n = _integer(body, "n", 1, 1, 128)
    assert max_tokens is not None and n is not None
    logprobs, top_logprobs = _logprobs(body, task)
    return Request(
        task=task,
        model=model,
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        stop=_stop(body),
        seed=seed,
        n=n,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        response_format=_response_format(body, task),
    )


def _canonical_encoder() -> Callable[[dict[str, Any]], str]:
    """``json.dumps(value, sort_keys=True, separators=(",", ":"))`` as one C call: the json
    module's own C encoder, made once, without the per-call set-up of ``JSONEncoder.encode``
    and without its circular-reference bookkeeping (a payload comes from parsed JSON, which
    cannot be circular; a circular value still fails, with RecursionError). The same text,
    about 40% cheaper on the API's hot path; plain ``JSONEncoder`` where the C encoder is
    missing."""
    standard = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return standard.encode
    chunks = make(
        None,
        standard.default,
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        True,
        False,
        True,
    )

    def encode(value: dict[str, Any]) -> str:
        return "".join(chunks(value, 0))

    return encode


_CANONICAL = _canonical_encoder()


def encode_payload(url: str, body: dict[str, Any]) -> str:
    """The queue's payload text of an item: canonical JSON, so equal requests compare equal."""
    return _CANONICAL({"url": url, "body": body})


def decode_payload(payload: str) -> Request:
    return decode_item(payload)[1]


def decode_item(payload: str) -> tuple[str, Request]:
    """The url of an item's payload (its endpoint, which shapes its answer) and its request."""
    data = json.loads(payload)
    url = data.get("url")
    return str(url), parse_request(url, data.get("body"))


def estimate_tokens(request: Request) -> int:
    """A cheap upper-ish estimate of an item's tokens (input + output) without a tokenizer."""
    return len(request.text) // 3 + 8 + request.max_tokens * request.n


@dataclass(slots=True)
class Choice:
    """One of a generation's ``n`` choices. ``logprobs`` is OpenAI's chat ``logprobs.content``
    list, ``[{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]``,
    or None when logprobs were not asked for."""

    index: int
    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class Result:
    """What an engine returns for one item.

    ``output_text`` and ``finish_reason`` are choice 0's and ``completion_tokens`` the sum over
    all choices; ``choices`` is set only when the request asked for ``n > 1`` or for logprobs
    (:meth:`from_choices` keeps to that)."""

    output_text: str | None = None
    embedding: list[float] | None = None
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    choices: list[Choice] | None = None

    @classmethod
    def from_choices(cls, request: Request, choices: list[Choice], prompt_tokens: int) -> Result:
        """The result of a generation with these choices (in index order, at least one)."""
        first = choices[0]
        return cls(
            output_text=first.text,
            finish_reason=first.finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=sum(c.completion_tokens for c in choices),
            choices=list(choices) if request.n > 1 or request.logprobs else None,
        )


def choices_column(result: Result) -> list[dict[str, Any]] | None:
    """The ``choices`` value of a result row: one struct per choice, its logprobs as JSON text
    (a -inf logprob written as -9999.0, as OpenAI does, so the text stays strict JSON)."""
    if result.choices is None:
        return None
    return [
        {
            "index": c.index,
            "text": c.text,
            "finish_reason": c.finish_reason,
            "completion_tokens": c.completion_tokens,
            "logprobs": None
            if c.logprobs is None
            else json.dumps(_finite(c.logprobs), separators=(",", ":"), allow_nan=False),
        }
        for c in result.choices
    ]


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else _LOGPROB_FLOOR
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


CHOICE_TYPE = pa.struct(
    [
        pa.field("index", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("logprobs", pa.string()),  # JSON text of the chat logprobs.content list
    ]
)


RESULT_SCHEMA = pa.schema(
    [
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("custom_id", pa.string(), nullable=False),
        pa.field("output_text", pa.string()),
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("model", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("worker", pa.string()),
        pa.field("latency_ms", pa.float64()),
        pa.field("completed_at", pa.timestamp("us", tz="UTC")),
        # Added columns go last, so older readers' column order holds; in shards written
        # before a column existed it reads as nulls (readers pass this schema).
        # Null when n == 1 and no logprobs.
        pa.field("choices", pa.list_(CHOICE_TYPE)),
        # The item's endpoint, which shapes its answer (a native job may mix them); where it is
        # null, readers guess (an embedding, else chat).
        pa.field("url", pa.string()),
    ]
)

ERROR_SCHEMA = pa.schema(
    [
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("custom_id", pa.string(), nullable=False),
        pa.field("error_kind", pa.string()),
        pa.field("error_code", pa.string()),
        pa.field("message", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("last_attempt_at", pa.timestamp("us", tz="UTC")),
    ]
)
