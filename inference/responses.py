"""OpenAI Responses request bodies (``/v1/responses``) read as the chat requests engines run.

``instructions`` becomes a leading system message and ``input`` (a string, or message items whose
content is a string or text parts) the messages; ``max_output_tokens`` is the token limit,
``temperature``, ``top_p`` and ``seed`` sample as in chat, and ``text.format`` is the response
format (structured outputs, as chat's ``response_format``). ``metadata``, ``store``, ``user``,
``safety_identifier`` and ``prompt_cache_key`` are checked and change nothing (nothing is stored
here anyway). Whatever else a Responses request may ask for (tools, reasoning, stored
conversations, streaming, images, files) is refused, naming the field, never ignored:
``unsupported`` for what OpenAI takes and no engine here runs, ``invalid_request`` for a
malformed body or a field OpenAI does not know. The output side is
:func:`inference.export.response_body`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from inference.errors import PermanentError
from inference.schema import (
    _MAX_TOKENS_DEFAULT,
    RESPONSES_URL,
    Request,
    _integer,
    _invalid,
    _known_keys,
    _number,
    json_schema_format,
)

_TEXT_PARTS = {
    "input_text": {"type", "text"},
    "output_text": {"type", "text", "annotations", "logprobs"},  # an earlier answer given back
}
_OTHER_PARTS = frozenset({"input_image", "input_file", "input_audio", "refusal"})
_OTHER_ITEMS = frozenset({"reasoning", "item_reference", "compaction", "mcp_list_tools"})


def _is(*values: Any) -> Callable[[Any], bool]:
    """Whether a value is one of ``values``, of the same JSON type (``0`` is not ``false``)."""
    return lambda value: any(type(value) is type(v) and value == v for v in values)


def _string(value: Any) -> bool:
    return value is None or isinstance(value, str)


# Responses fields that no engine here can honour, each with the values that ask for nothing
# (the defaults) and why it cannot be run; any other value is refused as unsupported.
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (_is(None, []), "no tools run here"),
    "tool_choice": (_is(None, "none"), "no tools run here"),
    "parallel_tool_calls": (_is(None, False), "no tools run here"),
    "max_tool_calls": (_is(None), "no tools run here"),
    "reasoning": (_is(None), "the models here do not reason"),
    "background": (_is(None, False), "a batch item always runs in the background"),
    "background_options": (_is(None), "a batch item always runs in the background"),
    "previous_response_id": (_is(None), "no responses are stored here"),
    "conversation": (_is(None), "no conversations are stored here"),
    "context_management": (_is(None), "no conversations are stored here"),
    "prompt": (_is(None), "no prompt templates are stored here"),
    "include": (_is(None, []), "no extra output is produced"),
    "top_logprobs": (_is(None, 0), "logprobs are not produced on /v1/responses"),
    "stream": (_is(None, False), "a batch item is answered whole"),
    "stream_options": (_is(None), "a batch item is answered whole"),
    "truncation": (_is(None, "disabled"), "a prompt too long for the model is refused"),
    "service_tier": (_is(None, "auto", "default"), "there is one service tier here"),
    "moderation": (_is(None), "nothing is moderated here"),
    "image": (_is(None), "no images are generated here"),
    "access_programs": (_is(None), "there are no access programs here"),
    "prompt_cache_options": (_is(None), "the prompt cache is the engine's own"),
}
# Fields that change nothing here, with the check of their type (a wrong type is malformed).
_INERT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "store": (_is(None, True, False), "a boolean"),
    "user": (_string, "a string"),
    "safety_identifier": (_string, "a string"),
    "prompt_cache_key": (_string, "a string"),
    "prompt_cache_retention": (_is(None, "in_memory", "24h"), "in_memory or 24h"),
}
_READ = frozenset(
    {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "seed"}
    | {"text", "metadata"}
)


def _unsupported(message: str) -> PermanentError:
    return PermanentError(message, code="unsupported")


def parse_responses(body: Any) -> Request:
    """The chat request of a Responses body; raises PermanentError naming the field."""
    if not isinstance(body, dict):
        raise _invalid("body must be a JSON object")
    for name in sorted(body, key=str):
        if name not in _READ and name not in _UNSUPPORTED and name not in _INERT:
            raise _invalid(f"body.{name} is not a known field of {RESPONSES_URL}")
    for name, (check, noun) in _INERT.items():
        if not check(body.get(name)):
            raise _invalid(f"body.{name} must be {noun}")
    _check_metadata(body.get("metadata"))
    for name, (inert, why) in _UNSUPPORTED.items():
        if not inert(body.get(name)):
            raise _unsupported(f"body.{name} is not supported on {RESPONSES_URL} ({why})")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise _invalid("body.model must be a string")
    max_tokens = _integer(body, "max_output_tokens", _MAX_TOKENS_DEFAULT, 1, 1_000_000)
    assert max_tokens is not None
    return Request(
        task="chat",
        model=model,
        messages=_messages(body),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=_integer(body, "seed", None, -(2**63), 2**63 - 1),
        response_format=_text_format(body.get("text")),
    )


def _check_metadata(value: Any) -> None:
    """OpenAI's metadata: up to 16 string pairs, keys up to 64 and values up to 512 chars."""
    if value is None:
        return
    if not isinstance(value, dict) or len(value) > 16:
        raise _invalid("body.metadata must be an object of at most 16 string pairs")
    for key, text in value.items():
        if len(key) > 64 or not isinstance(text, str) or len(text) > 512:
            raise _invalid(
                f"body.metadata[{key[:64]!r}] must be a string of at most 512 characters "
                "under a key of at most 64"
            )


