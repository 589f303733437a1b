"""The Ray Serve application: a FastAPI ingress over the registry's champion (and challenger).

Its routes are the route table's (:mod:`mlray.serving.routes`: V1, Open Inference Protocol V2, MLflow
scoring, health; all but the public ones need an API key when ``auth.enabled``), answered by a
:class:`~mlray.serving.core.PredictionCore`, OpenAPI at ``/openapi.json`` and ``/docs``.

Each replica loads its versions once, warms them up, then follows the registry (``rollout.Follower``).
"""

import asyncio
import inspect
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any, cast

from fastapi import FastAPI, Request, Response
from ray import serve
from starlette.convertors import StringConvertor, register_url_convertor

from mlray._ray import multiplex
from mlray._ray.agent import lower_metrics_agent_priority
from mlray._ray.ingress import lean_direct_ingress
from mlray._ray.onewrite import write_answers_whole
from mlray.errors import ModelLoadError
from mlray.serving import openapi, routes, selection
from mlray.serving.auth import AuthMiddleware, KeyFileWatch, KeyGuard, load_key_hashes
from mlray.serving.config import ServeAppConfig
from mlray.serving.core import Call, PredictionCore
from mlray.serving.fastpath import FastPredict, read_limited
from mlray.serving.fleet import ModelsWatcher
from mlray.serving.http import install_error_handlers, response, route_path
from mlray.serving.loader import ServedModel
from mlray.serving.metrics import ServingMetrics
from mlray.serving.multi import Answers, FleetLink, LocalWatcher, ModelSet, Slot
from mlray.serving.rollout import Follower, RegistryWatcher, resolve_targets, resolve_weight

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "ModelServer"


class _Replica:
    """What the module-level routes and middlewares need from the one ModelServer in this process."""

    guard = KeyGuard()
    metrics: ServingMetrics | None = None
    model = ""
    core: ModelSet | None = None  # set once the replica has loaded its models
    fast_path = True
    lean_ingress = False  # prediction requests take mlray/_ray/ingress.py's wrapper instead of Serve's


class MetricsMiddleware:
    """Counts every response by status code and the version that answered (read from its headers)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        metrics = _Replica.metrics
        if scope["type"] != "http" or metrics is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        seen: dict[str, str] = {"status": "500", "version": "none", "role": "none"}

        async def observe(message: Any) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = str(message["status"])
                for name, value in message.get("headers", ()):
                    if name == b"x-model-name":
                        seen["model"] = value.decode()
                    elif name == b"x-model-version":
                        seen["version"] = value.decode()
                    elif name == b"x-model-role":
                        seen["role"] = value.decode()
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            path = route_path(scope)
            protocol = routes.protocol_of(path)
            if protocol != "other":
                model = seen.get("model") or _asked_model(path)
                metrics.count_request(model, seen["version"], seen["role"], protocol, seen["status"])
                metrics.observe_latency(time.perf_counter() - started, model=model, version=seen["version"],
                                        protocol=protocol)


def _serve_route(method: str, path: str) -> str | None:
    """The route a prediction request is counted under in Serve's metrics; None for any other request."""
    found = routes.match(method, path)
    return found[0].fastapi_path if found is not None and found[0].predict is not None else None


def _asked_model(path: str) -> str:
    """For an answer without ``x-model-name`` (an error): the served model the URL names, else the app's
    model. Never a name a client made up: metric labels stay bounded."""
    known = _Replica.core.known if _Replica.core is not None else frozenset()
    asked = next((params["name"] for _, params in routes.lookup(path) if "name" in params), None)
    return asked if asked in known else _Replica.model or "unknown"


def _endpoint(route: routes.Route, core_of: Callable[[], Answers | None]) -> Callable[..., Any]:
    """A FastAPI endpoint for ``route``: the core's handler, with the path's parameters declared."""

    async def endpoint(request: Request, **params: str) -> Response:
        core = core_of()
        if core is None:
            raise ModelLoadError("this replica has not loaded its models yet; retry shortly")
        call = Call(route, params, request.headers, read_limited(request.receive, core.max_body_bytes))
        body, headers = await core.answer(call)
        return response(200, body, dict(headers))

    names = re.findall(r"\{(\w+)\}", route.path)
    endpoint.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)]
        + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=str) for name in names])
    endpoint.__name__ = f"{route.handler}_{route.method.lower()}"
    return endpoint


class _ModelName(StringConvertor):
    regex = routes.NAME_PATTERN


