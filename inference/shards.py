"""Shards: where a job's output lives, how a shard is written, and how it becomes visible.

Layout of a job (``<root>/<job_id>/``)::

    data/part-<n>-<r>.parquet   committed shards (or .arrow); <r> is random, so a rerun of a
                                job id against a fresh queue database never reuses a name
    errors/part-<n>.parquet     dead letters
    _tmp/                       shards being written (never read)
    _manifest.json              the committed shards, written on finalize
    job.json                    the job summary

Commit protocol (the WorkQueue is the coordinator): a worker declares shard ``n`` for its leased
items, writes it under ``_tmp/`` and fsyncs it; the queue, in one actor turn, checks that every
lease is still held, moves the file into ``data/`` and completes the items. The move never
replaces a file: a hard link (atomic, and it fails if the name exists) on a local disk; on an
object store, where there is no rename, a server-side copy to the fresh name (an object appears
whole or not at all) and the temporary's removal. So ``data/`` holds committed shards only, at
every moment and on every file system: no reader sees a partial or uncommitted shard.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.feather as feather
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from inference.errors import OutputError
from inference.schema import CUSTOM_ID, ERROR_SCHEMA, RESULT_SCHEMA

_SUFFIX = {"parquet": ".parquet", "arrow": ".arrow"}


def resolve_fs(root: str) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, base path, is_local) of an output root: a local path or a pyarrow.fs URI."""
    if "://" not in root:
        return pafs.LocalFileSystem(), str(Path(root).expanduser().absolute()), True
    try:
        fs, base = pafs.FileSystem.from_uri(root)
    except (pa.ArrowInvalid, OSError) as exc:
        raise OutputError(f"output path {root!r} is not usable: {exc}") from exc
    return fs, base.rstrip("/"), isinstance(fs, pafs.LocalFileSystem)


