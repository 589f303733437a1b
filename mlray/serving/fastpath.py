"""The prediction routes answered in plain ASGI, ahead of FastAPI's router.

A single-row prediction is mostly fixed cost. Measured with py-spy in a replica at 16 clients (2 cores),
FastAPI's share of that cost (its router, dependency solving, ``Request`` and ``JSONResponse`` objects and
their middlewares) was about as large as the model call, the JSON and mlray's own checks together. The
three prediction routes (``POST /v1/models/{name}:predict``, ``POST /v2/models/{name}/infer``,
``POST /invocations``) are therefore matched here and answered by the *same* ``ModelServer`` methods the
FastAPI routes call, with the same errors (``http.error_body``) and the same headers. Everything else
(metadata, health, OpenAPI at ``/docs``, unknown paths, wrong methods) goes on to FastAPI, which also
still documents the prediction routes. ``fast_path: false`` in the app's args sends those to FastAPI too.

Runs inside the auth and metrics middlewares, so keys are checked and responses counted as before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson

from mlray.errors import MlrayError, PayloadTooLarge
from mlray.serving.http import error_body, route_path, status_for

logger = logging.getLogger(__name__)

Answer = tuple[dict[str, Any], dict[str, str]]  # (JSON body, response headers)


class Predictor(Protocol):
    max_body_bytes: int

    async def predict_v1(self, name: str, headers: Any, read_body: Callable[[], Awaitable[bytes]]) -> Answer: ...

    async def predict_v2(self, name: str, headers: Any, read_body: Callable[[], Awaitable[bytes]]) -> Answer: ...

    async def predict_mlflow(self, headers: Any, read_body: Callable[[], Awaitable[bytes]]) -> Answer: ...


def match(path: str) -> tuple[str, str] | None:
    """(route kind, model name) for a prediction path, as FastAPI would match it (a name has no '/')."""
    if path == "/invocations":
        return "mlflow", ""
    for prefix, suffix, kind in (("/v1/models/", ":predict", "v1"), ("/v2/models/", "/infer", "v2")):
        if path.startswith(prefix) and path.endswith(suffix):
            name = path[len(prefix):-len(suffix)]
            if name and "/" not in name:
                return kind, name
    return None


def encode(body: dict[str, Any]) -> bytes:
    """The bytes Starlette's JSONResponse renders, by orjson (~1 us against ~10 for the standard library).

    orjson writes a NaN as ``null`` where Starlette refuses it; a model's non-finite output is refused before
    it gets here (``ModelServer._answer``), and anything else orjson cannot write goes to the standard library.
    """
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    payload = encode(body)
    raw = [(b"content-length", str(len(payload)).encode()), (b"content-type", b"application/json")]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class FastPredict:
    """ASGI middleware: prediction routes to ``server()``'s methods, the rest to the wrapped app.

    ``server`` is looked up per request (it is None until the replica has started, and Serve ships the
    FastAPI app to the replica as a copy, so a server captured at import would not be the replica's).
    """

    def __init__(self, app: Any, *, server: Callable[[], Predictor | None]) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        server = self.server() if scope["type"] == "http" and scope["method"] == "POST" else None
        route = match(route_path(scope)) if server is not None else None
        if server is None or route is None:
            await self.app(scope, receive, send)
            return
        kind, name = route
        path = route_path(scope)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

        async def read_body() -> bytes:
            # Read no further than the limit: a client sending a huge body gets 413 without it being held.
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > server.max_body_bytes:
                    raise PayloadTooLarge(f"request body is more than {server.max_body_bytes} bytes; "
                                          f"the limit is {server.max_body_bytes}")
                chunks.append(chunk)
                more = message.get("more_body", False)
            return b"".join(chunks)

        try:
            if kind == "v1":
                body, out = await server.predict_v1(name, headers, read_body)
            elif kind == "v2":
                body, out = await server.predict_v2(name, headers, read_body)
            else:
                body, out = await server.predict_mlflow(headers, read_body)
            status = 200
        except MlrayError as err:
            status = status_for(path, err)
            body, out = error_body(path, status, str(err), retry_after_s=getattr(err, "retry_after_s", None))
        except Exception as err:  # noqa: BLE001 - as http.install_error_handlers: a logged 500, the replica serves on
            logger.exception("Unexpected error on POST %s", path)
            status = 500
            body, out = error_body(path, 500, f"internal error ({type(err).__name__}); see the replica's log")
        await _send_json(send, status, body, out)
