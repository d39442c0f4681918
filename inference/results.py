"""Results while a job runs: its committed shards, read as they commit, each item once.

A shard's rows become visible when the shard commits (the rename that completes its items), and
shards commit out of their numbering (two workers: shard 7 may commit before shard 6). Two
readers follow a running job:

- :func:`advance` for ``GET /v1/jobs/{job}/results?after=CURSOR``: a stateless cursor. Every
  committed shard below ``low`` was delivered, and ``seen`` lists the ones at or above it that
  were; ``low`` stops at the oldest shard still being written (a committed shard can only come
  from one of those, or from one declared later with a higher number), so ``seen`` stays short.
- :class:`ShardOrder` for a running batch's ``output_file_id``: a file's bytes must not move under
  a reader that reads it in pieces, so its shards are laid out in the order they were first seen
  committed (kept in the batch's record), and the final file is the same bytes plus the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.dataset as pads
import pyarrow.fs as pafs

from inference.export import output_line
from inference.schema import RESULT_SCHEMA

_CURSOR = re.compile(r"^(0|[1-9]\d{0,11})((?:\.(?:0|[1-9]\d{0,11})){0,4096})$")


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a reader of a job's results stands; its text form is ``low[.n...]``."""

    low: int = 0
    seen: frozenset[int] = field(default_factory=frozenset)

    def encode(self) -> str:
        return ".".join(str(n) for n in (self.low, *sorted(self.seen)))

    @classmethod
    def decode(cls, text: str | None) -> Cursor:
        """The cursor of a ``next`` value this server gave; ValueError for anything else."""
        if not text:
            return cls()
        match = _CURSOR.match(text)
        if match is None:
            raise ValueError(f"after must be a cursor this server returned, got {text[:80]!r}")
        low, *seen = (int(n) for n in text.split("."))
        if any(n <= low for n in seen):
            raise ValueError(f"after must be a cursor this server returned, got {text[:80]!r}")
        return cls(low, frozenset(seen))


def advance(
    cursor: Cursor, shards: Sequence[dict[str, Any]], max_rows: int | None = None
) -> tuple[list[dict[str, Any]], Cursor]:
    """The committed shards a reader at ``cursor`` has not had yet (in shard order; whole
    shards, up to about ``max_rows`` rows and at least one), and the cursor after them.
    ``shards`` is the queue's ``shards_from(job, cursor.low)``: committed and in-flight shards,
    read together."""
    fresh = [s for s in shards if s["state"] == "committed" and s["n"] not in cursor.seen]
    given: list[dict[str, Any]] = []
    rows = 0
    for shard in fresh:
        if given and max_rows is not None and rows + int(shard["rows"] or 0) > max_rows:
            break
        given.append(shard)
        rows += int(shard["rows"] or 0)
    seen = cursor.seen | {s["n"] for s in given}
    waiting = [s["n"] for s in shards if s["state"] != "committed" or s["n"] not in seen]
    top = max([cursor.low - 1, *seen, *(s["n"] for s in shards)])
    low = min(waiting) if waiting else top + 1
    return given, Cursor(low, frozenset(n for n in seen if n >= low))


def shard_jsonl(fs: pafs.FileSystem, path: str, endpoint: str | None = None) -> bytes:
    """One committed shard's results as OpenAI batch output lines (JSONL; a shard is
    ``output.rows_per_shard`` rows at most); each line in the shape of ``endpoint``, or of the
    row's own request where none is given."""
    fmt = "ipc" if path.endswith(".arrow") else "parquet"
    dataset = pads.dataset(path, filesystem=fs, format=fmt, schema=RESULT_SCHEMA)
    return b"".join(
        json.dumps(output_line(row, endpoint), separators=(",", ":")).encode() + b"\n"
        for batch in dataset.to_batches(batch_size=2048)
        for row in batch.to_pylist()
    )


class ShardOrder:
    """A batch's output file laid out shard after shard in a fixed order, read by byte range.

    A shard's bytes never change once committed, so their sizes are measured once (by
    rendering the shard) and kept; the last shard rendered is kept too, for the next piece of a
    sequential read."""

    def __init__(self, fs: pafs.FileSystem, endpoint: str | None) -> None:
        self._fs = fs
        self._endpoint = endpoint
        self._sizes: dict[str, int] = {}
        self._last: tuple[str, bytes] | None = None

    def _render(self, path: str) -> bytes:
        if self._last is not None and self._last[0] == path:
            return self._last[1]
        data = shard_jsonl(self._fs, path, self._endpoint)
        self._sizes[path] = len(data)
        self._last = (path, data)
        return data

    def size(self, paths: Sequence[str]) -> int:
        return sum(self._sizes[p] if p in self._sizes else len(self._render(p)) for p in paths)

    def read(self, paths: Sequence[str], offset: int, size: int) -> bytes:
        """Bytes ``offset`` to ``offset + size`` of the shards' lines laid end to end."""
        out: list[bytes] = []
        start = 0
        end = offset + size
        for path in paths:
            length = self._sizes.get(path)
            if length is None:
                length = len(self._render(path))
            if start + length > offset and start < end:
                data = self._render(path)
                out.append(data[max(0, offset - start) : end - start])
            start += length
            if start >= end:
                break
        return b"".join(out)

    def chunks(self, paths: Sequence[str]) -> Iterator[bytes]:
        """Every shard's lines in order (the final file)."""
        for path in paths:
            yield self._render(path)
