"""The plain baseline: one FastAPI + uvicorn process with an async handler, the server users write first.

It loads the same registered version the Serve app loads (``mlray.serving.loader.load_registered``), answers
the same V1 route with the same response body, and pins torch to one intra-op thread as mlray's replicas do.

    BENCH_MODEL=digits BENCH_VERSION=1 uvicorn --factory bench._serve.plain_app:create_app --port 8001
"""

from __future__ import annotations

import json
import os

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def create_app() -> FastAPI:
    import torch

    from mlray.serving.loader import load_registered

    torch.set_num_threads(1)
    served = load_registered(os.environ["BENCH_MODEL"], version=int(os.environ["BENCH_VERSION"]))
    model, info = served.loaded, served.info
    classes = model.class_names
    app = FastAPI()

    @app.post("/v1/models/{name}:predict")
    async def predict(name: str, request: Request) -> JSONResponse:
        x = np.asarray(json.loads(await request.body())["instances"], dtype=np.float32)  # (N, F)
        probabilities = model.predict_proba(x)  # (N, K)
        return JSONResponse({
            "predictions": probabilities.tolist(),
            "labels": [classes[i] for i in probabilities.argmax(axis=1)],
            "model_name": info.name, "model_version": info.version,
        })

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
