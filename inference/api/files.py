"""``/v1/files``: upload (multipart, purpose ``batch``), retrieve, list, content, delete.

The multipart body is parsed here as it arrives (a small push parser over the standard library's
header parsing, so the server needs no multipart package), and the file's content goes on in
pieces to the Controller's :class:`~inference.api.filestore.FileStore`, which appends them to
disk: an upload is never held whole in memory. The store's quotas (``api.max_files``,
``api.max_file_store_bytes``) are 429.
"""

from __future__ import annotations

import contextlib
import email.message
import email.parser
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse

from .http_errors import ApiError
from .state import ServerState, call
from .views import page

router = APIRouter(tags=["files"])
CHUNK_BYTES = 4 << 20
MAX_PART_HEADER_BYTES = 16 << 10
MAX_FIELD_BYTES = 1024  # the text fields (purpose, expires_after[...])
FileId = Annotated[str, Path(max_length=128, description="A file id (file-...).")]
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_FIELDS = {"file", "purpose", "expires_after[anchor]", "expires_after[seconds]"}
_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": ["batch"]},
                    },
                    "additionalProperties": False,
                }
            }
        },
    }
}


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type; 415 for another type, 400
    without a usable boundary."""
    header = email.message.Message()
    header["content-type"] = content_type
    if header.get_content_type() != "multipart/form-data":
        raise ApiError(415, "The body must be multipart/form-data.", None, "unsupported_media_type")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 200:
        raise ApiError(400, "The multipart body has no boundary.", None, "invalid_multipart")
    return boundary.encode("latin-1")


def _malformed(message: str) -> ApiError:
    return ApiError(400, message, None, "invalid_multipart")


@dataclass
class PartStart:
    name: str
    filename: str | None


@dataclass
class PartData:
    data: bytes


Event = PartStart | PartData


class MultipartReader:
    """A push parser of ``multipart/form-data``: :meth:`feed` it the body as it arrives and it
    returns what it found (a part's start, pieces of its content), holding back no more than a
    delimiter's length of content; :meth:`close` checks the body ended where it should."""

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._buffer = b"\r\n"  # the first delimiter has no line break of its own before it
        self._state = "preamble"  # preamble, after, headers, content, end

    def feed(self, data: bytes) -> list[Event]:
        self._buffer += data
        events: list[Event] = []
        while True:
            if self._state in ("preamble", "content"):
                at = self._buffer.find(self._delimiter)
                if at < 0:
                    keep = len(self._delimiter) - 1  # may be the start of a delimiter
                    if self._state == "content" and len(self._buffer) > keep:
                        events.append(PartData(self._buffer[:-keep]))
                    if len(self._buffer) > keep:
                        self._buffer = self._buffer[-keep:]
                    return events
                if self._state == "content" and at:
                    events.append(PartData(self._buffer[:at]))
                self._buffer = self._buffer[at + len(self._delimiter) :]
                self._state = "after"
            elif self._state == "after":
                if len(self._buffer) < 2:
                    return events
                if self._buffer.startswith(b"--"):
                    self._state, self._buffer = "end", b""
                elif self._buffer.startswith(b"\r\n"):
                    self._state, self._buffer = "headers", self._buffer[2:]
                else:
                    raise _malformed("A multipart delimiter is not followed by a line break.")
            elif self._state == "headers":
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_PART_HEADER_BYTES:
                        raise _malformed("A multipart part's headers are too long.")
                    return events
                events.append(_part_start(self._buffer[: end + 4]))
                self._buffer = self._buffer[end + 4 :]
                self._state = "content"
            else:  # end: the epilogue is ignored
                self._buffer = b""
                return events

    def close(self) -> None:
        if self._state != "end":
            raise _malformed("The multipart body is truncated.")


def _part_start(head: bytes) -> PartStart:
    headers = email.parser.BytesHeaderParser().parsebytes(head)
    name = headers.get_param("name", header="content-disposition")
    if not isinstance(name, str) or not name:
        raise _malformed("A multipart part has no name.")
    return PartStart(name, headers.get_filename())


def _text(fields: dict[str, bytes], name: str) -> str | None:
    if name not in fields:
        return None
    try:
        return fields[name].decode()
    except UnicodeDecodeError:
        raise ApiError(400, f"{name} must be UTF-8 text.", name, "invalid_value") from None


@router.post("/v1/files", openapi_extra=_UPLOAD_SCHEMA, summary="Upload a batch input file")
async def upload_file(request: Request) -> dict[str, Any]:
    """The body is read as it arrives: the file's content goes to the file store in pieces of
    at most ``CHUNK_BYTES`` (to disk, on the Controller's node), never whole in memory."""
    state: ServerState = request.app.state.inference
    api = state.config.api
    reader = MultipartReader(multipart_boundary(request.headers.get("content-type", "")))
    fields: dict[str, bytes] = {}
    seen: set[str] = set()
    current: str | None = None
    filename: str | None = None
    upload_id: str | None = None
    pending: list[bytes] = []
    pending_bytes = 0

    async def flush() -> None:
        nonlocal pending_bytes
        if pending and upload_id is not None:
            data = b"".join(pending)
            pending.clear()
            pending_bytes = 0
            await call(
                state.controller.write_upload.remote(upload_id, data, api.max_file_store_bytes)
            )

    try:
        async for chunk in request.stream():
            for event in reader.feed(chunk):
                if isinstance(event, PartData):
                    if current == "file":
                        pending.append(event.data)
                        pending_bytes += len(event.data)
                        if pending_bytes >= CHUNK_BYTES:
                            await flush()
                    elif current is not None:
                        fields[current] = fields.get(current, b"") + event.data
                        if len(fields[current]) > MAX_FIELD_BYTES:
                            raise ApiError(400, f"{current} is too long.", current, "invalid_value")
                    continue
                await flush()
                if event.name in seen:
                    raise ApiError(
                        400,
                        f"The field {event.name!r} appears twice.",
                        event.name,
                        "invalid_multipart",
                    )
                seen.add(event.name)
                if event.name not in _FIELDS:
                    raise ApiError(
                        400, f"Unknown field {event.name!r}.", event.name, "unknown_parameter"
                    )
                current = event.name
                if current == "file":
                    filename = event.filename
                    if filename is None or not 1 <= len(filename) <= 255:
                        raise ApiError(
                            400, "The file's name must have 1 to 255 characters.", "file"
                        )
                    upload_id = await call(
                        state.controller.begin_upload.remote(
                            filename, _text(fields, "purpose"), api.max_files
                        )
                    )
        reader.close()
        await flush()
        if "file" not in seen or upload_id is None or filename is None:
            raise ApiError(400, "Missing required parameter: 'file' (a file part).", "file")
        purpose = _text(fields, "purpose")
        if purpose is None:
            raise ApiError(400, "Missing required parameter: 'purpose'.", "purpose")
        anchor = _text(fields, "expires_after[anchor]")
        if anchor is not None and anchor != "created_at":
            raise ApiError(
                400, "expires_after[anchor] must be created_at.", "expires_after[anchor]"
            )
        expires_at = _expires_at(anchor, _text(fields, "expires_after[seconds]"))
        doc = await call(
            state.controller.finish_upload.remote(
                upload_id, filename, purpose, api.max_files, api.max_file_store_bytes, expires_at
            )
        )
        upload_id = None  # stored: nothing to drop
        return dict(doc)
    finally:
        if upload_id is not None:
            with contextlib.suppress(Exception):
                await call(state.controller.abort_upload.remote(upload_id), 10)


def _expires_at(anchor: str | None, seconds: str | None) -> int | None:
    """When an upload expires: ``expires_after[seconds]`` (OpenAI's 3600 to 2592000) after its
    upload, counted from ``created_at`` (the only anchor); None (kept until deleted) without."""
    if seconds is None:
        if anchor is not None:
            raise ApiError(
                400,
                "expires_after[seconds] is required with expires_after[anchor].",
                "expires_after[seconds]",
            )
        return None
    if anchor is None:
        raise ApiError(
            400,
            "expires_after[anchor] is required with expires_after[seconds].",
            "expires_after[anchor]",
        )
    if not seconds.isdigit() or not 3600 <= int(seconds) <= 2_592_000:
        raise ApiError(
            400,
            "expires_after[seconds] must be an integer from 3600 to 2592000, got "
            f"{seconds[:40]!r}.",
            "expires_after[seconds]",
        )
    return int(time.time()) + int(seconds)


@router.get("/v1/files", summary="List files")
async def list_files(
    request: Request,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: Annotated[str | None, Query(max_length=128)] = None,
) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    files, has_more = await call(state.controller.files.remote(purpose, limit, after))
    return page(files, has_more)


@router.get("/v1/files/{file_id}", summary="Retrieve a file's metadata")
async def retrieve_file(request: Request, file_id: FileId) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    return dict(await call(state.controller.file.remote(file_id)))


@router.delete("/v1/files/{file_id}", summary="Delete a file")
async def delete_file(request: Request, file_id: FileId) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    await call(state.controller.delete_file.remote(file_id))
    return {"id": file_id, "object": "file", "deleted": True}


@router.get(
    "/v1/files/{file_id}/content",
    summary="Download a file's content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def file_content(request: Request, file_id: FileId) -> StreamingResponse:
    state: ServerState = request.app.state.inference
    doc = await call(state.controller.file.remote(file_id))
    if doc["status"] == "expired":  # listed until the janitor deletes it; its content is gone
        raise ApiError(404, f"file {file_id} has expired", None, "file_expired")
    size = int(doc["bytes"])

    async def chunks() -> AsyncIterator[bytes]:
        offset = 0
        while offset < size:
            data = await call(state.controller.read_file.remote(file_id, offset, CHUNK_BYTES))
            if not data:
                return
            offset += len(data)
            yield data

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={
            "content-length": str(size),
            "content-disposition": f'attachment; filename="{_SAFE.sub("_", doc["filename"])}"',
        },
    )
