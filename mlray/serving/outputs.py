"""What a prediction looks like in each protocol, by task: the one place that decides it.

Classification answers class probabilities (N, K) and labels, in the shapes :mod:`mlray.serving.protocols`
builds. Regression answers numbers: V1 ``predictions`` as numbers (one per row with one target, else a list
per row), V2 one ``predictions`` output of datatype FP32 and shape [N, T], ``/invocations`` what
``mlflow models serve`` answers for the same model's pyfunc (a scikit-learn-like regressor: a number per row).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlray.artifact import LoadedModel, pyfunc_output
from mlray.errors import InvalidInput
from mlray.serving import protocols

REGRESSION_OUTPUT = "predictions"


def _values(outputs: np.ndarray) -> list[Any]:
    values = np.asarray(outputs, dtype=np.float32)  # (N, T)
    return (values[:, 0] if values.shape[1] == 1 else values).tolist()


def v1_fields(outputs: np.ndarray, loaded: LoadedModel) -> dict[str, Any]:
    if loaded.task == "regression":
        return {"predictions": _values(outputs)}
    classes = loaded.class_names
    return {"predictions": outputs.tolist(), "labels": [classes[i] for i in outputs.argmax(axis=1)]}


def v2_response(outputs: np.ndarray, loaded: LoadedModel, *, model_name: str, model_version: str,
                request_id: str | None, requested: list[str] | None) -> dict[str, Any]:
    if loaded.task != "regression":
        return protocols.v2_infer_response(outputs, loaded.class_names, model_name=model_name,
                                           model_version=model_version, request_id=request_id, outputs=requested)
    if requested not in (None, [REGRESSION_OUTPUT]):
        raise InvalidInput(f"'outputs' asks for {requested}; this regression model's output is {[REGRESSION_OUTPUT]}")
    values = np.asarray(outputs, dtype=np.float32)
    body: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        body["id"] = request_id
    body["outputs"] = [{"name": REGRESSION_OUTPUT, "datatype": "FP32", "shape": list(values.shape),
                        "data": values.reshape(-1).tolist()}]
    return body


def v2_metadata(loaded: LoadedModel, *, name: str, version: str) -> dict[str, Any]:
    body = protocols.v2_model_metadata(name=name, version=version, num_features=loaded.num_features,
                                       class_names=loaded.class_names)
    if loaded.task == "regression":
        body["outputs"] = [{"name": REGRESSION_OUTPUT, "datatype": "FP32", "shape": [-1, loaded.num_outputs]}]
    return body


def invocations(outputs: np.ndarray, loaded: LoadedModel) -> dict[str, Any]:
    return protocols.invocations_response(pyfunc_output(loaded, outputs))
