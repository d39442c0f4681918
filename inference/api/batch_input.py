"""An uploaded batch input file, checked as OpenAI checks it before a batch starts.

Every line must be a JSON object with a unique ``custom_id``, ``method`` POST, the batch's
``endpoint`` as ``url`` and a body the project's parser accepts (within the server's caps); all
lines name one model; the file holds at most ``api.max_batch_lines`` requests. Problems are
reported as OpenAI's batch errors (``code``, ``message``, ``param``, ``line``). The file is read
twice, streaming: once to check it, once to enqueue it, never whole in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.config import Config
from inference.queue import NewItem, Packed
from inference.schema import CUSTOM_ID

from .items import ItemRejected, check_item, oversized, route

MAX_REPORTED_ERRORS = 100
_FIELDS = {"custom_id", "method", "url", "body"}


@dataclass
class BatchCheck:
    requests: int = 0
    model: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0

    def add(self, code: str, message: str, line: int | None, param: str | None = None) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


def _item(
    line: int, raw: bytes, endpoint: str, config: Config
) -> tuple[NewItem, str] | ItemRejected:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return ItemRejected("This line is not parseable as valid JSON.", None, "invalid_json_line")
    if not isinstance(data, dict):
        return ItemRejected("A line must be a JSON object.", None, "invalid_json_line")
    custom_id = data.get("custom_id")
    if custom_id is None:
        return ItemRejected(
            "Missing required parameter: 'custom_id'.", "custom_id", "missing_required_parameter"
        )
    if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
        return ItemRejected(
            f"custom_id must match {CUSTOM_ID.pattern}, got {custom_id!r}.",
            "custom_id",
            "invalid_custom_id",
        )
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        return ItemRejected(
            f"Unknown parameter(s): {', '.join(unknown)}.", unknown[0], "unknown_parameter"
        )
    if data.get("method", "POST") != "POST":
        return ItemRejected(
            f"method must be POST, got {data.get('method')!r}.", "method", "invalid_method"
        )
    if "url" not in data:
        return ItemRejected(
            "Missing required parameter: 'url'.", "url", "missing_required_parameter"
        )
    if data["url"] != endpoint:
        return ItemRejected(
            f"The url {data['url']!r} does not match the batch's endpoint {endpoint!r}.",
            "url",
            "mismatched_endpoint",
        )
    if "body" not in data:
        return ItemRejected(
            "Missing required parameter: 'body'.", "body", "missing_required_parameter"
        )
    try:
        checked = check_item(data["url"], data["body"], config.api)
        pool = route(config, checked.model)
    except ItemRejected as exc:
        return exc
    if oversized(checked.payload, config.queue.max_item_bytes):
        return ItemRejected(
            f"The request is larger than {config.queue.max_item_bytes} bytes.",
            "body",
            "request_too_large",
        )
    return NewItem(custom_id, checked.payload, checked.tokens, pool=pool), checked.model


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, raw


def check_batch_file(path: Path, endpoint: str, config: Config) -> BatchCheck:
    """Read the whole file once and collect every problem (the first 100 are kept)."""
    api = config.api
    check = BatchCheck()
    seen: set[str] = set()
    for number, raw in _lines(path):
        check.requests += 1
        if check.requests > api.max_batch_lines:
            check.add(
                "too_many_requests",
                f"The file holds more than {api.max_batch_lines} requests.",
                number,
            )
            break
        checked = _item(number, raw, endpoint, config)
        if isinstance(checked, ItemRejected):
            check.add(checked.code, checked.message, number, checked.param)
            continue
        item, model = checked
        if item.item_id in seen:
            check.add(
                "duplicate_custom_id",
                f"The custom_id {item.item_id!r} appears more than once.",
                number,
                "custom_id",
            )
            continue
        seen.add(item.item_id)
        if check.model is None:
            check.model = model
        elif model != check.model:
            check.add(
                "mismatched_model",
                f"Every request of a batch must use one model: {model!r} is not {check.model!r}.",
                number,
                "body.model",
            )
    if check.requests == 0:
        check.add("empty_file", "The input file holds no requests.", None)
    return check


def batch_items(
    path: Path, endpoint: str, config: Config, chunk: int = 1000
) -> Iterator[tuple[list[NewItem], list[int]]]:
    """The items of a checked file, in :class:`Packed` chunks for ``WorkQueue.enqueue``, each
    with the file's line number of every item (to name the lines of a refused chunk)."""
    items: list[NewItem] = Packed()
    lines: list[int] = []
    for number, raw in _lines(path):
        checked = _item(number, raw, endpoint, config)
        if isinstance(checked, ItemRejected):  # the file changed after its check: refuse loudly
            raise ValueError(f"line {number}: {checked.message}")
        items.append(checked[0])
        lines.append(number)
        if len(items) >= chunk:
            yield items, lines
            items, lines = Packed(), []
    if items:
        yield items, lines
