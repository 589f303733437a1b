"""The lean direct-ingress wrapper (mlray/_ray/ingress.py) in front of Serve's ``Replica._direct_ingress_asgi``.

The wrapper runs here on a stand-in replica that carries Serve's own admission and slot code (Ray 2.60's
``_can_accept_request``, ``_track_queued_request``, ``_start_request``), a real semaphore, and a recorder for
Serve's metrics manager; Serve's whole wrapper is a recorder that says it was asked. The integration tier
runs the wrapper in real replicas (every serving test) and checks Serve's metrics in Prometheus
(tests/integration/test_monitoring.py).
"""

from __future__ import annotations

import asyncio
import logging
import types
from typing import Any

import pytest
from ray.serve._private import replica as serve_replica
from ray.serve._private.thirdparty.get_asgi_route_name import get_asgi_route_name
from ray.serve.schema import LoggingConfig

from mlray._ray import ingress
from mlray.serving import routes
from mlray.serving.app import _serve_route, api

Replica = serve_replica.Replica
DISCONNECT_OFF = (b"x-request-disconnect-disabled", b"?1")
PREDICT = "/v1/models/digits:predict"


class Metrics:
    """Serve's ReplicaMetricsManager as the wrapper uses it: ongoing requests, then one record per request."""

    def __init__(self) -> None:
        self.ongoing = 0
        self.requests: list[dict[str, Any]] = []
        self.ingress: list[dict[str, Any]] = []

    def inc_num_ongoing_requests(self, _metadata: Any) -> None:
        self.ongoing += 1

    def dec_num_ongoing_requests(self, _metadata: Any) -> None:
        self.ongoing -= 1

    def record_request_metrics(self, **kwargs: Any) -> None:
        self.requests.append(kwargs)

    def record_ingress_request_metrics(self, **kwargs: Any) -> None:
        self.ingress.append(kwargs)


class StandIn:
    _can_accept_request = Replica._can_accept_request
    _is_replica_quiescing = Replica._is_replica_quiescing
    _track_queued_request = Replica._track_queued_request
    _start_request = Replica._start_request
    _on_request_failed = Replica._on_request_failed

    def __init__(self, app: Any, *, prefix: str = "/", max_ongoing: int = 4, max_queued: int = -1) -> None:
        self._user_callable_asgi_app = app
        self._route_prefix = prefix
        self._deployment_id = types.SimpleNamespace(app_name="digits", name="ModelServer")
        self._user_callable_wrapper = types.SimpleNamespace(_run_user_code_in_separate_thread=False)
        self._http_options = types.SimpleNamespace(request_timeout_s=None)
        self._deployment_config = types.SimpleNamespace(logging_config={"enable_access_log": False})
        self._metrics_manager = Metrics()
        self._semaphore = asyncio.Semaphore(max_ongoing)
        self._num_queued_requests = 0
        self._quiescing = False
        self.max_queued_requests = max_queued
        self.cancelled: list[Any] = []

    def _on_request_cancelled(self, metadata: Any, err: BaseException) -> None:
        self.cancelled.append(metadata)


@pytest.fixture
def lean():
    """The lean wrapper around a recorder standing for Serve's own; yields (wrapper, calls to Serve's)."""
    to_serve: list[str] = []

    async def serves_own(self: Any, scope: Any, receive: Any, send: Any) -> None:
        to_serve.append(scope["path"])

    return ingress._lean(serves_own, _serve_route, serve_replica), to_serve


def scope(path: str = PREDICT, *, method: str = "POST", headers: tuple[tuple[bytes, bytes], ...] = (DISCONNECT_OFF,)):
    return {"type": "http", "method": method, "path": path, "root_path": "", "client": ("127.0.0.1", 5000),
            "headers": [(b"x-request-id", b"rid-1"), *headers]}


