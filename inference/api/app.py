"""The FastAPI app factory: routes by area, the guard (Host, Origin, auth, body type and size),
CORS for listed origins only, and every error in OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference import __version__
from inference.config import Config
from inference.heap import freeze_startup_heap

from . import dashboard, estimate, files, native, openai_batches, ops, results
from .coalesce import Coalescer
from .guard import ASGIApp, Guard, Message, Receive, Scope, Send
from .http_errors import ApiError, error_body, validation_error
from .state import ServerState

logger = logging.getLogger(__name__)

_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def create_app(config: Config, queue: Any, controller: Any) -> FastAPI:
    """The API over a WorkQueue and a Controller actor handle. ``config`` is the server's:
    its engine runs the jobs created here, its ``api`` section sets tokens, limits and CORS."""
    state = ServerState(
        config=config, queue=queue, controller=controller, coalescer=Coalescer(queue)
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        reporter = asyncio.get_running_loop().create_task(state.report_counters())
        freeze_startup_heap()
        try:
            yield
        finally:
            reporter.cancel()

    app = FastAPI(
        title="inference",
        version=__version__,
        summary="Batch inference on your own GPUs: the OpenAI Batch API and native enqueue.",
        docs_url=None,  # the Swagger page pulls scripts from a CDN; /openapi.json stays
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.inference = state
    # estimate before native: /v1/jobs/estimate is not a job's id
    for module in (openai_batches, files, estimate, native, results, ops, dashboard):
        app.include_router(module.router)
    _install_error_handlers(app)
    app.add_middleware(_RequestCounter, state=app.state.inference)
    api = config.api
    app.add_middleware(
        Guard,
        tokens=list(api.tokens),
        max_body_bytes=api.max_body_bytes,
        # Without tokens only loopback names are answered (DNS rebinding); with tokens (which
        # a public bind needs) the tokens protect the server, whatever name it is reached by.
        check_host=not api.tokens,
        allowed_hosts=list(api.allowed_hosts),
        cors_origins=list(api.cors_origins),
    )
    if config.api.cors_origins:  # outermost, so preflight requests need no token
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.api.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


class _RequestCounter:
    """Counts requests by method, route template and status (for ``/metrics``)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.state.requests[(scope["method"], path, status)] += 1


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        error = validation_error(list(exc.errors()))
        return JSONResponse(error.body(), error.status)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        body = error_body(exc.status_code, message, None, _CODES.get(exc.status_code))
        return JSONResponse(body, exc.status_code, headers=exc.headers)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        body = error_body(500, f"Internal error ({type(exc).__name__}); see the server log.")
        return JSONResponse(body, 500)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
