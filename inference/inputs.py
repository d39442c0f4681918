"""Streaming input readers.

Every reader yields :class:`InputRecord` (a good item) or :class:`InputProblem` (a bad line or
row with its number and reason), in file order, holding at most one batch of the file in memory.
OpenAI batch JSONL is read line by line; plain JSONL/CSV/Parquet rows are mapped through the
job's ``input`` section (text column, id column, prompt template). A file that cannot be read
at all (not Parquet, unreadable) raises :class:`InputError` naming it.

Where a problem is: JSONL by line; CSV by data row (the header not counted) and the line it
starts on (quoted fields may hold newlines); Parquet by row. Ids are text: CSV cells are never
type-inferred (``007`` stays ``007``), an integer id (JSONL, Parquet) becomes its decimal text,
and any other type, a null or an empty id is a problem. Duplicate ids are problems too.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from inference.config import InputConfig
from inference.errors import InputError, PermanentError
from inference.schema import CUSTOM_ID, encode_payload, estimate_tokens, parse_request

BOM = b"\xef\xbb\xbf"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_MISSING = object()


@dataclass(frozen=True, slots=True)
class InputRecord:
    line: int  # the line of the file (JSONL; CSV: where the row starts); 0 for Parquet
    item_id: str
    payload: str
    tokens: int
    model: str = ""  # body.model: which of the job's engines serves it
    row: int = 0  # CSV and Parquet: the data row, from 1 (the CSV header not counted)


@dataclass(frozen=True, slots=True)
class InputProblem:
    line: int  # as InputRecord.line; 0 when not known
    reason: str
    row: int = 0  # as InputRecord.row; 0 for JSONL and for a problem of the whole file

    @property
    def where(self) -> str:
        """``line 3``, ``row 2 (line 3)``, ``row 7``; empty for a problem of the whole file."""
        if self.row:
            return f"row {self.row} (line {self.line})" if self.line else f"row {self.row}"
        return f"line {self.line}" if self.line else ""


def rejection(path: str | Path, problems: list[InputProblem], count: int) -> InputError:
    """The error of a rejected input: the file, then each shown problem's place and reason (one
    line when there is one problem), and how many more there are."""
    tail = "nothing was enqueued (input.on_invalid is reject)"
    if count == 1 and problems:
        where = f"{problems[0].where}: " if problems[0].where else ""
        return InputError(f"{path}: {where}{problems[0].reason}; {tail}")
    unit = "row" if any(p.row for p in problems) else "line"
    shown = "\n".join(f"  {p.where or 'file'}: {p.reason}" for p in problems)
    more = f"\n  ... and {count - len(problems)} more" if count > len(problems) else ""
    return InputError(f"{path}: {count} invalid {unit}s; {tail}:\n{shown}{more}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _utf8_problem(exc: UnicodeDecodeError, line: int | None = None) -> str:
    of = f" of line {line}" if line is not None else ""
    return f"invalid UTF-8 at byte {exc.start + 1}{of}"


def _openai_record(line_no: int, data: Any) -> InputRecord | InputProblem:
    if not isinstance(data, dict):
        return InputProblem(line_no, "a line must be a JSON object")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
        return InputProblem(
            line_no, f"custom_id must match {CUSTOM_ID.pattern}, got {_short(custom_id)}"
        )
    unknown = set(data) - {"custom_id", "method", "url", "body"}
    if unknown:
        return InputProblem(line_no, f"unknown field(s): {', '.join(sorted(unknown))}")
    if data.get("method", "POST") != "POST":
        return InputProblem(line_no, f"method must be POST, got {_short(data.get('method'))}")
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


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """Each non-blank line's number and its JSON value, or the reason it has none (a str in a
    1-tuple, so that a JSON string stays distinguishable)."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                raw = raw.removeprefix(BOM)
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, (_utf8_problem(exc),)
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as exc:
                yield line_no, (f"invalid JSON: {exc}",)


