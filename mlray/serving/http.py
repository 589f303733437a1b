"""Errors to HTTP responses, in exactly one place: every error body is ``{"error": "..."}``.

Unknown routes, wrong methods and FastAPI's own validation errors get the same shape, and an unexpected
exception inside a handler becomes a logged 500 with a generic message (the replica keeps serving).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlray.errors import MlrayError

logger = logging.getLogger(__name__)


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MlrayError)
    async def _mlray(_: Request, err: MlrayError) -> JSONResponse:
        return error_response(err.status_code, str(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        detail = err.detail if isinstance(err.detail, str) else str(err.detail)
        if err.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        elif err.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(err.status_code, detail)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("Unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(err).__name__}); see the replica's log")
