"""The OpenAPI document of the serving app, derived from the route table and the model being served.

Every route of :data:`mlray.serving.routes.ROUTES` is described with its request body (for the prediction
routes: rows of exactly the model's number of features, at most ``max_rows`` of them, float32 numbers), its
answer and every error status it really gives in its protocol's error shape. With API keys on, the bearer
scheme is declared and every protected route lists it, with 401 and 403.

Where JSON Schema cannot say what the server checks, the document describes a part of what it accepts and
says so: an OIP v2 tensor's ``data`` must hold ``shape[0] * shape[1]`` values, which a schema cannot relate,
so the document shows one-row tensors; MLflow's ``inputs`` as columns and Parquet bodies are described in
words only. The binary data extension (``Inference-Header-Content-Length``) is described in words too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

import mlray
from mlray.serving import oip, routes
from mlray.serving.routes import Route

FLOAT32_MAX = 3.4028234663852886e38
CSV_ROWS = 4
_NUMBER = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
_STRING = {"type": "string"}
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": _STRING}}
_MLFLOW_ERROR = {"type": "object", "required": ["error_code", "message"],
                 "properties": {"error_code": _STRING, "message": _STRING}}
_STATUS_TEXT = {400: "The body is not valid for this model (the message names the field)",
                401: "No API key", 403: "The API key is not valid", 404: "No such model or route",
                405: "Method not allowed", 413: "More rows or bytes than the limit",
                415: "A content type or charset this route does not read",
                422: "The body does not fit the model's signature (the message names the field)",
                503: "At capacity or not loaded yet: retry after Retry-After seconds",
                504: "The request waited or ran past its deadline"}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}


def operation_id(route: Route) -> str:
    return f"{route.handler}_{route.kind}_{route.method.lower()}"


def _rows(num_features: int | None, max_rows: int) -> dict[str, Any]:
    row: dict[str, Any] = {"type": "array", "items": _NUMBER}
    if num_features is not None:
        row |= {"minItems": num_features, "maxItems": num_features}
    return {"type": "array", "items": row, "minItems": 1, "maxItems": max_rows}


def _body(route: Route, model: dict[str, Any] | None, max_rows: int) -> dict[str, Any]:
    """The request body a prediction route reads: ``model`` has num_features and feature_names when known."""
    f = model["num_features"] if model else None
    names: list[str] | None = model["feature_names"] if model else None
    rows = _rows(f, max_rows)
    kind = route.kind
    if kind == "v1":
        schema: dict[str, Any] = {"type": "object", "required": ["instances"], "properties": {"instances": rows}}
        return {"application/json": {"schema": schema}}
    if kind == "v2":
        flat = {"type": "array", "items": _NUMBER} | ({"minItems": f, "maxItems": f} if f else {})
        shape = {"type": "array", "items": {"type": "integer"}} if f is None else \
            {"type": "array", "items": {"type": "integer", "enum": [1, f]}, "minItems": 2, "maxItems": 2,
             "prefixItems": [{"const": 1}, {"const": f}]}
        tensor = {"type": "object", "required": ["name", "shape", "datatype", "data"], "properties": {
            "name": {"type": "string", "example": oip.INPUT}, "shape": shape,
            "datatype": {"type": "string", "enum": ["FP32", "FP64"]}, "data": flat}}
        schema = {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": ["string", "null"]},
            "inputs": {"type": "array", "items": tensor, "minItems": 1, "maxItems": 1}},
            "description": "One input tensor of shape [N, F] with N*F values (flat or nested by row); shown here "
                           "with one row. With the binary data extension (Inference-Header-Content-Length), the "
                           "JSON is followed by the tensor's raw little-endian bytes."}
        return {"application/json": {"schema": schema}}
    record: dict[str, Any] = {"type": "object", "additionalProperties": _NUMBER}
    if names is not None:
        record = {"type": "object", "required": names, "properties": {n: _NUMBER for n in names},
                  "additionalProperties": False}
    split: dict[str, Any] = {"type": "object", "required": ["data"], "additionalProperties": False,
                             "properties": {"data": rows} | (
                                 {"columns": {"anyOf": [{"const": names}, {"type": "null"}]}} if names else {})}
    params = {"type": ["object", "null"]}
    formats = [("dataframe_split", split), ("dataframe_records",
                                            {"type": "array", "items": record, "minItems": 1, "maxItems": max_rows}),
               ("instances", rows), ("inputs", rows)]
    keys = [key for key, _ in formats]
    # exactly one format field, as MLflow requires; other fields are ignored, as MLflow ignores them
    schema = {"oneOf": [{"type": "object", "required": [key], "properties": {key: value, "params": params},
                         "not": {"anyOf": [{"required": [other]} for other in keys if other != key]}}
                        for key, value in formats],
              "description": "MLflow's scoring formats; 'inputs' may also be {column: [values]}. "
                             "application/vnd.apache.parquet (DataFrame.to_parquet()) is read too."}
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if names is not None:
        number = r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,4})?"
        row = ",".join([number] * len(names))
        # Up to CSV_ROWS rows shown: a pattern repeated up to max_rows times made schemathesis' generator run
        # out of memory (bench/README.md); more rows are read as well, up to max_rows.
        shown = min(CSV_ROWS, max_rows)
        content["text/csv"] = {"schema": {
            "type": "string", "pattern": f"^{','.join(names)}\\r?\\n({row}\\r?\\n){{0,{shown - 1}}}{row}\\r?\\n?$",
            "description": f"DataFrame.to_csv(index=False): a header row of the feature names, then one line per row "
                           f"(shown with up to {shown} rows; up to {max_rows} are read)"}}
    return content


_OK = {"type": "object"}
_ANSWERS: dict[str, dict[str, Any]] = {
    "ok": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
    "live_v2": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
    "ready_v2": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
    "model_ready_v2": {"type": "object", "required": ["name", "ready"],
                       "properties": {"name": _STRING, "ready": {"type": "boolean"}}},
    "server_metadata_v2": {"type": "object", "required": ["name", "version", "extensions"], "properties": {
        "name": _STRING, "version": _STRING, "extensions": {"type": "array", "items": _STRING}}},
    "model_metadata_v2": {"type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"]},
}
_PREDICTIONS = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}
_PREDICT_ANSWERS = {
    "v1": {"type": "object", "required": ["predictions", "labels", "model_name", "model_version"], "properties": {
        "predictions": _PREDICTIONS, "labels": {"type": "array", "items": _STRING}, "model_name": _STRING,
        "model_version": {"type": "integer"}}},
    "v2": {"type": "object", "required": ["model_name", "model_version", "outputs"], "properties": {
        "model_name": _STRING, "model_version": _STRING, "id": _STRING,
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype", "shape"]}}}},
    "mlflow": {"type": "object", "required": ["predictions"], "properties": {"predictions": _PREDICTIONS}},
}


# A regressor answers numbers: one per row with one target, else a list per row (mlray.serving.outputs).
_VALUES = {"type": "array", "items": {"anyOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}}]}}
_REGRESSION_ANSWERS = {
    "v1": {"type": "object", "required": ["predictions", "model_name", "model_version"], "properties": {
        "predictions": _VALUES, "model_name": _STRING, "model_version": {"type": "integer"}}},
    "v2": _PREDICT_ANSWERS["v2"],
    "mlflow": {"type": "object", "required": ["predictions"], "properties": {"predictions": _VALUES}},
}


def _operation(route: Route, *, model: dict[str, Any] | None, max_rows: int, protected: bool) -> dict[str, Any]:
    predict_answers = _REGRESSION_ANSWERS if (model or {}).get("task") == "regression" else _PREDICT_ANSWERS
    answer = predict_answers[route.kind] if route.predict is not None else _ANSWERS.get(route.handler, _OK)
    ok: dict[str, Any] = {"description": "OK", "content": {"application/json": {"schema": answer}}}
    if route.kind == "v2" and route.predict is not None:
        ok["content"]["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    op: dict[str, Any] = {"summary": route.summary, "operationId": operation_id(route), "responses": {"200": ok}}
    error = {"schema": _MLFLOW_ERROR if route.kind == "mlflow" else _ERROR}
    statuses = sorted(set(route.errors) | ({401, 403} if protected else set()))
    for status in statuses:
        response: dict[str, Any] = {"description": _STATUS_TEXT[status], "content": {"application/json": error}}
        if status in (503, 504):
            response["headers"] = _RETRY_AFTER
        op["responses"][str(status)] = response
    if "{name}" in route.path:
        name: dict[str, Any] = {"type": "string"} | ({"enum": [model["name"]]} if model else {})
        op["parameters"] = [{"name": "name", "in": "path", "required": True, "schema": name,
                             "description": "the registered model's name"}]
    if route.predict is not None:
        op["requestBody"] = {"required": True, "content": _body(route, model, max_rows)}
    if protected:
        op["security"] = [{"apiKey": []}]
    return op


def document(*, model: dict[str, Any] | None, max_rows: int, auth: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document; ``model`` (name, num_features, feature_names, task) makes the bodies exact."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes.ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(
            route, model=model, max_rows=max_rows, protected=auth and not route.public)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "mlray model server", "version": mlray.__version__,
                 "description": "Predictions from models in the MLflow registry: V1, Open Inference Protocol "
                                "v2 (with the binary data extension), MLflow scoring. See docs/http-api.md."},
        "paths": paths,
    }
    if auth:
        doc["components"] = {"securitySchemes": {"apiKey": {
            "type": "http", "scheme": "bearer", "description": "an mlray API key: Authorization: Bearer <key>"}}}
    return doc


def install(app: FastAPI, *, core: Callable[[], Any], guard: Callable[[], Any]) -> None:
    """``app.openapi`` answers :func:`document` for the model ``core()`` serves and the keys ``guard()`` checks
    (both change at run time: no cached document)."""

    def openapi() -> dict[str, Any]:
        served = core()
        model = None
        max_rows = 1024
        if served is not None:
            loaded = served.champion.loaded
            model = {"name": served.cfg.model, "num_features": loaded.num_features,
                     "feature_names": loaded.feature_names, "task": loaded.task}
            max_rows = served.cfg.max_rows
        return document(model=model, max_rows=max_rows, auth=guard().enabled)

    app.openapi = openapi  # type: ignore[method-assign]
