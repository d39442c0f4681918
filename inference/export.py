"""A job's results and dead letters as OpenAI batch output and error lines (JSONL).

Output line (one per completed item)::

    {"id": "batch_req_...", "custom_id": "doc-17",
     "response": {"status_code": 200, "request_id": "req_...", "body": {chat.completion ...}},
     "error": null}

Error line (one per dead letter): a request the model refused gets ``response.status_code`` 400
(``permanent``) or 500 (``transient`` attempts spent) with an OpenAI error body; an item the batch
never ran gets ``response: null`` and ``error.code`` ``batch_expired`` or ``batch_cancelled``.
Ids are derived from the job and ``custom_id``, so exporting twice gives the same lines.
Reading is streaming, one record batch of one shard at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from inference.queue.records import JOB_END_CODES
from inference.schema import ERROR_SCHEMA, RESPONSES_URL, RESULT_SCHEMA
from inference.shards import JobOutput, resolve_fs

_EXPIRED = "This request could not be executed before the completion window expired."
_CANCELLED = "This request was not executed because the batch was cancelled."


def _hash_id(prefix: str, *parts: str) -> str:
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
    return f"{prefix}{digest}"


def _timestamp(value: Any) -> int:
    return int(value.timestamp()) if isinstance(value, datetime) else int(value or 0)


def response_body(row: dict[str, Any], endpoint: str | None = None) -> dict[str, Any]:
    """The OpenAI response body of one result row: a chat.completion, a text_completion, an
    embedding list or a Responses ``response``. Without ``endpoint`` the row's ``url`` decides,
    and a row written before that column by its content (an embedding, else chat). A row with
    ``choices`` (``n > 1`` or logprobs asked for) gives all of them, with their logprobs; a row
    without gives one choice, from ``output_text``."""
    if endpoint is None:
        endpoint = row.get("url") or (
            "/v1/embeddings" if row.get("embedding") is not None else "/v1/chat/completions"
        )
    prompt = int(row.get("prompt_tokens") or 0)
    completion = int(row.get("completion_tokens") or 0)
    created = _timestamp(row.get("completed_at"))
    model = row.get("model") or ""
    key = (str(row["job_id"]), str(row["custom_id"]))
    if endpoint == "/v1/embeddings":
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": row.get("embedding") or []}],
            "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
    if endpoint == RESPONSES_URL:
        return _response(row, key, created)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if endpoint == "/v1/completions":
        return {
            "id": _hash_id("cmpl-", *key),
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [_completion_choice(c) for c in _choices(row)],
            "usage": usage,
        }
    return {
        "id": _hash_id("chatcmpl-", *key),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [_chat_choice(c) for c in _choices(row)],
        "usage": usage,
    }


def _response(row: dict[str, Any], key: tuple[str, str], created: int) -> dict[str, Any]:
    """A Responses ``response`` object: one assistant message of one output_text part,
    ``incomplete`` (reason ``max_output_tokens``) where the token limit cut it. Request fields
    that OpenAI echoes back (instructions, metadata, temperature, ...) are not kept in a result
    row, so they read as null; no tools run here, so none are listed."""
    prompt = int(row.get("prompt_tokens") or 0)
    completion = int(row.get("completion_tokens") or 0)
    cut = row.get("finish_reason") == "length"
    status = "incomplete" if cut else "completed"
    return {
        "id": _hash_id("resp_", *key),
        "object": "response",
        "created_at": created,
        "completed_at": None if cut else created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "model": row.get("model") or "",
        "output": [
            {
                "type": "message",
                "id": _hash_id("msg_", *key),
                "status": status,
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": row.get("output_text") or "", "annotations": []}
                ],
            }
        ],
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        },
    }


def _choices(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The row's choices (``index``, ``text``, ``finish_reason``, ``logprobs`` as the parsed
    chat content list or None); a row without the ``choices`` column holds choice 0 only."""
    stored = row.get("choices")
    if not stored:
        return [
            {
                "index": 0,
                "text": row.get("output_text") or "",
                "finish_reason": row.get("finish_reason") or "stop",
                "logprobs": None,
            }
        ]
    return [
        {
            "index": int(c.get("index") or 0),
            "text": c.get("text") or "",
            "finish_reason": c.get("finish_reason") or "stop",
            "logprobs": None if c.get("logprobs") is None else json.loads(c["logprobs"]),
        }
        for c in stored
    ]


def _chat_choice(choice: dict[str, Any]) -> dict[str, Any]:
    content = choice["logprobs"]
    return {
        "index": choice["index"],
        "message": {"role": "assistant", "content": choice["text"], "refusal": None},
        "logprobs": None if content is None else {"content": content, "refusal": None},
        "finish_reason": choice["finish_reason"],
    }


def _completion_choice(choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "index": choice["index"],
        "text": choice["text"],
        "logprobs": None if choice["logprobs"] is None else _legacy_logprobs(choice["logprobs"]),
        "finish_reason": choice["finish_reason"],
    }


