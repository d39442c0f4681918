"""The file store behind ``/v1/files``: uploaded batch inputs and produced batch outputs.

Contents live as plain files under one folder (``<state_dir>/files/<file_id>``), written to a
temporary name, fsynced and renamed, so a file is either whole or absent; the metadata lives in a
small SQLite table beside them. The Controller owns the store (it runs on the head node, where the
folder is); the HTTP server reaches it through the Controller.
"""

from __future__ import annotations

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
PURPOSES = ("batch", "batch_output")

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
        doc = {
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
        with self._lock:
            self._db.execute(
                "INSERT INTO files(file_id, purpose, doc) VALUES (?, ?, ?)"
                " ON CONFLICT(file_id) DO UPDATE SET doc = excluded.doc",
                (file_id, purpose, json.dumps(doc)),
            )
        return doc

    def get(self, file_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT doc FROM files WHERE file_id = ?", (file_id,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

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
        docs = [json.loads(r[0]) for r in rows]
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
        return bool(cur.rowcount)

    def close(self) -> None:
        self._db.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