def answering(status: int = 200, *, seen: dict[str, Any] | None = None, raises: BaseException | None = None):
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if seen is not None:
            seen.update(root_path=scope.get("root_path"), ongoing=replica_of[0]._metrics_manager.ongoing)
        if raises is not None:
            raise raises
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    replica_of: list[StandIn] = []
    return app, replica_of


def run(wrapper: Any, replica: StandIn, request: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    asyncio.run(wrapper(replica, request, receive, send))
    return sent


def test_a_prediction_takes_the_lean_wrapper_holds_a_slot_and_is_counted_as_serve_counts_it(lean):
    wrapper, to_serve = lean
    seen: dict[str, Any] = {}
    app, holder = answering(seen=seen)
    replica = StandIn(app)
    holder.append(replica)
    sent = run(wrapper, replica, scope())
    assert to_serve == []
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert seen["ongoing"] == 1 and replica._metrics_manager.ongoing == 0  # the slot autoscaling and drain read
    assert replica._num_queued_requests == 0 and not replica._semaphore.locked()
    [request] = replica._metrics_manager.requests
    assert request["route"] == "/v1/models/{name:model}:predict" and request["is_error"] is False
    [counted] = replica._metrics_manager.ingress
    assert (counted["route"], counted["method"], counted["status_code"], counted["is_error"]) == (
        "/v1/models/{name:model}:predict", "POST", "200", False)


def test_an_error_status_is_an_ingress_error_as_serve_counts_it(lean):
    wrapper, _ = lean
    app, holder = answering(503)
    replica = StandIn(app)
    holder.append(replica)
    run(wrapper, replica, scope())
    assert replica._metrics_manager.ingress[0]["is_error"] is True
    assert replica._metrics_manager.requests[0]["is_error"] is False  # the app answered: not an exception


def test_an_app_that_raises_is_logged_counted_and_not_raised_to_uvicorn(lean, caplog):
    wrapper, _ = lean
    app, holder = answering(raises=RuntimeError("boom"))
    replica = StandIn(app)
    holder.append(replica)
    with caplog.at_level(logging.ERROR, logger=serve_replica.logger.name):
        assert run(wrapper, replica, scope()) == []  # uvicorn answers 500 to an app that sent nothing
    assert any(r.getMessage() == "Request failed." and r.exc_info for r in caplog.records)
    assert replica._metrics_manager.requests[0]["exception_type"] == "RuntimeError"
    assert replica._metrics_manager.ingress == []  # no status was sent, as in Serve's wrapper
    assert replica._metrics_manager.ongoing == 0 and not replica._semaphore.locked()


def test_under_a_route_prefix_the_app_is_mounted_there_and_the_label_carries_it(lean):
    wrapper, to_serve = lean
    seen: dict[str, Any] = {}
    app, holder = answering(seen=seen)
    replica = StandIn(app, prefix="/digits")
    holder.append(replica)
    run(wrapper, replica, scope("/digits/v2/models/digits/infer"))
    assert to_serve == [] and seen["root_path"] == "/digits"
    assert replica._metrics_manager.requests[0]["route"] == "/digits/v2/models/{name:model}/infer"
    run(wrapper, replica, scope("/other/v2/models/digits/infer"))
    assert to_serve == ["/other/v2/models/digits/infer"]


@pytest.mark.parametrize("request_", [
    scope(headers=()),                                                        # disconnects watched
    scope(headers=(DISCONNECT_OFF, (b"x-request-timeout-seconds", b"5"))),    # a timeout applies
    scope(headers=(DISCONNECT_OFF, (b"traceparent", b"00-1-2-01"))),          # a trace to carry on
    scope(headers=(DISCONNECT_OFF, (b"x-session-id", b"s1"))),                # a session id
    scope("/v1/models/digits"),                                               # not a prediction route
    scope(method="GET"),                                                      # not the route's method
    scope("/healthz", method="GET"),
    {**scope(), "type": "websocket"},
], ids=["disconnects", "timeout", "trace", "session", "metadata", "method", "health", "websocket"])
def test_everything_else_takes_serves_own_wrapper(lean, request_):
    wrapper, to_serve = lean
    app, holder = answering()
    replica = StandIn(app)
    holder.append(replica)
    run(wrapper, replica, request_)
    assert to_serve == [request_["path"]]
    assert replica._metrics_manager.requests == []


@pytest.mark.parametrize("logging_config", [None, {}, {"enable_access_log": True}, LoggingConfig()],
                         ids=["none", "empty", "on", "serves-default"])
def test_while_serves_access_log_is_on_every_request_takes_serves_wrapper(lean, logging_config):
    wrapper, to_serve = lean
    app, holder = answering()
    replica = StandIn(app)
    holder.append(replica)
    replica._deployment_config.logging_config = logging_config
    run(wrapper, replica, scope())
    assert to_serve == [PREDICT]
    replica._deployment_config.logging_config = LoggingConfig(enable_access_log=False)
    run(wrapper, replica, scope())
    assert to_serve == [PREDICT]  # the second took the lean wrapper


def test_a_request_serves_admission_refuses_gets_serves_backpressure_answer(lean):
    wrapper, to_serve = lean
    app, holder = answering()
    replica = StandIn(app, max_queued=1)
    holder.append(replica)
    replica._num_queued_requests = 1  # one request already waits for a slot
    run(wrapper, replica, scope())
    assert to_serve == [PREDICT]


def test_while_every_slot_is_taken_a_prediction_waits_for_one(lean):
    wrapper, _ = lean
    order: list[str] = []

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        order.append(f"start {scope['path']}")
        await asyncio.sleep(0.05)
        order.append(f"end {scope['path']}")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    replica = StandIn(slow, max_ongoing=1)

    async def two() -> None:
        async def send(message: Any) -> None:
            pass

        async def receive() -> Any:
            return {"type": "http.request", "body": b""}

        await asyncio.gather(wrapper(replica, scope("/v1/models/a:predict"), receive, send),
                             wrapper(replica, scope("/v1/models/b:predict"), receive, send))

    asyncio.run(two())
    assert order == ["start /v1/models/a:predict", "end /v1/models/a:predict",
                     "start /v1/models/b:predict", "end /v1/models/b:predict"]


@pytest.mark.parametrize("route", [r for r in routes.ROUTES if r.predict is not None], ids=lambda r: r.path)
def test_the_route_label_is_the_one_serve_finds_in_the_app(route):
    path = route.path.replace("{name}", "digits")
    request = {"type": "http", "method": route.method, "path": path, "root_path": "", "headers": []}
    label = _serve_route(route.method, path)
    assert label is not None and label == get_asgi_route_name(api, request)


def test_only_prediction_routes_have_a_label():
    assert _serve_route("GET", "/v1/models/digits") is None
    assert _serve_route("GET", "/healthz") is None
    assert _serve_route("POST", "/nowhere") is None


def test_the_wrapper_finds_all_it_uses_in_serves_replica():
    assert ingress.missing(serve_replica) == set()


def test_a_replica_module_without_what_it_uses_is_reported():
    changed = types.ModuleType("changed")

    class Replica:
        def _direct_ingress_asgi(self) -> None:
            self._route_prefix = "/"

    changed.Replica = Replica  # type: ignore[attr-defined]
    assert "_start_request" in ingress.missing(changed) and "_route_prefix" not in ingress.missing(changed)


def test_installing_is_idempotent_and_keeps_serves_wrapper_behind():
    original = Replica._direct_ingress_asgi
    try:
        assert ingress.lean_direct_ingress(_serve_route) is True
        patched = Replica._direct_ingress_asgi
        assert patched is not original and patched.__wrapped__ is original
        assert ingress.lean_direct_ingress(_serve_route) is True
        assert Replica._direct_ingress_asgi is patched
    finally:
        Replica._direct_ingress_asgi = original
