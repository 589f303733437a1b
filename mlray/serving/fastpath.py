"""The prediction routes answered in plain ASGI, in front of FastAPI and its whole middleware stack.

A single-row prediction is mostly fixed cost, and FastAPI's share of it (its router, dependency solving,
``Request`` and ``JSONResponse`` objects and the middlewares Starlette and FastAPI put around every app) is about
as large as the model call, the JSON and mlray's own checks together (profiled: bench/README.md). The
routes with ``fast=True`` in the route table (the three prediction routes) are therefore matched here and
answered by the *same* core method FastAPI's registration calls, with the same errors
(``http.render_error``) and the same headers. Everything else (metadata, health, OpenAPI at ``/docs``,
unknown paths, wrong methods) goes on to FastAPI, which also still documents the prediction routes.
``fast_path: false`` in the app's args sends those to FastAPI too.

Being in front, it does itself what the app's middlewares do for the other routes: it checks the API key
with the same guard (``auth.AuthMiddleware``) and records each answer in the replica's metrics with the same
function (``app.MetricsMiddleware``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from mlray.errors import PayloadTooLarge
from mlray.serving import routes
from mlray.serving.auth import KeyGuard
from mlray.serving.core import Call
from mlray.serving.http import encode, render_error, route_path, send_response
from mlray.serving.multi import Answers

logger = logging.getLogger(__name__)

__all__ = ["FastPredict", "Record", "encode", "match", "read_limited"]

Record = Callable[[str, int, Mapping[str, str], float], None]
"""Records one answer in the replica's metrics: (path, status, response headers, ``perf_counter()`` at start)."""


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
    """ASGI: fast routes to ``core()``'s handlers behind ``guard()``'s key check, the rest to the wrapped app.

    ``core`` and ``guard`` are looked up per request (the core is None until the replica has started, and
    Serve ships the FastAPI app to the replica as a copy, so objects captured at import would not be the
    replica's). ``record``, when given, is called once per answer, refusals included.
    """

    def __init__(self, app: Any, *, core: Callable[[], Answers | None], guard: Callable[[], KeyGuard],
                 record: Record | None = None) -> None:
        self.app = app
        self.core = core
        self.guard = guard
        self.record = record

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        core = self.core() if scope["type"] == "http" else None
        path = route_path(scope)
        found = routes.match(scope["method"], path) if core is not None else None
        if core is None or found is None or not found[0].fast:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route, params = found
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refused = None if route.public else self.guard().check(headers.get("authorization"))
        status: int = 500
        body: Any = None
        out: Mapping[str, str] = {}
        try:
            if refused is not None:
                status, body, out = render_error(route.kind, refused)
            else:
                try:
                    body, answered = await core.answer(Call(route, params, headers,
                                                            read_limited(receive, core.max_body_bytes)))
                    out = answered
                    status = 200
                except Exception as err:  # noqa: BLE001 - rendered; an unexpected one is logged, the replica serves on
                    status, body, out = render_error(route.kind, err, where=f"{route.method} {path}")
            await send_response(send, status, body, out)
        finally:
            if self.record is not None:
                self.record(path, status, out, started)