def register_routes(api: FastAPI, core_of: Callable[[], Answers | None]) -> None:
    """Every route of the table on ``api``, answered by ``core_of()``, described in its OpenAPI document."""
    register_url_convertor("model", _ModelName())
    for route in routes.ROUTES:
        api.add_api_route(route.fastapi_path, _endpoint(route, core_of), methods=[route.method],
                          summary=route.summary, response_class=Response, include_in_schema=False)


def _primary(answers: Answers | None) -> PredictionCore | None:
    return answers.primary() if isinstance(answers, ModelSet) else answers  # type: ignore[return-value]


def build_api(*, core: Callable[[], Answers | None], guard: Callable[[], KeyGuard],
              fast: Callable[[], Answers | None]) -> FastAPI:
    """The ASGI app of a replica (or of a test): the table's routes, the fast path, API keys, error handlers."""
    app = FastAPI(title="mlray model server",
                  description="Predictions from models in the MLflow registry: V1, Open Inference Protocol V2, "
                              "MLflow scoring.")
    install_error_handlers(app, protocol_of=routes.protocol_of)
    register_routes(app, core)
    openapi.install(app, core=lambda: _primary(core()), guard=guard)
    app.add_middleware(FastPredict, core=fast)  # innermost: after the key check
    app.add_middleware(AuthMiddleware, guard=guard)
    return app


api = build_api(core=lambda: _Replica.core, guard=lambda: _Replica.guard,
                fast=lambda: _Replica.core if _Replica.fast_path else None)
api.add_middleware(MetricsMiddleware)  # outermost: refused keys are counted too


class _FollowedModels:
    """The core's view of the replica's ``rollout.Follower``."""

    def __init__(self, follower: Follower) -> None:
        self.follower = follower

    @property
    def models(self) -> dict[str, ServedModel]:
        return self.follower.models

    @property
    def failures(self) -> dict[str, str]:
        return self.follower.failures

    def record_shadow(self, record: dict[str, Any]) -> None:
        self.follower.record_shadow(record)

    def record_call(self, role: str, version: int, seconds: float, *, ok: bool) -> None:
        self.follower.record_call(role, version, seconds, ok=ok)

    @property
    def challenger_weight(self) -> float | None:
        return self.follower.challenger_weight

    def traffic_report(self) -> dict[str, Any]:
        return self.follower.traffic_report()

    async def rollout_status(self) -> dict[str, Any]:
        return cast(dict[str, Any], await self.follower.watcher.status.remote())


