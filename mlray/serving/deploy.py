"""Deploying the Serve app from Python (``mlray serve``, the quickstart) with the same YAML as ``serve deploy``.

The YAML is Serve's own config file (``serve_apps/*.yaml``): its ``http_options``, the application's
``args`` and its ``deployments`` overrides (autoscaling, actor options) are applied here exactly as
``serve deploy`` applies them, so both paths serve the same thing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlray.errors import ConfigError, MlrayError, NotFound
from mlray.serving.app import DEPLOYMENT_NAME
from mlray.serving.config import ServeAppConfig

logger = logging.getLogger(__name__)



def default_yaml() -> Path:
    """The digits app's Serve YAML, package data of mlray (``serve_apps/digits.yaml`` is a link to it, for
    ``serve deploy``)."""
    return Path(__file__).with_name("digits.yaml")


@dataclass(frozen=True)
class ServePlan:
    app_name: str
    route_prefix: str
    host: str
    port: int
    args: dict[str, Any]
    deployment_options: dict[str, Any]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.route_prefix.rstrip('/')}"


def load_plan(path: str | Path | None = None, *, overrides: dict[str, Any] | None = None,
              host: str | None = None, port: int | None = None) -> ServePlan:
    """Read a Serve YAML (first application) and apply CLI overrides to its ``args``."""
    file = Path(path) if path else default_yaml()
    try:
        raw = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read serve config {str(file)!r}: {err}") from None
    apps = (raw or {}).get("applications") or []
    if not apps:
        raise ConfigError(f"serve config {str(file)!r} has no 'applications'")
    app = apps[0]
    args = {**(app.get("args") or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    try:
        ServeAppConfig.model_validate(args)
    except ValueError as err:
        raise ConfigError(f"serve config {str(file)!r}, applications[0].args: {err}") from None
    options: dict[str, Any] = {}
    for deployment in app.get("deployments") or []:
        if deployment.get("name") == DEPLOYMENT_NAME:
            options = {k: v for k, v in deployment.items() if k != "name"}
    http = (raw or {}).get("http_options") or {}
    return ServePlan(app_name=app.get("name", "default"), route_prefix=app.get("route_prefix", "/"),
                     host=host or http.get("host", "127.0.0.1"), port=int(port or http.get("port", 8000)),
                     args=args, deployment_options=options)


def deploy(plan: ServePlan, *, timeout_s: float = 180.0) -> str:
    """Run the app on the connected Ray cluster and wait until it answers; returns its base URL."""
    import requests
    from ray import serve

    from mlray.serving.app import application

    serve.start(http_options={"host": plan.host, "port": plan.port}, proxy_location="HeadOnly")
    serve.run(application(plan.args, deployment_options_override=plan.deployment_options), name=plan.app_name,
              route_prefix=plan.route_prefix)
    model = plan.args.get("model")
    ready = f"{plan.url}/v2/models/{model}/ready" if model else f"{plan.url}/v2/health/ready"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            answer = requests.get(ready, timeout=5)
            if answer.status_code == 200 and answer.json().get("ready") is True:
                return plan.url
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise MlrayError(f"the Serve app {plan.app_name!r} did not answer at {plan.url} within {timeout_s:.0f} s")
        time.sleep(0.5)


class _SyncCaller:
    """Calls a deployment handle from synchronous code (the CLI, a job) on one event loop of mlray's own.

    With ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` in the environment - as in every job driver on a head mlray
    started - a handle's router runs in the event loop of whoever first calls it, and a caller without one
    is refused. Ray 2.60 has no public option to choose Serve's router thread instead, so every call here
    runs on this one long-lived loop, where the handle's router then lives (public API only).
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="mlray-serve-handles", daemon=True).start()
            return self._loop

    def call(self, app: str, method: str, *args: Any, timeout_s: float) -> Any:
        handle = _watcher(app)

        async def remote() -> Any:
            return await getattr(handle, method).remote(*args)

        future = asyncio.run_coroutine_threadsafe(remote(), self._running_loop())
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise MlrayError(f"the Serve app {app!r} did not answer {method} within {timeout_s:.0f} s") from None


_calls = _SyncCaller()


def _watcher(app: str) -> Any:
    from ray import serve

    from mlray.serving.rollout import WATCHER_NAME

    try:
        return serve.get_deployment_handle(WATCHER_NAME, app_name=app)
    except Exception as err:  # noqa: BLE001 - Serve raises several kinds for "no such app"
        raise NotFound(f"no mlray Serve app named {app!r} on this cluster ({err})") from None


def rollout(app: str, *, timeout_s: float = 120.0, model: str | None = None) -> dict[str, Any]:
    """Make the app ask the registry now and wait until every replica has moved (or failed to).

    A many-models app rolls out ``model`` only (the replicas holding it) and answers that model's status;
    a name it does not serve is :class:`NotFound`, with the names it serves.
    """
    status = app_status(app)
    if "models" not in status:
        return dict(_calls.call(app, "check_now", timeout_s, timeout_s=timeout_s + 30))
    if model not in status["models"]:
        raise NotFound(f"model {model!r} is not served by the Serve app {app!r}; it serves "
                       f"{sorted(status['models'])}")
    return dict(_calls.call(app, "check_now", timeout_s, model, timeout_s=timeout_s + 30))


def shadow_records(app: str, limit: int = 100) -> list[dict[str, Any]]:
    """The last ``limit`` shadow comparisons the app's watcher holds (champion vs challenger answers)."""
    return list(_calls.call(app, "shadow_records", limit, timeout_s=30))


def app_status(app: str) -> dict[str, Any]:
    """What the app serves: the registry's targets, each replica's versions and load failures (a many-models
    app: the same per model under ``models``, with whether each replica holds it)."""
    return dict(_calls.call(app, "status", timeout_s=30))


def traffic(app: str, model: str | None = None) -> dict[str, Any]:
    """Per ``role:vN`` request, error and latency counts of the app (``RegistryWatcher.traffic``); a many-models
    app's of ``model`` (``ModelsWatcher.traffic``)."""
    return dict(_calls.call(app, "traffic", model, timeout_s=30))


def shutdown() -> None:
    from ray import serve

    serve.shutdown()
