"""The three prediction protocols as (parse, respond) pairs over the same (N, F) float32 array.

- V1 (KServe V1 / TF-Serving): ``{"instances": [[...], ...]}`` -> probabilities and labels (numbers for a
  regressor: what each protocol answers per task is :mod:`mlray.serving.outputs`);
- Open Inference Protocol v2, JSON or with the binary data extension (:mod:`mlray.serving.oip`);
- MLflow's scoring protocol, JSON, CSV or Parquet (:mod:`mlray.serving.scoring`).

``parse(body, headers, model, limits)`` returns the array and whatever the protocol needs to answer
(a request id, the outputs asked for); ``respond(probabilities, parsed, served, name)`` returns the
answer's body (an object to render as JSON, or bytes) and its headers. The route table
(:mod:`mlray.serving.routes`) says which route speaks which protocol. Nothing here needs Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlray.serving import oip, outputs, scoring
from mlray.serving.http import encode
from mlray.serving.loader import Loaded, ServedModel
from mlray.serving.validation import parse_json, parse_v1

Body = dict[str, Any] | bytes
Answer = tuple[Body, dict[str, str]]  # (JSON object or raw bytes, response headers)


@dataclass(frozen=True, slots=True)
class Limits:
    max_rows: int
    max_body_bytes: int


@dataclass(frozen=True, slots=True)
class Protocol:
    name: str
    parse: Callable[[bytes, Mapping[str, str], Loaded, Limits], tuple[np.ndarray, Any]]
    respond: Callable[[np.ndarray, Any, ServedModel, str], Answer]


def _parse_v1(body: bytes, headers: Mapping[str, str], model: Loaded, limits: Limits) -> tuple[np.ndarray, Any]:
    payload = parse_json(body, max_bytes=limits.max_body_bytes)
    return parse_v1(payload, num_features=model.num_features, max_rows=limits.max_rows), None


def _respond_v1(outputs_: np.ndarray, parsed: Any, served: ServedModel, name: str) -> Answer:
    return {**outputs.v1_fields(outputs_, served.loaded),
            "model_name": served.info.name, "model_version": served.info.version}, {}


def _parse_v2(body: bytes, headers: Mapping[str, str], model: Loaded, limits: Limits) -> tuple[np.ndarray, Any]:
    payload, binary = oip.split_body(body, headers.get(oip.HEADER_LENGTH), max_bytes=limits.max_body_bytes)
    request = oip.parse_infer(payload, num_features=model.num_features, max_rows=limits.max_rows, binary=binary,
                              output_names=tuple(out["name"] for out in outputs.v2_output_metadata(model)))
    return request.x, request


def _respond_v2(outputs_: np.ndarray, request: oip.Request, served: ServedModel, name: str) -> Answer:
    body, raw = oip.tensors_response(outputs.v2_tensors(outputs_, served.loaded), model_name=name,
                                     model_version=str(served.info.version), request=request)
    if not raw:
        return body, {}
    return oip.binary_body(encode(body), raw)


def _parse_mlflow(body: bytes, headers: Mapping[str, str], model: Loaded, limits: Limits
                  ) -> tuple[np.ndarray, Any]:
    x = scoring.parse_body(body, headers.get("content-type"), feature_names=model.feature_names,
                           max_rows=limits.max_rows, max_bytes=limits.max_body_bytes)
    return x, None


def _respond_mlflow(outputs_: np.ndarray, parsed: Any, served: ServedModel, name: str) -> Answer:
    return scoring.invocations_response(outputs.invocations(outputs_, served.loaded)), {}


V1 = Protocol("v1", _parse_v1, _respond_v1)
V2 = Protocol("v2", _parse_v2, _respond_v2)
MLFLOW = Protocol("mlflow", _parse_mlflow, _respond_mlflow)
