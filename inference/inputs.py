"""Streaming input readers.

Every reader yields :class:`InputRecord` (a good item) or :class:`InputProblem` (a bad line with
its number and reason), in file order, holding at most one batch of the file in memory.
OpenAI batch JSONL is read line by line; plain JSONL/CSV/Parquet rows are mapped through the
job's ``input`` section (text column, id column, prompt template).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from inference.config import InputConfig
from inference.errors import InputError, PermanentError
from inference.schema import CUSTOM_ID, encode_payload, estimate_tokens, parse_request


@dataclass(frozen=True, slots=True)
class InputRecord:
    line: int
    item_id: str
    payload: str
    tokens: int
    model: str = ""  # body.model: which of the job's engines serves it


@dataclass(frozen=True, slots=True)
class InputProblem:
    line: int
    reason: str


def _openai_record(line_no: int, data: Any) -> InputRecord | InputProblem:
    if not isinstance(data, dict):
        return InputProblem(line_no, "a line must be a JSON object")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
        return InputProblem(line_no, f"custom_id must match {CUSTOM_ID.pattern}, got {custom_id!r}")
    unknown = set(data) - {"custom_id", "method", "url", "body"}
    if unknown:
        return InputProblem(line_no, f"unknown field(s): {', '.join(sorted(unknown))}")
    if data.get("method", "POST") != "POST":
        return InputProblem(line_no, f"method must be POST, got {data.get('method')!r}")
    url, body = data.get("url"), data.get("body")
    try:
        request = parse_request(url, body)
    except PermanentError as exc:
        if exc.code == "invalid_request":
            return InputProblem(line_no, f"{custom_id}: {exc.message}")
        # Valid but unsupported here: accepted, and dead-lettered with the reason by the worker.
        model = body.get("model") if isinstance(body, dict) else None
        return InputRecord(
            line_no,
            custom_id,
            encode_payload(str(url), dict(body or {})),
            1,
            model if isinstance(model, str) else "",
        )
    payload = encode_payload(str(url), dict(body or {}))
    return InputRecord(line_no, custom_id, payload, estimate_tokens(request), request.model)


def read_openai_jsonl(path: Path) -> Iterator[InputRecord | InputProblem]:
    """OpenAI batch input: one request per line; duplicate custom_ids are problems too."""
    seen: set[str] = set()
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield InputProblem(line_no, f"invalid JSON: {exc}")
                continue
            record = _openai_record(line_no, data)
            if isinstance(record, InputRecord):
                if record.item_id in seen:
                    yield InputProblem(line_no, f"duplicate custom_id {record.item_id!r}")
                    continue
                seen.add(record.item_id)
            yield record


def _plain_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec
    elif suffix == ".csv":
        row = 0
        reader = pacsv.open_csv(path)
        for batch in reader:
            for rec in pa.Table.from_batches([batch]).to_pylist():
                row += 1
                yield row + 1, rec  # line 1 is the header
    else:
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if raw.strip():
                    try:
                        data = json.loads(raw)
                    except json.JSONDecodeError as exc:
                        yield line_no, {"__error__": f"invalid JSON: {exc}"}
                        continue
                    yield (
                        line_no,
                        data if isinstance(data, dict) else {"__error__": "not an object"},
                    )


def read_plain(path: Path, config: InputConfig, model: str) -> Iterator[InputRecord | InputProblem]:
    """Rows with a text column, made into requests of ``config.task``."""
    url = {
        "chat": "/v1/chat/completions",
        "completion": "/v1/completions",
        "embedding": "/v1/embeddings",
    }[config.task]
    seen: set[str] = set()
    for line_no, row in _plain_rows(path):
        if "__error__" in row:
            yield InputProblem(line_no, str(row["__error__"]))
            continue
        text = row.get(config.text_column)
        if not isinstance(text, str):
            yield InputProblem(line_no, f"column {config.text_column!r} missing or not text")
            continue
        item_id = str(row[config.id_column]) if config.id_column else f"row-{line_no}"
        if config.id_column and config.id_column not in row:
            yield InputProblem(line_no, f"column {config.id_column!r} missing")
            continue
        if not CUSTOM_ID.match(item_id) or item_id in seen:
            yield InputProblem(line_no, f"id {item_id!r} is invalid or duplicate")
            continue
        seen.add(item_id)
        if config.model_column:
            named = row.get(config.model_column)
            if not isinstance(named, str) or not named:
                yield InputProblem(line_no, f"column {config.model_column!r} missing or not text")
                continue
            model = named
        prompt = config.prompt_template.replace("{text}", text)
        body: dict[str, Any]
        if config.task == "chat":
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": config.max_tokens,
            }
        elif config.task == "completion":
            body = {"model": model, "prompt": prompt, "max_tokens": config.max_tokens}
        else:
            body = {"model": model, "input": prompt}
        request = parse_request(url, body)
        yield InputRecord(
            line_no, item_id, encode_payload(url, body), estimate_tokens(request), model
        )


def read_input(
    path: str | Path, config: InputConfig, model: str
) -> Iterator[InputRecord | InputProblem]:
    """Pick the reader by content: OpenAI batch JSONL when lines carry ``custom_id``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input file {path} does not exist")
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson") and _looks_like_openai(path):
        return read_openai_jsonl(path)
    return read_plain(path, config, model)


def _looks_like_openai(path: Path) -> bool:
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    data = json.loads(raw)
                except json.JSONDecodeError:
                    return True  # let the OpenAI reader report the line
                return not isinstance(data, dict) or "custom_id" in data or "body" in data
    return True