@serve.deployment(name=DEPLOYMENT_NAME, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class ModelServer:
    async def __init__(self, settings: dict[str, Any], watcher: Any) -> None:  # type: ignore[misc]
        import ray
        import torch

        torch.set_num_threads(1)  # replicas share the node's cores; one intra-op thread each
        # head and body of each answer in one write: a replica killed mid-answer then sends nothing, which
        # HAProxy replays elsewhere, instead of a head the client already got (onewrite.py)
        logger.info("answers leave whole: %s", write_answers_whole())
        self.cfg = ServeAppConfig.model_validate(settings)
        auth = self.cfg.auth
        hashes = load_key_hashes(keys_env=auth.keys_env, keys_file=auth.keys_file) if auth.enabled else frozenset()
        _Replica.guard.configure(enabled=auth.enabled, hashes=hashes)
        _Replica.metrics = self.metrics = ServingMetrics()
        _Replica.model = self.cfg.model
        self.watcher = watcher
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()
        self.background: set[asyncio.Task[Any]] = set()
        if self.cfg.metrics_agent_nice is not None:
            agents = lower_metrics_agent_priority(self.cfg.metrics_agent_nice)
            logger.info("Ray's metrics agent(s) %s now at nice %d (metrics_agent_nice)", agents,
                        self.cfg.metrics_agent_nice)
        self.link: FleetLink | None = None
        if self.cfg.models:
            self.link = FleetLink(watcher, replica=self.replica, node=self.node, pid=os.getpid())
            # Serve's LRU of models, bounded per replica; it also tells Serve's routers who holds which model.
            async def load(model_id: str) -> Slot:
                return await self._open_slot(model_id)

            open_slot = serve.multiplexed(max_num_models_per_replica=self.cfg.max_models_per_replica)(load)
            self.models = ModelSet(self.cfg, open_slot=open_slot, held=lambda: multiplex.held(load),
                                   evict_first=lambda name: multiplex.evict_first(load, name))
        else:
            self.models = ModelSet(self.cfg, open_slot=self._open_slot)
        if self.link is not None:
            try:  # every model's targets before the pre-warm loads
                await self.link.beat(self.models)
            except Exception as err:  # noqa: BLE001 - the watcher may be starting; the followers ask the registry
                logger.warning("The app's watcher did not answer (%s); each model asks the registry", err)
        await self.models.start()  # loads and warms up; the replica is not healthy before this returns
        if self.link is not None:
            self._spawn(self._heartbeat(self.link))
        _Replica.fast_path = self.cfg.fast_path
        _Replica.core = self.models
        if self.cfg.lean_ingress:  # while Serve's access log is on, requests still take Serve's wrapper
            _Replica.lean_ingress = lean_direct_ingress(_serve_route)
        self.metrics.lean_ingress.set(1.0 if _Replica.lean_ingress else 0.0)
        if auth.enabled and auth.keys_file:
            self._spawn(self._follow_keys(KeyFileWatch(keys_env=auth.keys_env, keys_file=auth.keys_file)))

    def _spawn(self, work: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    async def _open_slot(self, name: str) -> Slot:
        """Load one model (its target version, warmed up) and start following its alias."""
        entry = next(entry for entry in self.cfg.entries if entry.name == name)
        cfg = self.cfg.for_model(entry)
        watcher = self.watcher if not self.cfg.models else LocalWatcher(cfg, resolve=resolve_targets, link=self.link,
                                                                        weigh=resolve_weight)
        follower = Follower(cfg, watcher, replica=self.replica, node=self.node, metrics=self.metrics)
        core = PredictionCore(cfg, _FollowedModels(follower), metrics=self.metrics)
        await follower.start()
        return Slot(core=core, task=self._spawn(follower.run()), loop=asyncio.get_running_loop())

    async def _heartbeat(self, link: FleetLink) -> None:
        """A many-models replica tells the app's watcher what it holds and learns every model's targets."""
        while True:
            await asyncio.sleep(self.cfg.follow.sync_interval_s)
            try:
                await link.beat(self.models)
            except Exception as err:  # noqa: BLE001 - keep serving what is held; try again next tick
                logger.warning("Heartbeat to the app's watcher failed: %s", err)

    async def _follow_keys(self, watch: KeyFileWatch) -> None:
        """Keys added to or revoked from ``auth.keys_file`` take effect within a heartbeat."""
        while True:
            await asyncio.sleep(self.cfg.follow.sync_interval_s)
            hashes = watch.changed()
            if hashes is not None:
                _Replica.guard.configure(enabled=True, hashes=hashes)

    def check_health(self) -> None:
        """Serve's health probe: a replica whose champion cannot answer is restarted."""
        self.models.check_health()


def deployment_options(cfg: ServeAppConfig) -> dict[str, Any]:
    """Serve-level options from the app's settings: limits from its admission settings, and the access log.

    More requests may reach a replica than it runs or queues, so that the excess is refused by the
    replica (JSON, Retry-After) instead of waiting in Serve's router; Serve's own queue limit stays as a
    last bound behind it.
    """
    adm = cfg.admission
    reach = adm.max_ongoing_requests + adm.max_queued_requests + max(16, adm.max_ongoing_requests)
    return {"max_ongoing_requests": reach, "max_queued_requests": 4 * reach,
            "logging_config": {"enable_access_log": cfg.access_log}}


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run``/``serve deploy`` (``import_path: serve_apps.digits:app``).

    Serve calls a builder with exactly one argument, the YAML's ``args``; deployment overrides come from the
    YAML's ``deployments`` section, which Serve applies itself.
    """
    return application(args)


def application(args: dict[str, Any], *, deployment_options_override: dict[str, Any] | None = None
                ) -> serve.Application:
    """The app for ``args`` (:class:`ServeAppConfig` fields), checked here so that a bad YAML fails the deploy
    with the field's name instead of failing every replica."""
    cfg = selection.expand(ServeAppConfig.model_validate(args))  # models a tag or pattern selects, by name
    settings = cfg.model_dump(mode="json")
    # @serve.deployment replaced the classes with Deployments; Ray's typing of the decorator does not say so.
    # one model: RegistryWatcher; many: ModelsWatcher, every model's targets and every replica's heartbeat
    watcher = cast(serve.Deployment, ModelsWatcher if cfg.models else RegistryWatcher).bind(settings)
    ours, theirs = deployment_options(cfg), deployment_options_override or {}
    # a logging_config given beside the app (log level, say) keeps the access-log choice unless it makes one
    options = {**ours, **theirs, "logging_config": {**ours["logging_config"], **(theirs.get("logging_config") or {})}}
    return cast(serve.Deployment, ModelServer).options(**options).bind(settings, watcher)