def read_openai_jsonl(path: Path) -> Iterator[InputRecord | InputProblem]:
    """OpenAI batch input: one request per line; duplicate custom_ids are problems too."""
    seen: set[str] = set()
    for line_no, data in _json_lines(path):
        if isinstance(data, tuple):
            yield InputProblem(line_no, data[0])
            continue
        record = _openai_record(line_no, data)
        if isinstance(record, InputRecord):
            if record.item_id in seen:
                yield InputProblem(
                    line_no, f"duplicate custom_id {record.item_id!r} (ids must be unique)"
                )
                continue
            seen.add(record.item_id)
        yield record


# A plain row: (line, row, the row's columns or the reason it is bad).
_PlainRow = tuple[int, int, dict[str, Any] | str]


def _missing_columns(names: list[str], needed: list[str]) -> str | None:
    missing = [c for c in needed if c not in names]
    if not missing:
        return None
    which = ", ".join(repr(c) for c in missing)
    return f"column {which} not found (columns: {', '.join(names)})"


def _parquet_rows(path: Path, needed: list[str]) -> Iterator[_PlainRow]:
    with pq.ParquetFile(path) as file:
        missing = _missing_columns(file.schema_arrow.names, needed)
        if missing:
            yield 0, 0, missing
            return
        row = 0
        for batch in file.iter_batches(batch_size=4096, columns=needed):
            for rec in batch.to_pylist():
                row += 1
                yield 0, row, rec


def _decoded(f: Any, bad: dict[int, str]) -> Iterator[str]:
    """The lines of a binary file as text; a line that is not UTF-8 is noted in ``bad`` (by
    line number) and passed on with replacement characters, so the CSV parse goes on."""
    for line_no, raw in enumerate(f, start=1):
        if line_no == 1:
            raw = raw.removeprefix(BOM)
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad[line_no] = _utf8_problem(exc, line_no)
            yield raw.decode("utf-8", "replace")


def _csv_rows(path: Path, needed: list[str]) -> Iterator[_PlainRow]:
    """CSV rows as text (no type inference), each with its data row and first line; a row with
    more or fewer fields than the header, or with bytes that are not UTF-8, is a problem."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # long texts are fine here
    bad: dict[int, str] = {}
    with path.open("rb") as f:
        reader = csv.reader(_decoded(f, bad), strict=True)
        header: list[str] | None = None
        index: list[tuple[str, int]] = []
        row = 0
        end = 0  # the last line of the previous row
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # bad quoting: this row is lost, the next line goes on
                start, end = end + 1, reader.line_num
                if header is None:
                    yield start, 0, f"unreadable CSV header: {exc}"
                    return
                row += 1
                yield start, row, f"unreadable CSV: {exc}"
                continue
            start, end = end + 1, reader.line_num
            if not fields:  # a blank line
                continue
            if header is None:
                header = fields
                missing = _missing_columns(header, needed)
                if missing:
                    yield start, 0, missing
                    return
                index = [(c, header.index(c)) for c in needed]
                continue
            row += 1
            if bad:
                broken = [bad.pop(n) for n in range(start, end + 1) if n in bad]
                if broken:
                    yield start, row, broken[0]
                    continue
            if len(fields) != len(header):
                n = len(fields)
                yield start, row, f"{n} field{'' if n == 1 else 's'}, the header has {len(header)}"
                continue
            yield start, row, {c: fields[i] for c, i in index}


def _jsonl_rows(path: Path) -> Iterator[_PlainRow]:
    for line_no, data in _json_lines(path):
        if isinstance(data, tuple):
            yield line_no, 0, data[0]
        elif isinstance(data, dict):
            yield line_no, 0, data
        else:
            yield line_no, 0, "a line must be a JSON object"


def _plain_rows(path: Path, needed: list[str]) -> Iterator[_PlainRow]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path, needed)
    if suffix == ".csv":
        return _csv_rows(path, needed)
    return _jsonl_rows(path)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _item_id(value: Any, column: str) -> str:
    """The id of a row from its id column's value; raises ValueError with the reason."""
    if isinstance(value, str):
        item_id = value
    elif isinstance(value, int) and not isinstance(value, bool):
        item_id = str(value)
    elif value is _MISSING:
        raise ValueError(f"column {column!r} missing")
    elif value is None:
        raise ValueError(f"id (column {column!r}) is null")
    else:
        raise ValueError(
            f"id (column {column!r}) must be text or an integer, got "
            f"{_type_name(value)} {_short(value)}"
        )
    if not item_id:
        raise ValueError(f"id (column {column!r}) is empty")
    if not CUSTOM_ID.match(item_id):
        raise ValueError(f"id {_short(item_id)} must match {CUSTOM_ID.pattern}")
    return item_id


