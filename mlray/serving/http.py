"""Errors to HTTP responses, in exactly one place: :func:`render_error`.

Each protocol answers errors in its own shape, with the status its clients expect:

- MLflow's scoring route (``/invocations``): ``{"error_code": ..., "message": ...}`` as
  ``MlflowException.serialize_as_json()``, 400 for any input it cannot use;
- Open Inference Protocol v2: ``{"error": "..."}`` (the spec's ``$inference_error_response``), 400 for a
  bad input, as KServe and Triton answer;
- V1 and everything else: ``{"error": "..."}``, 422 for an input that does not fit the model.

Unknown routes, wrong methods (with ``Allow``), refused API keys (401 with ``WWW-Authenticate``, 403), a full
server (503) and a timeout (504, both with ``Retry-After``) are rendered by the same function, whether the
fast path, the auth middleware or FastAPI's handlers met them. An unexpected exception becomes a logged 500
with a generic message (the replica keeps serving).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlray.errors import (
    InvalidInput,
    MethodNotAllowed,
    MlrayError,
    NotFound,
    Unauthorized,
)

logger = logging.getLogger(__name__)


def route_path(scope: Any) -> str:
    """The path inside the app: Serve mounts an app under its route prefix (``root_path``)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def encode(body: Any) -> bytes:
    """The bytes Starlette's JSONResponse renders, by orjson (much faster than the standard library).

    orjson writes a NaN as ``null`` where Starlette refuses it; a model's non-finite output is refused before
    it gets here (``core.PredictionCore``), and anything else orjson cannot write goes to the standard library.
    """
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


# MLflow's HTTP_STATUS_TO_ERROR_CODE (mlflow/exceptions.py), and two statuses it has no code for: a body
# too large is a BAD_REQUEST (not RESOURCE_EXHAUSTED, which is 429 and which MLflow's clients retry), a
# request timeout is DEADLINE_EXCEEDED.
_MLFLOW_ERROR_CODES = {
    400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "ENDPOINT_NOT_FOUND",
    408: "DEADLINE_EXCEEDED", 409: "ALREADY_EXISTS", 413: "BAD_REQUEST", 429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED", 500: "INTERNAL_ERROR", 501: "NOT_IMPLEMENTED", 503: "TEMPORARILY_UNAVAILABLE",
    504: "DEADLINE_EXCEEDED", 405: "BAD_REQUEST", 415: "BAD_REQUEST",
}
# MlflowException (3.x) adds these to its JSON for some codes (mlflow/error_classification.py).
_MLFLOW_CLASSIFICATION = {
    "BAD_REQUEST": ("KAM00", "INVALID_PARAMETER_VALUE"),
    "INVALID_PARAMETER_VALUE": ("KAM00", "INVALID_PARAMETER_VALUE"),
    "ENDPOINT_NOT_FOUND": ("KAM00", "RESOURCE_NOT_FOUND"),
    "RESOURCE_DOES_NOT_EXIST": ("KAM00", "RESOURCE_NOT_FOUND"),
    "PERMISSION_DENIED": ("KAM00", "PERMISSION_DENIED"),
    "INTERNAL_ERROR": ("XXM00", "CLIENT_INTERNAL_ERROR"),
    "TEMPORARILY_UNAVAILABLE": ("XXM00", "CLIENT_INTERNAL_ERROR"),
}


def mlflow_error(message: str, *, error_code: str = "BAD_REQUEST") -> dict[str, Any]:
    """``MlflowException.serialize_as_json()`` as the scoring server sends it; never a stack trace (MLflow adds
    one only when the model itself raised, which mlray logs instead)."""
    body: dict[str, Any] = {"error_code": error_code, "message": message}
    if error_code in _MLFLOW_CLASSIFICATION:
        body["sqlstate"], body["error_class"] = _MLFLOW_CLASSIFICATION[error_code]
    return body


