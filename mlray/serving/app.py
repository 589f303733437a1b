"""The Ray Serve application: a FastAPI ingress over the registry's champion (and challenger).

Routes (at the application's route prefix, ``/`` by default; all but the public ones need an API key
when ``auth.enabled``):

- V1 (KServe V1 / TF-Serving shape): ``GET /v1/models/{name}``, ``POST /v1/models/{name}:predict``,
  ``GET /v1/models/{name}/status`` (rollout state, shadow summary)
- Open Inference Protocol V2: ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}``,
  ``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``
- MLflow scoring: ``POST /invocations``, ``GET /ping``, ``/health``
- ``GET /healthz``, OpenAPI at ``/docs``

Each replica loads its versions once, warms them up, then follows the registry (``rollout.Follower``).
"""

import asyncio
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from mlray.errors import InvalidInput, NotFound
from mlray.serve_env import lower_metrics_agent_priority
from mlray.serving import outputs, protocols
from mlray.serving.admission import Admission
from mlray.serving.auth import AuthMiddleware, KeyFileWatch, KeyGuard, load_key_hashes
from mlray.serving.batching import MicroBatcher
from mlray.serving.config import ServeAppConfig
from mlray.serving.fastpath import Answer, FastPredict
from mlray.serving.http import error_body, install_error_handlers, route_path
from mlray.serving.loader import ServedModel
from mlray.serving.metrics import ServingMetrics
from mlray.serving.rollout import Follower, RegistryWatcher
from mlray.serving.validation import parse_json, parse_v1

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "ModelServer"


class _Replica:
    """What the module-level middlewares need from the one ModelServer in this process."""

    guard = KeyGuard()
    metrics: ServingMetrics | None = None
    model = ""
    server: "ModelServer | None" = None  # set once the replica has loaded its models, if fast_path is on


def _protocol(path: str) -> str:
    if path.startswith("/v1/"):
        return "v1"
    if path.startswith("/v2/"):
        return "v2"
    return "mlflow" if path == "/invocations" else "other"


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
                    if name == b"x-model-version":
                        seen["version"] = value.decode()
                    elif name == b"x-model-role":
                        seen["role"] = value.decode()
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            protocol = _protocol(route_path(scope))
            if protocol != "other":
                model = _Replica.model
                metrics.count_request(model, seen["version"], seen["role"], protocol, seen["status"])
                metrics.latency.observe(time.perf_counter() - started,
                                        tags={"model": model, "version": seen["version"], "protocol": protocol})


api = FastAPI(title="mlray model server",
              description="Predictions from models in the MLflow registry: V1, Open Inference Protocol V2, MLflow.")
install_error_handlers(api)
def _guard() -> KeyGuard:
    return _Replica.guard


def _auth_error(path: str, status: int, message: str) -> tuple[dict[str, Any], dict[str, str]]:
    return error_body(path, status, message)


api.add_middleware(FastPredict, server=lambda: _Replica.server)  # innermost: after the key check
api.add_middleware(AuthMiddleware, guard=_guard, error_body=_auth_error)
api.add_middleware(MetricsMiddleware)  # outermost: refused keys are counted too


