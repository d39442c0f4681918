"""``/v1/files``: upload (multipart, purpose ``batch``), retrieve, list, content, delete.

The multipart body is parsed here with the standard library (the whole body is already bounded by
the guard's limit), so the server needs no multipart package; the files themselves live in the
Controller's :class:`~inference.api.filestore.FileStore`.
"""

from __future__ import annotations

import email.message
import email.parser
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from .http_errors import ApiError
from .state import ServerState, call
from .views import page

router = APIRouter(tags=["files"])
CHUNK_BYTES = 4 << 20
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


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """``multipart/form-data`` -> {field name: (filename or None, content)}; 400 when malformed,
    415 for another content type."""
    header = email.message.Message()
    header["content-type"] = content_type
    if header.get_content_type() != "multipart/form-data":
        raise ApiError(415, "The body must be multipart/form-data.", None, "unsupported_media_type")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 200:
        raise ApiError(400, "The multipart body has no boundary.", None, "invalid_multipart")
    parts = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(parts) < 2 or not parts[-1].startswith(b"--"):
        raise ApiError(400, "The multipart body is truncated.", None, "invalid_multipart")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for raw in parts[1:-1]:
        head, sep, content = raw.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"\r\n"):
            raise ApiError(400, "A multipart part has no headers.", None, "invalid_multipart")
        headers = email.parser.BytesHeaderParser().parsebytes(head[2:] + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "A multipart part has no name.", None, "invalid_multipart")
        if name in fields:
            raise ApiError(400, f"The field {name!r} appears twice.", name, "invalid_multipart")
        fields[name] = (headers.get_filename(), content)
    return fields


def _text(fields: dict[str, tuple[str | None, bytes]], name: str) -> str | None:
    if name not in fields:
        return None
    try:
        return fields[name][1].decode()
    except UnicodeDecodeError:
        raise ApiError(400, f"{name} must be UTF-8 text.", name, "invalid_value") from None


@router.post("/v1/files", openapi_extra=_UPLOAD_SCHEMA, summary="Upload a batch input file")
async def upload_file(request: Request) -> dict[str, Any]:
    state: ServerState = request.app.state.inference
    body = await request.body()
    fields = await run_in_threadpool(parse_multipart, body, request.headers.get("content-type", ""))
    del body
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise ApiError(400, f"Unknown field {unknown[0]!r}.", unknown[0], "unknown_parameter")
    if "file" not in fields:
        raise ApiError(400, "Missing required parameter: 'file' (a file part).", "file")
    purpose = _text(fields, "purpose")
    if purpose is None:
        raise ApiError(400, "Missing required parameter: 'purpose'.", "purpose")
    anchor = _text(fields, "expires_after[anchor]")
    if anchor is not None and anchor != "created_at":
        raise ApiError(400, "expires_after[anchor] must be created_at.", "expires_after[anchor]")
    filename, data = fields["file"]
    if filename is None or not 1 <= len(filename) <= 255:
        raise ApiError(400, "The file's name must have 1 to 255 characters.", "file")
    return dict(await call(state.controller.put_file.remote(data, filename, purpose)))


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