def _legacy_logprobs(content: list[dict[str, Any]]) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object of a chat ``logprobs.content`` list:
    ``tokens``, ``token_logprobs``, ``top_logprobs`` (one ``{token: logprob}`` per position)
    and ``text_offset`` (where each token starts in the completion text)."""
    tokens = [str(entry.get("token", "")) for entry in content]
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [entry.get("logprob") for entry in content],
        "top_logprobs": [
            {
                str(top.get("token", "")): top.get("logprob")
                for top in entry.get("top_logprobs") or []
            }
            for entry in content
        ],
        "text_offset": offsets,
    }


def output_line(row: dict[str, Any], endpoint: str | None = None) -> dict[str, Any]:
    key = (str(row["job_id"]), str(row["custom_id"]))
    return {
        "id": _hash_id("batch_req_", *key),
        "custom_id": row["custom_id"],
        "response": {
            "status_code": 200,
            "request_id": _hash_id("req_", *key),
            "body": response_body(row, endpoint),
        },
        "error": None,
    }


def error_line(dead: dict[str, Any], end_reason: str | None = None) -> dict[str, Any]:
    """The error line of a dead letter; ``end_reason`` (``expired``/``cancelled``) tells what an
    item cancelled before it ran stands for."""
    key = (str(dead["job_id"]), str(dead["custom_id"]))
    line: dict[str, Any] = {
        "id": _hash_id("batch_req_", *key),
        "custom_id": dead["custom_id"],
        "response": None,
        "error": None,
    }
    code = dead.get("error_code") or "error"
    if code in JOB_END_CODES:  # an item its job's end stopped
        expired = code == "expired" or end_reason == "expired"
        line["error"] = {
            "code": "batch_expired" if expired else "batch_cancelled",
            "message": _EXPIRED if expired else _CANCELLED,
        }
        return line
    permanent = dead.get("error_kind") == "permanent"
    line["response"] = {
        "status_code": 400 if permanent else 500,
        "request_id": _hash_id("req_", *key),
        "body": {
            "error": {
                "message": dead.get("message") or code,
                "type": "invalid_request_error" if permanent else "server_error",
                "param": None,
                "code": code,
            }
        },
    }
    return line


def _files(job_dir: str, errors: bool) -> tuple[pafs.FileSystem, list[str]]:
    fs, base, _ = resolve_fs(job_dir)
    manifest = f"{base}/_manifest.json"
    if not errors and fs.get_file_info(manifest).type == pafs.FileType.File:
        with fs.open_input_stream(manifest) as f:
            return fs, [f"{base}/{s['file']}" for s in json.loads(f.read())["shards"]]
    selector = pafs.FileSelector(f"{base}/{'errors' if errors else 'data'}", allow_not_found=True)
    return fs, sorted(
        info.path
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File and info.path.endswith((".parquet", ".arrow"))
    )


def iter_rows(job_dir: str, *, errors: bool = False) -> Iterator[dict[str, Any]]:
    """Rows of a job's committed shards (the manifest's, where there is one), or of its dead
    letters, one record batch in memory at a time."""
    fs, files = _files(job_dir, errors)
    schema = ERROR_SCHEMA if errors else RESULT_SCHEMA
    for file in files:
        fmt = "ipc" if file.endswith(".arrow") else "parquet"
        dataset = pads.dataset(file, filesystem=fs, format=fmt, schema=schema)
        for batch in dataset.to_batches(batch_size=2048):
            yield from batch.to_pylist()


def _jsonl(lines: Iterator[dict[str, Any]], chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    buffer: list[bytes] = []
    size = 0
    for line in lines:
        data = json.dumps(line, separators=(",", ":")).encode() + b"\n"
        buffer.append(data)
        size += len(data)
        if size >= chunk_bytes:
            yield b"".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield b"".join(buffer)


def output_jsonl(job_dir: str, endpoint: str | None = None) -> Iterator[bytes]:
    """The OpenAI output file of a job, in chunks of about 1 MB."""
    return _jsonl(output_line(row, endpoint) for row in iter_rows(job_dir))


def error_jsonl(job_dir: str, end_reason: str | None = None) -> Iterator[bytes]:
    """The OpenAI error file of a job (its dead letters), in chunks of about 1 MB."""
    return _jsonl(error_line(row, end_reason) for row in iter_rows(job_dir, errors=True))


def find_result(output: JobOutput, path: str, custom_id: str) -> dict[str, Any] | None:
    """The result row of one item in its committed shard file ``path``."""
    output.check_inside(path)
    fmt = "ipc" if path.endswith(".arrow") else "parquet"
    dataset = pads.dataset(path, filesystem=output.fs, format=fmt, schema=RESULT_SCHEMA)
    rows = dataset.to_table(filter=pc.field("custom_id") == custom_id).to_pylist()
    return rows[0] if rows else None