def _bucket(key: str) -> float:
    """A stable draw in [0, 1) for a request key: the same key always lands on the same side."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64


@serve.deployment(name=DEPLOYMENT_NAME, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class ModelServer:
    async def __init__(self, settings: dict[str, Any], watcher: Any) -> None:  # type: ignore[misc]
        import ray
        import torch

        torch.set_num_threads(1)  # replicas share the node's cores; one intra-op thread each
        self.cfg = ServeAppConfig.model_validate(settings)
        auth = self.cfg.auth
        hashes = load_key_hashes(keys_env=auth.keys_env, keys_file=auth.keys_file) if auth.enabled else frozenset()
        _Replica.guard.configure(enabled=auth.enabled, hashes=hashes)
        _Replica.metrics = self.metrics = ServingMetrics()
        _Replica.model = self.cfg.model
        adm = self.cfg.admission
        self.max_body_bytes = self.cfg.max_body_bytes
        self.admission = Admission(max_ongoing=adm.max_ongoing_requests, max_queued=adm.max_queued_requests,
                                   timeout_s=adm.timeout_s, retry_after_s=adm.retry_after_s)
        context = serve.get_replica_context()
        self.follower = Follower(self.cfg, watcher, replica=context.replica_id.unique_id,
                                 node=ray.get_runtime_context().get_node_id(), metrics=self.metrics)
        self._batcher = MicroBatcher(self._predict_batch, max_batch_size=self.cfg.batching.max_batch_size,
                                     wait_s=self.cfg.batching.batch_wait_timeout_s)
        if self.cfg.metrics_agent_nice is not None:
            agents = lower_metrics_agent_priority(self.cfg.metrics_agent_nice)
            logger.info("Ray's metrics agent(s) %s now at nice %d (metrics_agent_nice)", agents,
                        self.cfg.metrics_agent_nice)
        await self.follower.start()  # loads and warms up; the replica is not healthy before this returns
        self._background: set[asyncio.Task[Any]] = set()
        self._spawn(self.follower.run())
        if self.cfg.fast_path:
            _Replica.server = self
        if auth.enabled and auth.keys_file:
            self._spawn(self._follow_keys(KeyFileWatch(keys_env=auth.keys_env, keys_file=auth.keys_file)))

    async def _follow_keys(self, watch: KeyFileWatch) -> None:
        """Keys added to or revoked from ``auth.keys_file`` take effect within a heartbeat."""
        while True:
            await asyncio.sleep(self.cfg.follow.sync_interval_s)
            hashes = watch.changed()
            if hashes is not None:
                _Replica.guard.configure(enabled=True, hashes=hashes)

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the prediction path, shared by every protocol -------------------------------------------------------

    def _check_name(self, name: str) -> None:
        if name != self.cfg.model:
            raise NotFound(f"model {name!r} is not served here; this app serves {self.cfg.model!r}")

    def _choose(self, headers: Any) -> str:
        challenger = self.cfg.challenger
        if challenger is None or challenger.mode != "split" or "challenger" not in self.follower.models:
            return "champion"
        key = headers.get(challenger.sticky_header.lower())
        draw = _bucket(key) if key else random.random()
        return "challenger" if draw < challenger.weight else "champion"

    def _predict_batch(self, calls: list[tuple[ServedModel, np.ndarray]]) -> list[np.ndarray]:
        # Requests that arrived together, perhaps for different versions: one model call per version.
        out: list[np.ndarray | None] = [None] * len(calls)
        groups: dict[int, list[int]] = {}
        for i, (served, _) in enumerate(calls):
            groups.setdefault(id(served), []).append(i)
        for indices in groups.values():
            served = calls[indices[0]][0]
            arrays = [calls[i][1] for i in indices]
            probabilities = served.loaded.predict_proba(np.concatenate(arrays))  # (sum N, K)
            self.metrics.batch_size.observe(len(probabilities), tags={"model": self.cfg.model,
                                                                      "version": str(served.info.version)})
            for i, part in zip(indices, np.split(probabilities, np.cumsum([len(a) for a in arrays])[:-1]),
                               strict=True):
                out[i] = part
        return cast(list[np.ndarray], out)

    async def _run_model(self, served: ServedModel, x: np.ndarray) -> np.ndarray:
        batching = self.cfg.batching
        if batching.enabled and len(x) < batching.max_batch_size:
            return await self._batcher.submit((served, x))
        self.metrics.batch_size.observe(len(x), tags={"model": self.cfg.model, "version": str(served.info.version)})
        return served.loaded.predict_proba(x)  # a request this large is a batch already

    async def _answer(self, headers: Any, read_body: Callable[[], Awaitable[bytes]], parse: Callable[[Any, int], Any]
                      ) -> tuple[Any, np.ndarray, ServedModel, dict[str, str]]:
        """Admission first (a refused request costs no reading or parsing), then the body checked by
        ``parse(payload, num_features)``, the champion/challenger choice, the model call and the shadow copy.

        ``headers`` maps lower-case names to values; ``parse`` returns the (N, F) array, or an object with it
        as ``.x``; that is returned too.
        """
        async with self.admission.admit() as left_s:
            payload = parse_json(await read_body(), max_bytes=self.cfg.max_body_bytes)
            parsed = parse(payload, self._champion.loaded.num_features)
            x = parsed if isinstance(parsed, np.ndarray) else parsed.x
            role = self._choose(headers)
            served = self.follower.models[role]
            probabilities = await self.admission.run(self._run_model(served, x), left_s=left_s)
        if not np.isfinite(probabilities).all():
            # JSON has no NaN. Every version passed a finite warm-up, so it is this input: values near float32's
            # limit overflow the network. A 4xx naming the rows, not a bare 500.
            rows = np.flatnonzero(~np.isfinite(probabilities).all(axis=1))
            raise InvalidInput(f"version {served.info.version} gives no finite probabilities for row(s) "
                               f"{rows[:10].tolist()} of this request: their values (largest |x| = "
                               f"{float(np.abs(x[rows]).max()):.3g}) overflow the model")
        challenger = self.cfg.challenger
        if challenger is not None and challenger.mode == "shadow" and "challenger" in self.follower.models:
            if len(self._background) < self.admission.max_ongoing:  # shadows never pile up behind clients
                self._spawn(self._shadow(x, served, probabilities))
        info = served.info
        headers = {"x-model-name": info.name, "x-model-version": str(info.version), "x-model-run-id": info.run_id,
                   "x-model-role": role, "x-request-id": headers.get("x-request-id") or uuid.uuid4().hex}
        return parsed, probabilities, served, headers

    async def _shadow(self, x: np.ndarray, champion: ServedModel, answered: np.ndarray) -> None:
        challenger = self.follower.models.get("challenger")
        if challenger is None:
            return
        try:
            shadow = await self._run_model(challenger, x)
        except Exception as err:  # noqa: BLE001 - a failing shadow never affects clients; it is counted
            logger.warning("Shadow prediction by version %s failed: %s", challenger.info.version, err)
            return
        agree = bool((shadow.argmax(1) == answered.argmax(1)).all())
        self.follower.record_shadow({
            "time": time.time(), "rows": len(x), "champion_version": champion.info.version,
            "challenger_version": challenger.info.version, "agree": agree,
            "champion_labels": answered.argmax(1).tolist()[:16], "challenger_labels": shadow.argmax(1).tolist()[:16],
            "max_abs_diff": float(np.abs(shadow - answered).max()),
        })
        self.metrics.shadow.inc(tags={"model": self.cfg.model, "version": str(challenger.info.version),
                                      "agree": str(agree).lower()})

    @property
    def _champion(self) -> ServedModel:
        return self.follower.models["champion"]

    # -- the three prediction routes: called by FastAPI's routes below and by fastpath.FastPredict --------

    async def predict_v1(self, name: str, headers: Any, read_body: Callable[[], Awaitable[bytes]]) -> Answer:
        self._check_name(name)
        max_rows = self.cfg.max_rows
        _, probabilities, served, out = await self._answer(
            headers, read_body, lambda payload, features: parse_v1(payload, num_features=features, max_rows=max_rows))
        return {**outputs.v1_fields(probabilities, served.loaded),
                "model_name": served.info.name, "model_version": served.info.version}, out

    async def predict_v2(self, name: str, headers: Any, read_body: Callable[[], Awaitable[bytes]]) -> Answer:
        self._check_name(name)
        max_rows = self.cfg.max_rows
        parsed, probabilities, served, out = await self._answer(
            headers, read_body, lambda payload, features: protocols.parse_v2_infer(payload, num_features=features,
                                                                                   max_rows=max_rows))
        return outputs.v2_response(probabilities, served.loaded, model_name=name,
                                   model_version=str(served.info.version), request_id=parsed.id,
                                   requested=parsed.outputs), out

    async def predict_mlflow(self, headers: Any, read_body: Callable[[], Awaitable[bytes]]) -> Answer:
        names, max_rows = self._champion.loaded.feature_names, self.cfg.max_rows
        _, probabilities, served, out = await self._answer(
            headers, read_body,
            lambda payload, _: protocols.parse_invocations(payload, feature_names=names, max_rows=max_rows))
        return outputs.invocations(probabilities, served.loaded), out

    # -- V1 --------------------------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models/{name}")
    async def metadata(self, name: str) -> JSONResponse:
        self._check_name(name)
        served = self._champion
        info, loaded = served.info, served.loaded
        body = {
            "name": info.name, "ready": True, "version": info.version, "alias": served.alias,
            "run_id": info.run_id, "metrics": info.metrics,
            "inputs": {"num_features": loaded.num_features, "feature_names": loaded.feature_names, "dtype": "float32"},
            "classes": loaded.class_names, "task": loaded.task, "device": str(loaded.device),
            "load_seconds": round(served.load_seconds, 3),
            "versions": {role: m.info.version for role, m in self.follower.models.items()},
            "failures": self.follower.failures,
        }
        return JSONResponse(body, headers={"x-model-name": info.name, "x-model-version": str(info.version),
                                           "x-model-run-id": info.run_id, "x-model-role": "champion"})

    @api.get("/v1/models/{name}/status")
    async def rollout_status(self, name: str) -> JSONResponse:
        """The watcher's view: targets, every replica's versions and load failures, shadow summary."""
        self._check_name(name)
        return JSONResponse(await self.follower.watcher.status.remote())

    @api.post("/v1/models/{name}:predict")
    async def predict(self, name: str, request: Request) -> JSONResponse:
        body, headers = await self.predict_v1(name, request.headers, request.body)
        return JSONResponse(body, headers=headers)

    # -- Open Inference Protocol V2 ------------------------------------------------------------------------

    @api.get("/v2/health/live")
    async def v2_live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def v2_ready(self) -> dict[str, bool]:
        return {"ready": "champion" in self.follower.models}

    @api.get("/v2/models/{name}")
    async def v2_metadata(self, name: str) -> JSONResponse:
        self._check_name(name)
        served = self._champion
        return JSONResponse(outputs.v2_metadata(served.loaded, name=name, version=str(served.info.version)))

    @api.get("/v2/models/{name}/ready")
    async def v2_model_ready(self, name: str) -> dict[str, Any]:
        self._check_name(name)
        return {"name": name, "ready": "champion" in self.follower.models}

    @api.post("/v2/models/{name}/infer")
    async def v2_infer(self, name: str, request: Request) -> JSONResponse:
        body, headers = await self.predict_v2(name, request.headers, request.body)
        return JSONResponse(body, headers=headers)

    # -- MLflow scoring protocol ---------------------------------------------------------------------------

    @api.get("/ping")
    async def ping(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/invocations")
    async def invocations(self, request: Request) -> JSONResponse:
        body, headers = await self.predict_mlflow(request.headers, request.body)
        return JSONResponse(body, headers=headers)

    def check_health(self) -> None:
        """Serve's health probe: a replica whose champion cannot answer is restarted."""
        loaded = self._champion.loaded
        loaded.predict_proba(np.zeros((1, loaded.num_features), dtype=np.float32))


def deployment_options(cfg: ServeAppConfig) -> dict[str, Any]:
    """Serve-level limits derived from the app's admission settings.

    More requests may reach a replica than it runs or queues, so that the excess is refused by the
    replica (JSON, Retry-After) instead of waiting in Serve's router; Serve's own queue limit stays as a
    last bound behind it.
    """
    adm = cfg.admission
    reach = adm.max_ongoing_requests + adm.max_queued_requests + max(16, adm.max_ongoing_requests)
    return {"max_ongoing_requests": reach, "max_queued_requests": 4 * reach}


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
    cfg = ServeAppConfig.model_validate(args)
    settings = cfg.model_dump(mode="json")
    # @serve.deployment replaced the classes with Deployments; Ray's typing of the decorator does not say so.
    watcher = cast(serve.Deployment, RegistryWatcher).bind(settings)
    options = {**deployment_options(cfg), **(deployment_options_override or {})}
    return cast(serve.Deployment, ModelServer).options(**options).bind(settings, watcher)