def _messages(body: dict[str, Any]) -> tuple[dict[str, str], ...]:
    out: list[dict[str, str]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _invalid("body.instructions must be a string")
        if instructions:
            out.append({"role": "system", "content": instructions})
    value = body.get("input")
    if isinstance(value, str):
        out.append({"role": "user", "content": value})
    elif isinstance(value, list) and value:
        out.extend(_message(item, f"body.input[{i}]") for i, item in enumerate(value))
    else:
        raise _invalid("body.input must be a string or a non-empty list of message items")
    return tuple(out)


def _message(item: Any, where: str) -> dict[str, str]:
    """One message item: ``{"role", "content"}``, ``"type": "message"`` optional; an output
    message given back as input may carry its ``id`` and ``status``."""
    if not isinstance(item, dict):
        raise _invalid(f"{where} must be an object")
    kind = item.get("type", "message")
    if kind != "message":
        if isinstance(kind, str) and (kind in _OTHER_ITEMS or kind.endswith(("_call", "_output"))):
            raise _unsupported(
                f"{where}.type {kind!r:.60} is not supported on {RESPONSES_URL} "
                "(only message items)"
            )
        raise _invalid(f"{where}.type must be message, got {kind!r:.60}")
    _known_keys(item, where, {"type", "role", "content", "id", "status"})
    role, content = item.get("role"), item.get("content")
    if role not in ("user", "system", "developer", "assistant"):
        raise _invalid(f"{where}.role must be user, system, developer or assistant")
    if isinstance(content, list):
        content = "".join(
            _text_part(part, f"{where}.content[{i}]", role) for i, part in enumerate(content)
        )
    if not isinstance(content, str):
        raise _invalid(f"{where}.content must be a string or a list of text parts")
    return {"role": "system" if role == "developer" else role, "content": content}


def _text_part(part: Any, where: str, role: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    kind = kind if isinstance(kind, str) else None
    if kind in _OTHER_PARTS:
        raise _unsupported(
            f"{where}: {kind} parts are not supported on {RESPONSES_URL} (text parts only)"
        )
    if kind == "output_text" and role != "assistant":
        raise _invalid(f"{where}: output_text parts belong to assistant messages")
    if kind not in _TEXT_PARTS:
        raise _invalid(f"{where}.type must be input_text or output_text")
    assert isinstance(part, dict)
    _known_keys(part, where, _TEXT_PARTS[kind])
    text = part.get("text")
    if not isinstance(text, str):
        raise _invalid(f"{where}.text must be a string")
    return text


def _text_format(text: Any) -> dict[str, Any] | None:
    """Chat's normalised ``response_format`` of ``body.text``: None for plain text."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _invalid("body.text must be an object")
    _known_keys(text, "body.text", {"format", "verbosity"})
    verbosity = text.get("verbosity")
    if verbosity not in (None, "low", "medium", "high"):
        raise _invalid("body.text.verbosity must be low, medium or high")
    if verbosity not in (None, "medium"):
        raise _unsupported(
            f"body.text.verbosity {verbosity} is not supported on {RESPONSES_URL} "
            "(the models here take no verbosity)"
        )
    value = text.get("format")
    if value is None:
        return None
    where = "body.text.format"
    if not isinstance(value, dict):
        raise _invalid(f"{where} must be an object")
    kind = value.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise _invalid(f"{where}.type must be text, json_object or json_schema, got {kind!r:.40}")
    if kind != "json_schema":
        _known_keys(value, where, {"type"})
        return None if kind == "text" else {"type": "json_object"}
    _known_keys(value, where, {"type", "name", "schema", "strict", "description"})
    return json_schema_format(value, where)
