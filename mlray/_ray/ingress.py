"""Serve's direct ingress (Ray 2.60's ``Replica._direct_ingress_asgi``), leaner for mlray's prediction routes.

In each replica, Serve's uvicorn hands every request to ``Replica._direct_ingress_asgi``, which builds the
request's metadata, admits it (``max_queued_requests``), holds an ongoing-request slot while the app runs (the
count autoscaling and a replica's drain read), records Serve's request metrics, and logs an access line. For a
single-row prediction that wrapper costs about a quarter of a replica's CPU (bench/README.md, "Serve's
request wrapper"): two request ids, a context manager per step, the route found again by walking the app's
routes, and an access-log record built even when the line is off.

:func:`lean_direct_ingress` puts a shorter wrapper in front for the requests it can take whole and hands every
other request to Serve's. It keeps what a request needs from Serve: admission and the ongoing-request slot
(Serve's own ``_can_accept_request``, ``_track_queued_request`` and ``_start_request``), the request context,
Serve's request and ingress metrics (its own recording calls), the log line and ``_on_request_failed`` of a
request whose app raised. What it leaves out is the access line: while Serve's logging config has that line
on (``enable_access_log``, the app's ``access_log``), every request takes Serve's wrapper.

A request goes to Serve's wrapper unless all of these hold: it is HTTP on a route mlray says is a prediction
route (under the app's route prefix), HAProxy said the client's disconnects need no watching
(``x-request-disconnect-disabled: ?1``, as Serve's own short path requires), no timeout applies, it carries no
trace and no session id, tracing is off, and user code runs on the replica's loop
(``RAY_SERVE_THROUGHPUT_OPTIMIZED``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from mlray._ray import WRITTEN_FOR, check_version, installed_ray_version

logger = logging.getLogger(__name__)

_PATCHED = "__mlray_lean_ingress__"
# What the lean wrapper uses of Serve's replica (the class's code names each of them).
RELIED_ON = frozenset({"_can_accept_request", "_track_queued_request", "_start_request", "_metrics_manager",
                       "_user_callable_wrapper", "_run_user_code_in_separate_thread", "_user_callable_asgi_app",
                       "_route_prefix", "_deployment_id", "_http_options", "_on_request_cancelled",
                       "_on_request_failed", "record_request_metrics", "record_ingress_request_metrics",
                       "_deployment_config"})

_DISCONNECT_DISABLED = b"x-request-disconnect-disabled"
_REQUEST_ID = b"x-request-id"
_MULTIPLEXED = (b"serve_multiplexed_model_id", b"serve-multiplexed-model-id")


def lean_direct_ingress(route_of: Callable[[str, str], str | None]) -> bool:
    """Put the lean wrapper in front of Serve's direct ingress in this process; True if it is (idempotent).

    ``route_of(method, path)`` is the route template a prediction request is counted under in Serve's metrics
    (what Serve would find by walking the app's routes), ``None`` for a request Serve's wrapper should take.
    Call it in the deployment's constructor: Serve binds its server to the method after the constructor.
    """
    try:
        from ray.serve._private import replica as serve_replica
    except ImportError as err:
        logger.warning("Serve's replica module did not import (%s): requests keep Serve's own wrapper", err)
        return False
    cls = serve_replica.Replica
    original = cls._direct_ingress_asgi
    if getattr(original, _PATCHED, False):
        return True
    check_version("lean direct ingress")
    lacking = missing(serve_replica)
    if lacking:
        logger.warning("Serve's direct ingress in Ray %s is not the one mlray was written for (Ray %s; it lacks "
                       "%s): requests keep Serve's own wrapper (mlray/_ray/ingress.py)",
                       installed_ray_version(), WRITTEN_FOR, sorted(lacking))
        return False
    cls._direct_ingress_asgi = _lean(original, route_of, serve_replica)  # type: ignore[method-assign]
    return True


def _access_log_on(logging_config: Any) -> bool:
    """Whether Serve writes this replica's access lines (its ``LoggingConfig.enable_access_log``, default on)."""
    if logging_config is None:
        return True
    if isinstance(logging_config, dict):
        return bool(logging_config.get("enable_access_log", True))
    return bool(logging_config.enable_access_log)


def missing(module: Any) -> set[str]:
    """What of :data:`RELIED_ON` the module's classes neither define nor use (empty for Ray 2.60's replica)."""
    return set(RELIED_ON - _names(module))


def _names(module: Any) -> set[str]:
    """Every attribute name the module's classes define or use (their functions' code, nested ones too)."""
    names: set[str] = set()
    codes = [value.__code__ for cls in vars(module).values() if isinstance(cls, type)
             for value in vars(cls).values() if hasattr(value, "__code__")]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(const for const in code.co_consts if hasattr(const, "co_names"))
    return names | {name for cls in vars(module).values() if isinstance(cls, type) for name in vars(cls)}


def _lean(original: Any, route_of: Callable[[str, str], str | None], serve_replica: Any) -> Any:
    import ray.serve.context as serve_context
    from ray.serve._private.common import RequestMetadata, RequestProtocol
    from ray.serve._private.constants import SERVE_SESSION_ID
    from ray.serve._private.logging_utils import format_client_address
    from ray.serve._private.tracing_utils import is_tracing_enabled
    from ray.serve._private.utils import generate_request_id

    http = RequestProtocol.HTTP
    serve_logger = serve_replica.logger
    # Requests that carry any of these take Serve's wrapper: a timeout, a trace or a session to carry on.
    session = SERVE_SESSION_ID.lower()
    to_serve = {b"x-request-timeout-seconds", b"traceparent", b"tracestate",
                session.replace("_", "-").encode(), session.replace("-", "_").encode()}

    async def direct_ingress(self: Any, scope: Any, receive: Any, send: Any) -> None:
        prefix = self._route_prefix
        if (scope["type"] != "http" or scope.get("root_path") or not prefix
                or _access_log_on(self._deployment_config.logging_config)
                or self._user_callable_wrapper._run_user_code_in_separate_thread
                or self._http_options.request_timeout_s is not None or is_tracing_enabled()):
            return await original(self, scope, receive, send)
        method, path = scope["method"], scope["path"]
        if prefix != "/":  # the app is mounted under its prefix, as Serve's wrapper mounts it
            if not path.startswith(prefix + "/"):
                return await original(self, scope, receive, send)
            path = path[len(prefix):]
        template = route_of(method, path)
        if template is None:
            return await original(self, scope, receive, send)
        request_id = multiplexed = ""
        disconnect_disabled = False
        for name, value in scope["headers"]:
            if name == _DISCONNECT_DISABLED:
                disconnect_disabled = value == b"?1"
            elif name == _REQUEST_ID:
                request_id = value.decode()
            elif name in _MULTIPLEXED:
                multiplexed = value.decode()
            elif name in to_serve:
                return await original(self, scope, receive, send)
        if not disconnect_disabled:
            return await original(self, scope, receive, send)
        # Serve's route label: the app's route template under the prefix (get_asgi_route_name's join)
        route = template if prefix == "/" else prefix.rstrip("/") + "/" + template.lstrip("/")
        app_name = self._deployment_id.app_name
        metadata = RequestMetadata(
            request_id=request_id or generate_request_id(), internal_request_id=generate_request_id(),
            call_method="__call__", route=route, app_name=app_name, multiplexed_model_id=multiplexed,
            is_streaming=True, _request_protocol=http, _http_method=method, is_direct_ingress=True,
            _client=format_client_address(scope.get("client")))
        if not self._can_accept_request(metadata):
            return await original(self, scope, receive, send)  # Serve answers its backpressure status
        serve_context._serve_request_context.set(serve_context._RequestContext(  # type: ignore[arg-type]
            route=route, request_id=metadata.request_id, _internal_request_id=metadata.internal_request_id,
            app_name=app_name, multiplexed_model_id=multiplexed, _client=metadata._client,
            cancel_on_parent_request_cancel=True))
        status: str | None = None

        async def send_user_message(message: Any) -> None:
            nonlocal status
            if status is None and message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        if prefix != "/":
            scope["root_path"] = prefix
        started = time.time()
        failure: BaseException | None = None
        try:
            with self._track_queued_request() as release_queue_slot:
                async with self._start_request(metadata):
                    release_queue_slot()
                    await self._user_callable_asgi_app(scope, receive, send_user_message)
        except asyncio.CancelledError as err:  # as Serve's wrapper: counted, not raised to uvicorn
            failure = err
            self._on_request_cancelled(metadata, err)
        except Exception as err:  # noqa: BLE001 - as Serve's wrapper: logged and counted, uvicorn answers 500
            failure = err
            serve_logger.exception("Request failed.")
            self._on_request_failed(metadata, err)
        latency_ms = (time.time() - started) * 1000.0
        manager = self._metrics_manager
        manager.record_request_metrics(route=route, latency_ms=latency_ms, is_error=failure is not None,
                                       exception_type=type(failure).__name__ if failure is not None else None)
        if status is not None:
            manager.record_ingress_request_metrics(
                protocol=http, method=method, route=route, app_name=app_name,
                deployment_name=self._deployment_id.name, latency_ms=latency_ms,
                is_error=status.startswith(("4", "5")), status_code=status)

    setattr(direct_ingress, _PATCHED, True)
    direct_ingress.__wrapped__ = original  # type: ignore[attr-defined]
    return direct_ingress