def read_plain(path: Path, config: InputConfig, model: str) -> Iterator[InputRecord | InputProblem]:
    """Rows with a text column, made into requests of ``config.task``."""
    url = {
        "chat": "/v1/chat/completions",
        "completion": "/v1/completions",
        "embedding": "/v1/embeddings",
    }[config.task]
    needed = [config.text_column]
    for column in (config.id_column, config.model_column):
        if column and column not in needed:
            needed.append(column)
    # Default ids as earlier versions made them, so that resuming a job finds its items.
    is_csv = path.suffix.lower() == ".csv"
    seen: set[str] = set()
    for line_no, row_no, rec in _plain_rows(path, needed):
        if isinstance(rec, str):
            yield InputProblem(line_no, rec, row_no)
            continue
        text = rec.get(config.text_column, _MISSING)
        if not isinstance(text, str):
            reason = (
                "missing"
                if text is _MISSING
                else ("is null" if text is None else f"must be text, got {_type_name(text)}")
            )
            yield InputProblem(line_no, f"column {config.text_column!r} {reason}", row_no)
            continue
        if config.id_column:
            try:
                item_id = _item_id(rec.get(config.id_column, _MISSING), config.id_column)
            except ValueError as exc:
                yield InputProblem(line_no, str(exc), row_no)
                continue
        else:
            item_id = f"row-{row_no + 1 if is_csv else (row_no or line_no)}"
        if item_id in seen:
            yield InputProblem(line_no, f"duplicate id {item_id!r} (ids must be unique)", row_no)
            continue
        seen.add(item_id)
        if config.model_column:
            named = rec.get(config.model_column)
            if not isinstance(named, str) or not named:
                yield InputProblem(
                    line_no, f"column {config.model_column!r} missing or not text", row_no
                )
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
        try:
            request = parse_request(url, body)
        except PermanentError as exc:
            yield InputProblem(line_no, f"{item_id}: {exc.message}", row_no)
            continue
        yield InputRecord(
            line_no, item_id, encode_payload(url, body), estimate_tokens(request), model, row_no
        )


def read_input(
    path: str | Path, config: InputConfig, model: str, *, max_item_bytes: int | None = None
) -> Iterator[InputRecord | InputProblem]:
    """Pick the reader by content: OpenAI batch JSONL when lines carry ``custom_id``. With
    ``max_item_bytes`` (the queue's ``queue.max_item_bytes``), a larger request is a problem."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise InputError(f"input file {path} {what}")
    if path.suffix.lower() in JSONL_SUFFIXES and _looks_like_openai(path):
        records = read_openai_jsonl(path)
    else:
        records = read_plain(path, config, model)
    return _checked(path, records, max_item_bytes)


def _checked(
    path: Path, records: Iterator[InputRecord | InputProblem], max_item_bytes: int | None
) -> Iterator[InputRecord | InputProblem]:
    """The records, with the queue's size limit applied, and a file the parser underneath
    cannot read at all (not Parquet, unreadable) an InputError naming it."""
    try:
        for record in records:
            if (
                max_item_bytes is not None
                and isinstance(record, InputRecord)
                and len(record.payload) * 4 > max_item_bytes  # a character is <= 4 bytes
                and (size := len(record.payload.encode())) > max_item_bytes
            ):
                yield InputProblem(
                    record.line,
                    f"{record.item_id}: the request is {size} bytes, over "
                    f"queue.max_item_bytes ({max_item_bytes})",
                    record.row,
                )
                continue
            yield record
    except (OSError, pa.ArrowException, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read: {exc}") from None


def _looks_like_openai(path: Path) -> bool:
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    data = json.loads(raw.removeprefix(BOM).decode("utf-8", "replace"))
                except json.JSONDecodeError:
                    return True  # let the OpenAI reader report the line
                return not isinstance(data, dict) or "custom_id" in data or "body" in data
    return True