@dataclass(frozen=True)
class JobOutput:
    """Paths of one job's output, guarded so that nothing escapes the output root."""

    root: str
    job_id: str
    format: str = "parquet"

    def __post_init__(self) -> None:
        if not CUSTOM_ID.match(self.job_id) or self.job_id in (".", ".."):
            raise OutputError(f"job id {self.job_id!r} is not a safe folder name")
        if self.format not in _SUFFIX:
            raise OutputError(f"output format must be parquet or arrow, not {self.format!r}")

    @functools.cached_property
    def _resolved(self) -> tuple[pafs.FileSystem, str, bool]:
        return resolve_fs(self.root)  # one filesystem client per JobOutput, not per call

    @property
    def fs(self) -> pafs.FileSystem:
        return self._resolved[0]

    @property
    def is_local(self) -> bool:
        return self._resolved[2]

    @property
    def base(self) -> str:
        return f"{self._resolved[1]}/{self.job_id}"

    @property
    def uri(self) -> str:
        """The job folder as users address it: a local path, or the root URI (with its query
        options) extended by the job id."""
        if self.is_local:
            return self.base
        root, _, query = self.root.partition("?")
        return f"{root.rstrip('/')}/{self.job_id}" + (f"?{query}" if query else "")

    def data_path(self, n: int | str) -> str:
        """Shard ``n``'s committed name (``n`` may be the queue's ``{n}`` template): unique, so
        that no run of the job, in any queue database, can land on another's shard."""
        return f"{self.base}/data/part-{_n(n)}-{uuid.uuid4().hex[:8]}{_SUFFIX[self.format]}"

    def tmp_path(self, n: int | str) -> str:
        """Where shard ``n`` is written before it is committed."""
        return f"{self.base}/_tmp/part-{_n(n)}.{uuid.uuid4().hex[:12]}{_SUFFIX[self.format]}.tmp"

    def scratch_path(self, name: str) -> str:
        """A private file in ``_tmp/`` for local writes that are renamed into place."""
        return f"{self.base}/_tmp/{name}.{uuid.uuid4().hex[:12]}.tmp"

    def errors_path(self, n: int) -> str:
        return f"{self.base}/errors/part-{n:06d}{_SUFFIX[self.format]}"

    @property
    def job_json(self) -> str:
        return f"{self.base}/job.json"

    @property
    def manifest(self) -> str:
        return f"{self.base}/_manifest.json"

    def check_inside(self, path: str) -> None:
        """Refuse a path that leaves this job's folder, by ``..`` or by a symlink."""
        base = self.base
        if ".." in Path(path).parts or not path.startswith(base + "/"):
            raise OutputError(f"path {path!r} is outside the job folder {base!r}")
        if self.is_local:
            real_root = os.path.realpath(self._resolved[1])
            parent = os.path.realpath(os.path.dirname(path))
            if parent != real_root and not parent.startswith(real_root + os.sep):
                raise OutputError(f"path {path!r} leads out of the output root via a symlink")

    # ------------------------------------------------------------------ file operations
    def makedirs(self) -> None:
        fs = self.fs
        for sub in ("data", "errors", "_tmp") if self.is_local else ("data", "errors"):
            fs.create_dir(f"{self.base}/{sub}", recursive=True)
        self.check_inside(f"{self.base}/data/x")

    def write_table(self, table: pa.Table, path: str) -> int:
        """Write a whole file and make it durable; returns its size in bytes."""
        self.check_inside(path)
        if self.is_local:
            try:
                with open(path, "wb") as f:
                    _write(table, f, self.format)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # a failed write leaves no partial file behind
                raise
            return os.path.getsize(path)
        with self.fs.open_output_stream(path) as stream:
            _write(table, stream, self.format)
        return int(self.fs.get_file_info(path).size)

    def write_tables(self, tables: Iterator[pa.Table], schema: pa.Schema, path: str) -> int:
        """Write tables one after the other into one durable file (a row group or record batch
        each), holding one in memory at a time; returns the rows written. No rows: no file."""
        self.check_inside(path)
        rows = 0
        writer: Any = None
        try:
            with contextlib.ExitStack() as stack:
                for table in tables:
                    if not table.num_rows:
                        continue
                    if writer is None:
                        sink = stack.enter_context(self.fs.open_output_stream(path))
                        writer = stack.enter_context(_writer(sink, schema, self.format))
                    writer.write_table(table)
                    rows += table.num_rows
            if writer is not None and self.is_local:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.delete_file(path)  # a failed write leaves no partial file behind
            raise
        return rows

    def publish(self, tmp_path: str, final_path: str, *, replace: bool = False) -> None:
        """Make a written file visible under ``final_path``, never replacing one that is there
        (unless ``replace``, for files rewritten whole, such as the dead letters): a hard link
        and a directory fsync on a local disk, then the temporary goes; on an object store a
        server-side copy. A name that exists raises :class:`OutputError`."""
        if tmp_path == final_path:
            return
        self.check_inside(tmp_path)
        self.check_inside(final_path)
        if not self.is_local:
            if not replace and self.exists(final_path):
                raise OutputError(f"{final_path!r} exists; a shard is never replaced")
            self.fs.copy_file(tmp_path, final_path)
            self.fs.delete_file(tmp_path)
            return
        if replace:
            os.rename(tmp_path, final_path)
        else:
            try:
                os.link(tmp_path, final_path)  # fails with EEXIST: never replaces
            except FileExistsError:
                raise OutputError(f"{final_path!r} exists; a shard is never replaced") from None
            os.unlink(tmp_path)
        _fsync_dir(os.path.dirname(final_path))

    def shard_facts(self, path: str) -> tuple[int, int, dict[str, float]]:
        """(rows, bytes, token usage) of a published shard, read from the file itself: what
        recovery records for a shard whose commit the crash interrupted."""
        fmt = "ipc" if path.endswith(".arrow") else "parquet"
        table = pads.dataset(path, filesystem=self.fs, format=fmt, schema=RESULT_SCHEMA).to_table(
            columns=["prompt_tokens", "completion_tokens"]
        )
        usage = {
            name: float(pc.sum(table.column(name)).as_py() or 0)
            for name in ("prompt_tokens", "completion_tokens")
        }
        return table.num_rows, int(self.fs.get_file_info(path).size), usage

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def remove(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_file(path)

    def remove_temporaries(self) -> int:
        """Delete what is left in ``_tmp/`` (writers that died, failed publishes). Call when no
        shard of this job is declared, e.g. at queue recovery: a writer still running then finds
        its file gone and its shard refused."""
        selector = pafs.FileSelector(f"{self.base}/_tmp", allow_not_found=True)
        removed = 0
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_file(info.path)
                removed += 1
        return removed

    def write_json(self, path: str, data: dict[str, Any]) -> None:
        body = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
        self.check_inside(path)
        if self.is_local:
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
            return
        with self.fs.open_output_stream(path) as stream:
            stream.write(body)


def _n(n: int | str) -> str:
    """Shard numbers are six digits; a ``{n}`` template is filled in by the queue
    (:func:`fill_shard_number`)."""
    return f"{n:06d}" if isinstance(n, int) else n


def fill_shard_number(template: str, n: int) -> str:
    """Put shard number ``n`` in a path template's last ``{n}`` (the file name's): the rest of
    the path is the user's and may hold braces of its own."""
    head, sep, tail = template.rpartition("{n}")
    return f"{head}{n:06d}{tail}" if sep else template


def _write(table: pa.Table, sink: Any, fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(table, sink, compression="zstd")
    else:
        feather.write_feather(table, sink, compression="zstd")


def _writer(sink: Any, schema: pa.Schema, fmt: str) -> Any:
    if fmt == "parquet":
        return pq.ParquetWriter(sink, schema, compression="zstd")
    return pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd"))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def results_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def errors_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)


def read_results(path: str | os.PathLike[str], *, errors: bool = False) -> pa.Table:
    """Read a job's committed results (or, with ``errors=True``, its dead letters).

    ``path`` is the job folder (``<output>/<job_id>``), local or a pyarrow.fs URI. Where a
    ``_manifest.json`` exists, only the shards it lists count (on object stores a file outside the
    manifest may be a write whose commit never happened)."""
    fs, base, _ = resolve_fs(os.fspath(path))
    schema = ERROR_SCHEMA if errors else RESULT_SCHEMA
    folder = "errors" if errors else "data"
    files: list[str]
    manifest = f"{base}/_manifest.json"
    if not errors and fs.get_file_info(manifest).type == pafs.FileType.File:
        with fs.open_input_stream(manifest) as f:
            files = [f"{base}/{s['file']}" for s in json.loads(f.read())["shards"]]
    else:
        selector = pafs.FileSelector(f"{base}/{folder}", allow_not_found=True)
        files = sorted(
            info.path
            for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.path.endswith((".parquet", ".arrow"))
        )
    tables = []
    for file in files:
        fmt = "ipc" if file.endswith(".arrow") else "parquet"
        tables.append(pads.dataset(file, filesystem=fs, format=fmt, schema=schema).to_table())
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)
