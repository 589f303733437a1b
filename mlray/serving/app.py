"""The Ray Serve application: a FastAPI ingress over one registered model version.

Routes (at the application's route prefix, ``/`` by default):

- ``GET  /v1/models/{name}``          readiness and metadata (name, version, alias, run id, metrics)
- ``POST /v1/models/{name}:predict``  ``{"instances": [[F numbers], ...]}`` -> class probabilities
- ``GET  /healthz``                   liveness

The model is loaded once per replica, at start, and answers a warm-up batch before the replica is
reported healthy.
"""


import logging
from typing import Any, cast

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from mlray.errors import NotFound
from mlray.serving.config import ServeAppConfig
from mlray.serving.http import install_error_handlers
from mlray.serving.validation import parse_json, parse_v1

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "ModelServer"

api = FastAPI(title="mlray model server", description="Predictions from a model in the MLflow registry.")
install_error_handlers(api)


@serve.deployment(name=DEPLOYMENT_NAME, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class ModelServer:
    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        from mlray.serving.loader import load_registered

        torch.set_num_threads(1)  # replicas share the node's cores; one intra-op thread each
        self.cfg = ServeAppConfig.model_validate(settings)
        self.served = load_registered(self.cfg.model, alias=self.cfg.alias, version=self.cfg.version,
                                      tracking_uri=self.cfg.tracking_uri)
        self.loaded = self.served.loaded
        # Ray's @serve.batch is typed as returning the plain coroutine function; the wrapper it returns has these.
        self._predict_batch.set_max_batch_size(self.cfg.batching.max_batch_size)  # type: ignore[attr-defined]
        self._predict_batch.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
            self.cfg.batching.batch_wait_timeout_s
        )
        warm = self.loaded.predict_proba(np.zeros((2, self.loaded.num_features), dtype=np.float32))
        if warm.shape != (2, len(self.loaded.class_names)):
            raise RuntimeError(f"warm-up answered shape {warm.shape}")

    def _headers(self) -> dict[str, str]:
        info = self.served.info
        return {"x-model-name": info.name, "x-model-version": str(info.version), "x-model-run-id": info.run_id}

    def _check_name(self, name: str) -> None:
        if name != self.cfg.model:
            raise NotFound(f"model {name!r} is not served here; this app serves {self.cfg.model!r}")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _predict_batch(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(a) for a in arrays]
        probabilities = self.loaded.predict_proba(np.concatenate(arrays))  # (sum N, K)
        return np.split(probabilities, np.cumsum(sizes)[:-1])

    async def predict_array(self, x: np.ndarray) -> np.ndarray:
        batching = self.cfg.batching
        if batching.enabled and len(x) < batching.max_batch_size:
            return await self._predict_batch(x)
        return self.loaded.predict_proba(x)  # a request this large is a batch already

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models/{name}")
    async def metadata(self, name: str) -> JSONResponse:
        self._check_name(name)
        info = self.served.info
        body = {
            "name": info.name, "ready": True, "version": info.version, "alias": self.served.alias,
            "run_id": info.run_id, "metrics": info.metrics,
            "inputs": {"num_features": self.loaded.num_features, "feature_names": self.loaded.feature_names,
                       "dtype": "float32"},
            "classes": self.loaded.class_names, "load_seconds": round(self.served.load_seconds, 3),
        }
        return JSONResponse(body, headers=self._headers())

    @api.post("/v1/models/{name}:predict")
    async def predict(self, name: str, request: Request) -> JSONResponse:
        self._check_name(name)
        payload = parse_json(await request.body(), max_bytes=self.cfg.max_body_bytes)
        x = parse_v1(payload, num_features=self.loaded.num_features, max_rows=self.cfg.max_rows)
        probabilities = await self.predict_array(x)
        classes = self.loaded.class_names
        body = {
            "predictions": probabilities.tolist(),
            "labels": [classes[i] for i in probabilities.argmax(axis=1)],
            "model_name": self.served.info.name, "model_version": self.served.info.version,
        }
        return JSONResponse(body, headers=self._headers())

    def check_health(self) -> None:
        """Serve's health probe: a replica whose model cannot answer is restarted."""
        self.loaded.predict_proba(np.zeros((1, self.loaded.num_features), dtype=np.float32))


def build_app(args: dict[str, Any], *, deployment_options: dict[str, Any] | None = None) -> serve.Application:
    """Application builder for ``serve run``/``serve deploy`` (``import_path: serve_apps.digits:app``).

    ``args`` are :class:`ServeAppConfig` fields; they are checked here, so a bad YAML fails the deploy
    with the field's name instead of failing every replica.
    """
    cfg = ServeAppConfig.model_validate(args)
    # @serve.deployment replaced the class with a Deployment; Ray's typing of the decorator does not say so.
    server = cast(serve.Deployment, ModelServer)
    deployment = server.options(**deployment_options) if deployment_options else server
    return deployment.bind(cfg.model_dump(mode="json"))
