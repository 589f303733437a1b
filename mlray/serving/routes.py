"""Every route of the serving app, declared once.

A :class:`Route` says its method and path, the protocol its errors are rendered in, the method of
:class:`~mlray.serving.core.PredictionCore` that answers it, whether it needs an API key, and, for a
prediction route, the protocol that parses its body and writes its answer. Derived from this table:

- FastAPI's routes and their OpenAPI description (``app.register_routes``, ``openapi.document``);
- the fast path's routes (``fastpath.FastPredict``: every route with ``fast=True``);
- auth's public paths (``auth.is_public``);
- the protocol a path's errors and metrics are counted under (:func:`protocol_of`);
- the HAProxy rule that marks prediction requests (:data:`PREDICTION_PATH_ENDS`).

Adding a route is one entry here and, if it needs one, a handler method on the core.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType

from mlray.serving import protocols
from mlray.serving.protocols import Protocol


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # a FastAPI path template; "{name}" is the model's name
    kind: str  # the protocol its errors and metrics belong to: "v1", "v2", "mlflow" or "other"
    handler: str  # the PredictionCore method: ``await handler(call)`` -> (body, headers)
    summary: str
    public: bool = False  # answered without an API key
    predict: Protocol | None = None  # a prediction route: how its body is parsed and answered
    fast: bool = False  # answered ahead of FastAPI's router (fastpath)
    errors: tuple[int, ...] = ()  # the error statuses it answers besides 401/403 (documented in OpenAPI)
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = "".join(f"(?P<{part[1:-1]}>{NAME_PATTERN})" if part.startswith("{") else re.escape(part)
                        for part in re.split(r"(\{\w+\})", self.path))
        object.__setattr__(self, "pattern", re.compile(f"^{regex}$"))

    @property
    def fastapi_path(self) -> str:
        """The path as FastAPI matches it: the name through the "model" convertor (:data:`NAME_PATTERN`)."""
        return re.sub(r"\{(\w+)\}", r"{\1:model}", self.path)


# A model name in a path: anything but "/" and ":", so that GET /v1/models/NAME:predict is the predict route
# with the wrong method (405), not the metadata of a model called "NAME:predict".
NAME_PATTERN = "[^/:]+"


_ERRORS = {"v1": (400, 404, 413, 422, 503, 504), "v2": (400, 404, 413, 503, 504), "mlflow": (400, 413, 415, 503, 504)}

ROUTES: tuple[Route, ...] = (
    # V1 (KServe V1 / TF-Serving)
    Route("POST", "/v1/models/{name}:predict", "v1", "predict", "Predict (V1): probabilities and labels",
          predict=protocols.V1, fast=True, errors=_ERRORS["v1"]),
    Route("GET", "/v1/models/{name}", "v1", "metadata_v1", "Model metadata: version, alias, features, classes",
          errors=(404,)),
    Route("GET", "/v1/models/{name}/status", "v1", "rollout_status",
          "Rollout state: targets, every replica's versions, shadow summary", errors=(404,)),
    # Open Inference Protocol v2
    Route("POST", "/v2/models/{name}/infer", "v2", "predict", "Inference (Open Inference Protocol v2)",
          predict=protocols.V2, fast=True, errors=_ERRORS["v2"]),
    Route("GET", "/v2", "v2", "server_metadata_v2", "Server metadata (OIP v2)"),
    Route("GET", "/v2/health/live", "v2", "live_v2", "Server live (OIP v2)", public=True),
    Route("GET", "/v2/health/ready", "v2", "ready_v2", "Server ready (OIP v2)", public=True),
    Route("GET", "/v2/models/{name}", "v2", "model_metadata_v2", "Model metadata (OIP v2)", errors=(404,)),
    Route("GET", "/v2/models/{name}/ready", "v2", "model_ready_v2", "Model ready (OIP v2)", public=True,
          errors=(404,)),
    # MLflow's scoring protocol
    Route("POST", "/invocations", "mlflow", "predict", "Predict (MLflow scoring protocol: JSON, CSV, Parquet)",
          predict=protocols.MLFLOW, fast=True, errors=_ERRORS["mlflow"]),
    Route("GET", "/ping", "mlflow", "ok", "Health (MLflow)", public=True),
    Route("GET", "/health", "mlflow", "ok", "Health (MLflow)", public=True),
    Route("GET", "/healthz", "other", "ok", "Health", public=True),
)
# FastAPI's own documentation routes: open, so that clients can find out what to send.
DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/openapi.json")

PREDICTION_PATH_ENDS: tuple[str, ...] = tuple(dict.fromkeys(
    re.split(r"\{\w+\}", route.path)[-1] for route in ROUTES if route.predict is not None))
"""How each prediction path ends (":predict", "/infer", "/invocations"): for rules that match on path ends,
as HAProxy's ``path_end``."""


@lru_cache(maxsize=4096)
def lookup(path: str) -> tuple[tuple[Route, Mapping[str, str]], ...]:
    """Every route whose path matches ``path`` (any method), with its path parameters (read-only).

    Cached: a replica sees the same few paths over and over, and each request asked up to three times (fast
    path, metrics, errors), each a regex per route. Bounded, so that clients inventing paths cost nothing.
    """
    found = []
    for route in ROUTES:
        matched = route.pattern.match(path)
        if matched:
            found.append((route, MappingProxyType(matched.groupdict())))
    return tuple(found)


def match(method: str, path: str) -> tuple[Route, Mapping[str, str]] | None:
    for route, params in lookup(path):
        if route.method == method:
            return route, params
    return None


def protocol_of(path: str) -> str:
    """The protocol a path's errors are written in: its route's, or by its prefix for a path with no route
    (a 404 under /v2/ is still an OIP answer)."""
    found = lookup(path)
    if found:
        return found[0][0].kind
    if path.startswith("/v1/"):
        return "v1"
    if path.startswith("/v2/") or path == "/v2":
        return "v2"
    return "other"


def is_public(path: str) -> bool:
    """A path answered without an API key: a documentation path, or one with a public route."""
    return path in DOC_PATHS or any(route.public for route, _ in lookup(path))
