"""The prediction routes answered in plain ASGI, ahead of FastAPI's router.

A single-row prediction is mostly fixed cost, and FastAPI's share of it (its router, dependency solving,
``Request`` and ``JSONResponse`` objects and their middlewares) is about as large as the model call, the JSON
and mlray's own checks together (profiled: bench/README.md). The
routes with ``fast=True`` in the route table (the three prediction routes) are therefore matched here and
answered by the *same* core method FastAPI's registration calls, with the same errors
(``http.render_error``) and the same headers. Everything else (metadata, health, OpenAPI at ``/docs``,
unknown paths, wrong methods) goes on to FastAPI, which also still documents the prediction routes.
``fast_path: false`` in the app's args sends those to FastAPI too.

Runs inside the auth and metrics middlewares, so keys are checked and responses counted as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mlray.errors import PayloadTooLarge
from mlray.serving import routes
from mlray.serving.core import Call
from mlray.serving.http import encode, render_error, route_path, send_response
from mlray.serving.multi import Answers

logger = logging.getLogger(__name__)

__all__ = ["FastPredict", "encode", "match", "read_limited"]


def match(path: str) -> tuple[str, str] | None:
    """(protocol, model name) for a prediction path, as FastAPI would match it (a name has no '/')."""
    found = routes.match("POST", path)
    if found is None or not found[0].fast:
        return None
    route, params = found
    return route.kind, params.get("name", "")


def read_limited(receive: Any, max_bytes: int) -> Callable[[], Any]:
    """The body reader of a request: reads no further than the limit, so a client sending a huge body gets
    413 without it being held."""

    async def read_body() -> bytes:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"request body is more than {max_bytes} bytes; the limit is {max_bytes}")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    return read_body


class FastPredict:
    """ASGI middleware: fast routes to ``core()``'s handlers, the rest to the wrapped app.

    ``core`` is looked up per request (it is None until the replica has started, and Serve ships the
    FastAPI app to the replica as a copy, so a core captured at import would not be the replica's).
    """

    def __init__(self, app: Any, *, core: Callable[[], Answers | None]) -> None:
        self.app = app
        self.core = core

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        core = self.core() if scope["type"] == "http" else None
        path = route_path(scope)
        found = routes.match(scope["method"], path) if core is not None else None
        if core is None or found is None or not found[0].fast:
            await self.app(scope, receive, send)
            return
        route, params = found
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body, out = await core.answer(Call(route, params, headers, read_limited(receive, core.max_body_bytes)))
            status = 200
        except Exception as err:  # noqa: BLE001 - rendered; an unexpected one is logged, the replica serves on
            status, body, out = render_error(route.kind, err, where=f"{route.method} {path}")
        await send_response(send, status, body, out)
