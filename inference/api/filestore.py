"""The file store behind ``/v1/files``: uploaded batch inputs and produced batch outputs.

Contents live as plain files under one folder (``<state_dir>/files/<file_id>``), written to a
temporary name, fsynced and renamed, so a file is either whole or absent; the metadata lives in a
small SQLite table beside them. An upload arrives in pieces, each appended to its temporary file
as it comes (never whole in memory), within the store's quotas of files and bytes. The
Controller owns the store (it runs on the head node, where the folder is); the HTTP server
reaches it through the Controller.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FILE_ID = re.compile(r"^file-[A-Za-z0-9]{1,64}$")
UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
PURPOSES = ("batch", "batch_output")


class QuotaExceeded(ValueError):
    """The store holds as many files, or bytes, as it may (``api.max_files``,
    ``api.max_file_store_bytes``)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS files(
    n INTEGER PRIMARY KEY,
    file_id TEXT NOT NULL UNIQUE,
    purpose TEXT NOT NULL,
    doc TEXT NOT NULL
);
"""


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


class FileStore:
    """Whole files with OpenAI's file metadata (``id``, ``bytes``, ``filename``, ``purpose``)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            str(self.folder / "files.sqlite"), isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        for leftover in self.folder.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        self._uploads: dict[str, int] = {}  # upload id -> bytes received so far
        self._lines: dict[str, int] = {}  # file id -> requests in it (files never change)

    def path(self, file_id: str) -> Path:
        if not FILE_ID.match(file_id):
            raise KeyError(file_id)
        return self.folder / file_id

    def put(
        self,
        chunks: Iterable[bytes],
        *,
        filename: str,
        purpose: str,
        file_id: str | None = None,
        expires_at: int | None = None,
    ) -> dict[str, Any]:
        """Store a whole file durably and return its metadata. With ``file_id`` an existing file
        of that id is replaced (re-producing a batch's output after a restart)."""
        if purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}")
        file_id = file_id or new_file_id()
        final = self.path(file_id)
        tmp = self.folder / f"{file_id}.{uuid.uuid4().hex[:8]}.tmp"
        size = 0
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.folder)
        doc = self._doc(file_id, size, filename, purpose, expires_at)
        self._lines.pop(file_id, None)
        with self._lock:
            self._db.execute(
                "INSERT INTO files(file_id, purpose, doc) VALUES (?, ?, ?)"
                " ON CONFLICT(file_id) DO UPDATE SET doc = excluded.doc",
                (file_id, purpose, json.dumps(doc)),
            )
        return doc

    # ------------------------------------------------------------------ streamed uploads
    def _upload_path(self, upload_id: str) -> Path:
        if not UPLOAD_ID.match(upload_id) or upload_id not in self._uploads:
            raise KeyError(upload_id)
        return self.folder / f"upload-{upload_id}.tmp"

    def begin_upload(self, max_files: int | None = None) -> str:
        """Start a file that arrives in pieces (:meth:`append`, then :meth:`commit` or
        :meth:`abort`); its bytes go to disk as they come."""
        if max_files is not None and self.usage()[0] >= max_files:
            raise QuotaExceeded(f"the file store holds {max_files} files (api.max_files)")
        upload_id = uuid.uuid4().hex
        with self._lock:
            self._uploads[upload_id] = 0
        self._upload_path(upload_id).touch()
        return upload_id

    def append(self, upload_id: str, data: bytes, max_bytes: int | None = None) -> int:
        """Add bytes to an upload; its size so far. Raises QuotaExceeded (and drops the upload)
        once the store with it would hold more than ``max_bytes``."""
        path = self._upload_path(upload_id)
        size = self._uploads[upload_id] + len(data)
        if max_bytes is not None and self.usage()[1] + size > max_bytes:
            self.abort(upload_id)
            raise QuotaExceeded(
                f"the file store would hold more than {max_bytes} bytes (api.max_file_store_bytes)"
            )
        with open(path, "ab") as f:
            f.write(data)
        self._uploads[upload_id] = size
        return size

    def commit(
        self,
        upload_id: str,
        *,
        filename: str,
        purpose: str,
        expires_at: int | None = None,
        max_files: int | None = None,
        max_bytes: int | None = None,
    ) -> dict[str, Any]:
        """Make an upload a file, durably, within the quotas (checked again, under the lock
        that orders commits, so concurrent uploads cannot pass them together)."""
        if purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}")
        path = self._upload_path(upload_id)
        with open(path, "ab") as f:
            f.flush()
            os.fsync(f.fileno())
        size = self._uploads[upload_id]
        file_id = new_file_id()
        doc = self._doc(file_id, size, filename, purpose, expires_at)
        with self._lock:
            count, stored = self._usage()
            try:
                if max_files is not None and count >= max_files:
                    raise QuotaExceeded(f"the file store holds {max_files} files (api.max_files)")
                if max_bytes is not None and stored + size > max_bytes:
                    raise QuotaExceeded(
                        f"the file store would hold more than {max_bytes} bytes "
                        "(api.max_file_store_bytes)"
                    )
                os.rename(path, self.path(file_id))
                _fsync_dir(self.folder)
                self._db.execute(
                    "INSERT INTO files(file_id, purpose, doc) VALUES (?, ?, ?)",
                    (file_id, purpose, json.dumps(doc)),
                )
            finally:
                self._uploads.pop(upload_id, None)
                path.unlink(missing_ok=True)
        return doc

    def abort(self, upload_id: str) -> None:
        with contextlib.suppress(KeyError):
            self._upload_path(upload_id).unlink(missing_ok=True)
        with self._lock:
            self._uploads.pop(upload_id, None)

    def usage(self) -> tuple[int, int]:
        """Files stored and their bytes."""
        with self._lock:
            return self._usage()

    def _usage(self) -> tuple[int, int]:
        count, stored = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(json_extract(doc, '$.bytes')), 0) FROM files"
        ).fetchone()
        return int(count), int(stored)

    def count_lines(self, file_id: str) -> int:
        """The requests of a file: its lines that hold more than white space."""
        known = self._lines.get(file_id)
        if known is None:
            with open(self.path(file_id), "rb") as f:
                known = sum(1 for raw in f if raw.strip())
            if len(self._lines) > 10_000:
                self._lines.clear()
            self._lines[file_id] = known
        return known

    @staticmethod
    def _doc(
        file_id: str, size: int, filename: str, purpose: str, expires_at: int | None
    ) -> dict[str, Any]:
        return {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": expires_at,
        }

    def get(self, file_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT doc FROM files WHERE file_id = ?", (file_id,)).fetchone()
        return None if row is None else _shown(json.loads(row[0]))

    def expired(self, now: float | None = None) -> list[str]:
        """The files past their ``expires_at`` (the janitor deletes them)."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT file_id FROM files WHERE json_extract(doc, '$.expires_at') <= ? ORDER BY n",
                (now,),
            ).fetchall()
        return [r[0] for r in rows]

    def list(
        self, purpose: str | None = None, limit: int = 100, after: str | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; ``after`` is the id of the last file of the previous page."""
        query, params = "SELECT doc FROM files WHERE 1 = 1", list[Any]()
        if purpose:
            query += " AND purpose = ?"
            params.append(purpose)
        if after:
            query += " AND n < COALESCE((SELECT n FROM files WHERE file_id = ?), -1)"
            params.append(after)
        query += " ORDER BY n DESC LIMIT ?"
        params.append(limit + 1)
        with self._lock:
            rows = self._db.execute(query, params).fetchall()
        docs = [_shown(json.loads(r[0])) for r in rows]
        return docs[:limit], len(docs) > limit

    def read(self, file_id: str, offset: int = 0, size: int = 4 << 20) -> bytes:
        with open(self.path(file_id), "rb") as f:
            f.seek(offset)
            return f.read(size)

    def delete(self, file_id: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM files WHERE file_id = ?", (file_id,))
        if cur.rowcount:
            self.path(file_id).unlink(missing_ok=True)
            self._lines.pop(file_id, None)
        return bool(cur.rowcount)

    def close(self) -> None:
        self._db.close()


def _shown(doc: dict[str, Any]) -> dict[str, Any]:
    """A file's metadata as clients see it: ``status`` ``expired`` once past ``expires_at``
    (its content is refused from then on; the Controller's janitor deletes it soon after)."""
    expires_at = doc.get("expires_at")
    if expires_at is not None and expires_at <= time.time():
        doc["status"] = "expired"
    return dict(doc)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