def mlflow_error_code(status: int) -> str:
    """MLflow's error code for an HTTP status (INTERNAL_ERROR for one it has no name for, as MLflow does)."""
    return _MLFLOW_ERROR_CODES.get(status, "INTERNAL_ERROR")


def status_for(protocol: str, err: MlrayError) -> int:
    """MLflow's scoring server and OIP v2 servers answer 400 to every input they cannot use, so mlray's 422
    becomes 400 there; a body over the limit stays 413 (the status proxies use too), the rest keep theirs."""
    if isinstance(err, InvalidInput) and protocol in ("mlflow", "v2"):
        return 400
    return err.status_code


def render_error(protocol: str, err: BaseException, *, where: str = "") -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, headers) for any error on a route of ``protocol`` ("v1", "v2", "mlflow", "other").

    ``where`` ("POST /path") is logged with an unexpected error, whose message is never shown to the client.
    """
    if isinstance(err, MlrayError):
        status, message = status_for(protocol, err), str(err)
    else:
        logger.error("Unexpected error on %s", where or "a request", exc_info=err)
        status, message = 500, f"internal error ({type(err).__name__}); see the replica's log"
    headers: dict[str, str] = {}
    retry = getattr(err, "retry_after_s", None)
    if retry is not None:
        headers["retry-after"] = str(retry)
    if isinstance(err, MethodNotAllowed):
        headers["allow"] = ", ".join(err.allow)
    if isinstance(err, Unauthorized):
        headers["www-authenticate"] = 'Bearer realm="mlray"'
    if protocol == "mlflow":
        return status, mlflow_error(message, error_code=mlflow_error_code(status)), headers
    return status, {"error": message}, headers


def raw_response(status: int, body: Any, headers: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two ASGI messages of a response: ``body`` is JSON to render, or bytes as they are (their content
    type in ``headers``)."""
    payload = body if isinstance(body, bytes) else encode(body)
    raw = [(b"content-length", str(len(payload)).encode())]
    if "content-type" not in headers:
        raw.append((b"content-type", b"application/json"))
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    return ({"type": "http.response.start", "status": status, "headers": raw},
            {"type": "http.response.body", "body": payload})


async def send_response(send: Any, status: int, body: Any, headers: dict[str, str]) -> None:
    start, content = raw_response(status, body, headers)
    await send(start)
    await send(content)


def response(status: int, body: Any, headers: dict[str, str]) -> Response:
    """The same response as a Starlette object, for FastAPI's handlers."""
    payload = body if isinstance(body, bytes) else encode(body)
    media = headers.pop("content-type", "application/json")
    return Response(payload, status_code=status, headers=headers, media_type=media)


def install_error_handlers(app: FastAPI, *, protocol_of: Any) -> None:
    """FastAPI's own errors (no route, wrong method, bad path parameter) and anything a handler raised, through
    :func:`render_error`; ``protocol_of(path)`` is the route table's."""

    def render(request: Request, err: BaseException) -> Response:
        path = route_path(request.scope)
        status, body, headers = render_error(protocol_of(path), err, where=f"{request.method} {path}")
        return response(status, body, headers)

    @app.exception_handler(MlrayError)
    async def _mlray(request: Request, err: MlrayError) -> Response:
        return render(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> Response:
        mapped: BaseException
        if err.status_code == 404:
            mapped = NotFound(f"no route {request.method} {request.url.path}")
        elif err.status_code == 405:
            allow = (err.headers or {}).get("Allow", "")
            mapped = MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}; "
                                      f"allowed: {allow}", allow=[m.strip() for m in allow.split(",") if m.strip()])
        else:
            mapped = MlrayError(err.detail if isinstance(err.detail, str) else str(err.detail))
            mapped.status_code = err.status_code
        return render(request, mapped)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> Response:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return render(request, InvalidInput(f"{where}: {first.get('msg', 'invalid request')}"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> Response:
        return render(request, err)
