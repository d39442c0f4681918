"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

:class:`ApiError` is raised by route code and by the Controller (it pickles, so it crosses the Ray
boundary); :mod:`.app` turns it, FastAPI's validation errors and anything unexpected into this
shape. No FastAPI import here: the Controller raises these too.
"""

from __future__ import annotations

from typing import Any

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


class ApiError(Exception):
    """A refused request: HTTP ``status``, a ``message`` that says what and why, the ``param``
    (field path) at fault when there is one, and a short machine ``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, param, code, headers)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def __str__(self) -> str:
        return f"{self.status} {self.message}"

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": code,
        }
    }


def not_found(kind: str, ident: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No {kind} found with id {ident!r}.", param, "not_found")


def field_path(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """``('body', 'items', 3, 'url')`` -> ``items[3].url`` (the request part dropped)."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """Pydantic/FastAPI validation errors as one 400 naming the first field at fault."""
    if errors and errors[0].get("type") == "json_invalid":
        return ApiError(400, f"The body is not valid JSON: {errors[0].get('msg')}", None, "json")
    described = []
    for err in errors[:10]:
        path = field_path(err.get("loc", ())) or "body"
        described.append(f"{path}: {err.get('msg', 'invalid')}")
    first = field_path(errors[0].get("loc", ())) if errors else None
    more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
    return ApiError(400, "; ".join(described) + more, first or None, "invalid_request")
