"""Errors to HTTP responses, in exactly one place.

Each protocol answers errors in its own shape: MLflow's scoring route (``/invocations``) with
``{"error_code": ..., "message": ...}``, everything else (V1, Open Inference Protocol V2) with
``{"error": "..."}``. Unknown routes, wrong methods, FastAPI's own validation errors and refused API
keys get the same shapes, and an unexpected exception inside a handler becomes a logged 500 with a
generic message (the replica keeps serving). 503 and 504 carry ``Retry-After``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlray.errors import MlrayError
from mlray.serving import protocols

logger = logging.getLogger(__name__)

MLFLOW_PATHS = frozenset({"/invocations"})



def route_path(scope: Any) -> str:
    """The path inside the app: Serve mounts an app under its route prefix (``root_path``)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def error_body(path: str, status: int, message: str, *, retry_after_s: int | None = None
               ) -> tuple[dict[str, Any], dict[str, str]]:
    """(JSON body, extra headers) for an error on ``path``, in that route's protocol."""
    headers = {"retry-after": str(retry_after_s)} if retry_after_s is not None else {}
    if path in MLFLOW_PATHS:
        return protocols.mlflow_error(message, error_code=protocols.mlflow_error_code(status)), headers
    return {"error": message}, headers


def status_for(path: str, err: MlrayError) -> int:
    """The status each protocol's clients expect: MLflow and V2 answer 400 to a bad input, V1 422."""
    if path in MLFLOW_PATHS:
        return protocols.mlflow_status(err)
    return protocols.v2_status(err) if path.startswith("/v2/") else err.status_code


def error_response(path: str, status: int, message: str, *, retry_after_s: int | None = None) -> JSONResponse:
    body, headers = error_body(path, status, message, retry_after_s=retry_after_s)
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MlrayError)
    async def _mlray(request: Request, err: MlrayError) -> JSONResponse:
        retry = getattr(err, "retry_after_s", None)
        path = route_path(request.scope)
        return error_response(path, status_for(path, err), str(err), retry_after_s=retry)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        detail = err.detail if isinstance(err.detail, str) else str(err.detail)
        if err.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        elif err.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(route_path(request.scope), err.status_code, detail)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(route_path(request.scope), 422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("Unexpected error on %s %s", request.method, request.url.path)
        message = f"internal error ({type(err).__name__}); see the replica's log"
        return error_response(route_path(request.scope), 500, message)
