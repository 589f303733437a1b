"""The standard prediction protocols, parsed into the same (N, F) float32 array the V1 route makes.

- Open Inference Protocol v2, the KServe v2 / Triton / MLServer data plane (``/v2/models/{name}/infer``);
  spec: github.com/kserve/open-inference-protocol, ``specification/protocol/inference_rest.md``.
- MLflow's scoring protocol, what ``mlflow models serve`` answers at ``POST /invocations``
  (``mlflow/pyfunc/scoring_server/__init__.py`` in MLflow 3.17).

Parsers raise :class:`~mlray.errors.MlrayError` whose message names the field path, the value and what
was expected. The app renders them in each protocol's own error shape (:func:`v2_error`,
:func:`mlflow_error`) with the status that protocol's clients expect (:func:`v2_status`,
:func:`mlflow_status`). Nothing here needs Ray, a model or pandas.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlray.errors import BadRequest, InvalidInput, MlrayError, PayloadTooLarge
from mlray.serving.validation import _describe, _to_float32, check_row_list, rows_as_float32

_MISSING = object()


def _names(names: list[str]) -> str:
    shown = ", ".join(json.dumps(name) for name in names[:6])
    return f"[{shown}{', ...' if len(names) > 6 else ''}] ({len(names)} in all)"


# ---------------------------------------------------------------------------------------------------------
# Open Inference Protocol v2
# ---------------------------------------------------------------------------------------------------------

V2_INPUT = "input"
V2_OUTPUTS = ("probabilities", "label")
# The spec's platform names read "<project>_<format>" (pytorch_torchscript, onnx_onnxv1, ...).
V2_PLATFORM = "mlray_pytorch"
_V2_FLOATS = ("FP32", "FP64", "FP16")
_V2_INTEGERS = {
    **{f"INT{bits}": (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) for bits in (8, 16, 32, 64)},
    **{f"UINT{bits}": (0, 2**bits - 1) for bits in (8, 16, 32, 64)},
}
_V2_DATATYPES = (*_V2_FLOATS, *_V2_INTEGERS)


@dataclass(frozen=True, slots=True)
class V2Request:
    """A parsed v2 inference request: ``x`` is (N, F) float32; ``outputs`` is None for "all of them"."""

    id: str | None
    x: np.ndarray
    outputs: list[str] | None


def parse_v2_infer(payload: Any, *, num_features: int, max_rows: int) -> V2Request:
    """The body of ``POST /v2/models/{name}/infer``, with exactly one input tensor of shape [N, F] or [F].

    ``data`` may be flat (row-major, as the spec's own example) or nested rows; FP16 and integer data
    are read as float32, integer values checked against their datatype's range.
    """
    if not isinstance(payload, dict):
        raise BadRequest(f"request body must be a JSON object with 'inputs', got {_describe(payload)}")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {_describe(request_id)}")
    _check_parameters(payload, "parameters")
    inputs = payload.get("inputs")
    if inputs is None:
        raise InvalidInput(f"request has no 'inputs' field (got fields {sorted(payload)[:10]}); expected "
                           '{"inputs": [{"name": ..., "shape": [N, F], "datatype": "FP32", "data": [...]}]}')
    if not isinstance(inputs, list) or len(inputs) != 1:
        got = f"{len(inputs)} tensors" if isinstance(inputs, list) else _describe(inputs)
        raise InvalidInput(f"'inputs' must be a list of exactly one tensor (this model has one input, "
                           f"{V2_INPUT!r}, of shape [-1, {num_features}]), got {got}")
    x = _v2_tensor(inputs[0], field="inputs[0]", num_features=num_features, max_rows=max_rows)
    return V2Request(id=request_id, x=x, outputs=_v2_requested_outputs(payload.get("outputs")))


def _check_parameters(obj: dict[str, Any], field: str, *, where: str = "") -> None:
    value = obj.get("parameters")
    if value is not None and not isinstance(value, dict):
        raise InvalidInput(f"'{where}{field}' must be an object of name/value pairs, got {_describe(value)}")


def _v2_tensor(tensor: Any, *, field: str, num_features: int, max_rows: int) -> np.ndarray:
    if not isinstance(tensor, dict):
        raise InvalidInput(f"'{field}' must be an object with name, shape, datatype and data, got {_describe(tensor)}")
    _check_parameters(tensor, "parameters", where=f"{field}.")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise InvalidInput(f"'{field}.name' must be a string (this model's input is {V2_INPUT!r}), "
                           f"got {_describe(name)}")
    datatype = tensor.get("datatype")
    if datatype not in _V2_DATATYPES:
        kind = " (this model takes numbers)" if datatype in ("BYTES", "BOOL") else ""
        raise InvalidInput(f"'{field}.datatype' is {_describe(datatype)}{kind}; expected one of {list(_V2_DATATYPES)}")
    rows = _v2_rows(tensor.get("shape"), field=f"{field}.shape", num_features=num_features, max_rows=max_rows)
    data = tensor.get("data")
    where = f"{field}.data"
    if data is None and "binary_data_size" in (tensor.get("parameters") or {}):
        raise InvalidInput(f"'{field}' uses the binary tensor extension, which this server does not speak; "
                           "send the values in 'data' (tritonclient: set_data_from_numpy(x, binary_data=False))")
    if not isinstance(data, list):
        raise InvalidInput(f"'{where}' must be a list of numbers, got {_describe(data)}")
    if data and isinstance(data[0], list):  # nested rows: [[f0, f1, ...], ...]
        if len(tensor["shape"]) != 2 or len(data) != rows or any(
            type(row) is not list or len(row) != num_features for row in data
        ):
            raise InvalidInput(_nested_mismatch(data, field=where, shape=tensor["shape"]))
        values = [value for row in data for value in row]

        def name_value(k: int) -> str:
            return f"{where}[{k // num_features}][{k % num_features}]"
    else:
        if len(data) != rows * num_features:
            raise InvalidInput(f"'{where}' has {len(data)} values; shape {tensor['shape']} needs "
                               f"{rows * num_features}, flat in row-major order or nested by row")
        values = data

        def name_value(k: int) -> str:
            return f"{where}[{k}]"
    return _to_float32(values, shape=(rows, num_features), where=name_value,
                       integer_range=_V2_INTEGERS.get(datatype))


def _v2_rows(shape: Any, *, field: str, num_features: int, max_rows: int) -> int:
    """The number of rows in a [N, F] or [F] shape."""
    expected = f"[N, {num_features}] or [{num_features}]"
    if not isinstance(shape, list) or not 1 <= len(shape) <= 2:
        raise InvalidInput(f"'{field}' is {_describe(shape)}; expected {expected}")
    for i, dim in enumerate(shape):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise InvalidInput(f"'{field}[{i}]' is {_describe(dim)}; dimensions are whole numbers >= 0")
    if shape[-1] != num_features:
        raise InvalidInput(f"'{field}' is {shape}: {shape[-1]} features; the model expects {expected}")
    rows = shape[0] if len(shape) == 2 else 1
    if rows == 0:
        raise InvalidInput(f"'{field}' is {shape}, no rows; send at least one row of {num_features} numbers")
    if rows > max_rows:
        raise PayloadTooLarge(f"'{field}' is {shape}: {rows} rows; the limit is {max_rows} per request")
    return rows


def _nested_mismatch(data: list[Any], *, field: str, shape: list[int]) -> str:
    if len(shape) != 2:
        return f"'{field}' is nested rows but the shape {shape} has one dimension; send [1, {shape[-1]}] or flat data"
    for i, row in enumerate(data):
        if type(row) is not list:
            return f"'{field}[{i}]' must be a list of {shape[1]} numbers, got {_describe(row)}"
        if len(row) != shape[1]:
            return f"'{field}[{i}]' has {len(row)} values; the shape {shape} says {shape[1]} per row"
    return f"'{field}' has {len(data)} rows; the shape {shape} says {shape[0]}"


def _v2_requested_outputs(outputs: Any) -> list[str] | None:
    if outputs is None or outputs == []:
        return None  # the spec: not given means every output, with default settings
    if not isinstance(outputs, list):
        raise InvalidInput(f"'outputs' must be a list of {{\"name\": ...}} objects, got {_describe(outputs)}")
    names: list[str] = []
    for i, item in enumerate(outputs):
        if not isinstance(item, dict):
            raise InvalidInput(f"'outputs[{i}]' must be an object with a 'name', got {_describe(item)}")
        _check_parameters(item, "parameters", where=f"outputs[{i}].")  # e.g. tritonclient's binary_data: ignored
        name = item.get("name")
        if name not in V2_OUTPUTS:
            raise InvalidInput(f"'outputs[{i}].name' is {_describe(name)}; this model's outputs are {list(V2_OUTPUTS)}")
        if name in names:
            raise InvalidInput(f"'outputs[{i}].name' {name!r} is requested twice")
        names.append(name)
    return names


def v2_infer_response(probabilities: np.ndarray, class_names: list[str], *, model_name: str, model_version: str,
                      request_id: str | None, outputs: list[str] | None) -> dict[str, Any]:
    """The inference response object for (N, K) class probabilities; ``outputs`` selects and orders."""
    probs = np.asarray(probabilities, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[1] != len(class_names):
        raise ValueError(f"probabilities of shape {probs.shape} do not fit {len(class_names)} classes")
    n, k = probs.shape
    body: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        body["id"] = request_id  # the spec: the request's id, if any, must come back
    tensors: list[dict[str, Any]] = []
    for i, name in enumerate(outputs if outputs is not None else V2_OUTPUTS):
        if name == "probabilities":
            tensors.append({"name": name, "datatype": "FP32", "shape": [n, k], "data": probs.reshape(-1).tolist()})
        elif name == "label":
            labels = [class_names[c] for c in probs.argmax(axis=1).tolist()]
            tensors.append({"name": name, "datatype": "BYTES", "shape": [n], "data": labels})
        else:
            raise InvalidInput(f"'outputs[{i}].name' is {_describe(name)}; this model's outputs are {list(V2_OUTPUTS)}")
    body["outputs"] = tensors
    return body


def v2_model_metadata(*, name: str, version: str, num_features: int, class_names: list[str]) -> dict[str, Any]:
    """``GET /v2/models/{name}``: variable-size dimensions are -1, as the spec says."""
    return {
        "name": name, "versions": [str(version)], "platform": V2_PLATFORM,
        "inputs": [{"name": V2_INPUT, "datatype": "FP32", "shape": [-1, num_features]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(class_names)]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}],
    }


def v2_error(message: str) -> dict[str, Any]:
    """The spec's ``$inference_error_response`` (also its metadata error object)."""
    return {"error": message}


def v2_status(err: MlrayError) -> int:
    """The spec: "a failed inference request must be indicated by an HTTP error status (typically 400)";
    KServe and Triton answer 400 to a bad input, so mlray's 422 becomes 400. 413, 404, 503 keep theirs."""
    return 400 if isinstance(err, InvalidInput) else err.status_code


# ---------------------------------------------------------------------------------------------------------
# MLflow scoring protocol (POST /invocations)
# ---------------------------------------------------------------------------------------------------------

MLFLOW_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
_SPLIT_FIELDS = frozenset({"columns", "data", "index"})


def parse_invocations(payload: Any, *, feature_names: list[str], max_rows: int) -> np.ndarray:
    """A JSON body as ``mlflow models serve`` takes it -> (N, F) float32, columns in ``feature_names`` order.

    Named columns may come in any order; positional rows (``instances``/``inputs`` as lists of lists,
    ``dataframe_split`` without ``columns``) must hold all F features in the model's order. ``params``
    is accepted and ignored: this model has no parameters, and MLflow ignores them too in that case.
    """
    if not isinstance(payload, dict):
        raise BadRequest(f"request body must be a JSON object with exactly one of the fields "
                         f"{list(MLFLOW_FORMATS)}, got {_describe(payload)}")
    present = [key for key in MLFLOW_FORMATS if key in payload]
    if len(present) != 1:
        raise InvalidInput(f"request must have exactly one of the input fields {list(MLFLOW_FORMATS)}; got "
                           f"fields {sorted(payload)[:10]}. Example: "
                           '{"dataframe_split": {"columns": [...], "data": [[...]]}}')
    params = payload.get("params")
    if params is not None and not isinstance(params, dict):
        raise InvalidInput(f"'params' must be an object of name/value pairs, got {_describe(params)}")
    key = present[0]
    value = payload[key]
    if key == "dataframe_split":
        return _split(value, feature_names=feature_names, max_rows=max_rows)
    if key == "inputs" and isinstance(value, dict):
        return _columns(value, field=key, feature_names=feature_names, max_rows=max_rows)
    if key == "dataframe_records" or (isinstance(value, list) and value and isinstance(value[0], dict)):
        return _records(value, field=key, feature_names=feature_names, max_rows=max_rows)
    return rows_as_float32(value, field=key, num_features=len(feature_names), max_rows=max_rows)


def _split(split: Any, *, feature_names: list[str], max_rows: int) -> np.ndarray:
    field = "dataframe_split"
    if not isinstance(split, dict):
        raise InvalidInput(f"'{field}' must be an object {{\"columns\": [...], \"data\": [[...]]}}, "
                           f"got {_describe(split)}")
    unknown = sorted(set(split) - _SPLIT_FIELDS)
    if unknown or "data" not in split:
        what = f"has the unknown field {unknown[0]!r}" if unknown else "has no 'data'"
        raise InvalidInput(f"'{field}' {what}; expected 'data' and optionally 'columns' and 'index' "
                           "(pandas' DataFrame.to_dict(orient='split'))")
    columns = split.get("columns")
    order = None if columns is None else _column_order(columns, field=f"{field}.columns", feature_names=feature_names)
    x = rows_as_float32(split["data"], field=f"{field}.data", num_features=len(feature_names), max_rows=max_rows)
    index = split.get("index")
    if index is not None and (not isinstance(index, list) or len(index) != len(x)):
        got = f"{len(index)} entries" if isinstance(index, list) else _describe(index)
        raise InvalidInput(f"'{field}.index' must be a list with one entry per row ({len(x)}), got {got}")
    return x if order is None else np.ascontiguousarray(x[:, order])  # (N, F) in the model's order


def _column_order(columns: Any, *, field: str, feature_names: list[str]) -> list[int] | None:
    """Where each model feature sits in ``columns``; None when they are already in the model's order."""
    if columns == feature_names:
        return None
    if not isinstance(columns, list):
        raise InvalidInput(f"'{field}' must be a list of column names, got {_describe(columns)}")
    known = set(feature_names)
    position: dict[str, int] = {}
    for i, column in enumerate(columns):
        if not isinstance(column, str) or column not in known:
            raise InvalidInput(f"'{field}[{i}]' is {_describe(column)}, not a feature of this model; "
                               f"expected names from {_names(feature_names)}")
        if column in position:
            raise InvalidInput(f"'{field}[{i}]' {column!r} repeats '{field}[{position[column]}]'")
        position[column] = i
    missing = [name for name in feature_names if name not in position]
    if missing:
        raise InvalidInput(f"'{field}' lacks the feature(s) {_names(missing)}; the model needs all "
                           f"{len(feature_names)}")
    return [position[name] for name in feature_names]


def _records(records: Any, *, field: str, feature_names: list[str], max_rows: int) -> np.ndarray:
    """``[{column: value, ...}, ...]`` -> (N, F)."""
    check_row_list(records, field=field, max_rows=max_rows, kind="records {column: value}",
                   one=f"record of {len(feature_names)} columns")
    f = len(feature_names)
    values = _record_values(records, feature_names)
    if values is None:  # some record is not exactly the features: find it and name the problem
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise InvalidInput(f"'{field}[{i}]' must be a record {{column: value}}, got {_describe(record)}")
            _check_keys(record, field=f"{field}[{i}]", feature_names=feature_names)
        values = [record[name] for record in records for name in feature_names]
    return _to_float32(values, shape=(len(records), f),
                       where=lambda k: f"{field}[{k // f}][{json.dumps(feature_names[k % f])}]")


def _record_values(records: list[Any], feature_names: list[str]) -> list[Any] | None:
    """Row-major values when every record is a dict of exactly the features (no missing, no unknown key)."""
    f = len(feature_names)
    if not all(type(record) is dict and len(record) == f for record in records):
        return None
    try:
        return [record[name] for record in records for name in feature_names]
    except KeyError:
        return None


def _check_keys(record: dict[str, Any], *, field: str, feature_names: list[str]) -> None:
    missing = [name for name in feature_names if name not in record]
    if missing:
        raise InvalidInput(f"'{field}' has no column {json.dumps(missing[0])} ({len(missing)} missing); "
                           f"the model needs all of {_names(feature_names)}")
    known = set(feature_names)
    unknown = [key for key in record if key not in known]
    if unknown:
        raise InvalidInput(f"'{field}' has the column {_describe(unknown[0])}, not a feature of this model; "
                           f"expected names from {_names(feature_names)}")


def _columns(columns: dict[str, Any], *, field: str, feature_names: list[str], max_rows: int) -> np.ndarray:
    """``{column: [values...]}`` (or ``{column: value}`` for one row, as MLflow takes it) -> (N, F)."""
    f = len(feature_names)
    cols = [columns.get(name, _MISSING) for name in feature_names]
    if len(columns) != f or _MISSING in cols:
        _check_keys(columns, field=field, feature_names=feature_names)  # raises: names the missing or unknown
    if not any(isinstance(col, list) for col in cols):  # one row of scalars
        return _to_float32(cols, shape=(1, f), where=lambda k: f"{field}[{json.dumps(feature_names[k])}]")
    first = next(i for i, col in enumerate(cols) if isinstance(col, list))
    n = len(cols[first])
    for name, col in zip(feature_names, cols, strict=True):
        if not isinstance(col, list) or len(col) != n:
            got = f"{len(col)} values" if isinstance(col, list) else _describe(col)
            raise InvalidInput(f"'{field}[{json.dumps(name)}]' must be a list of {n} values, as "
                               f"'{field}[{json.dumps(feature_names[first])}]' is, got {got}")
    if n == 0:
        raise InvalidInput(f"'{field}' has no rows; send at least one value per column")
    if n > max_rows:
        raise PayloadTooLarge(f"'{field}' has {n} rows; the limit is {max_rows} per request")
    values = [value for col in cols for value in col]  # column-major: (F, N)
    array = _to_float32(values, shape=(f, n), where=lambda k: f"{field}[{json.dumps(feature_names[k // n])}][{k % n}]")
    return np.ascontiguousarray(array.T)


def invocations_response(probabilities: np.ndarray) -> dict[str, Any]:
    """What ``mlflow models serve`` answers for an ndarray prediction: ``predictions_to_json`` turns it into
    ``{"predictions": ndarray.tolist()}``."""
    return {"predictions": np.asarray(probabilities).tolist()}


# MLflow's HTTP_STATUS_TO_ERROR_CODE (mlflow/exceptions.py), and two statuses it has no code for: a body
# too large is a BAD_REQUEST (not RESOURCE_EXHAUSTED, which is 429 and which MLflow's clients retry), a
# request timeout is DEADLINE_EXCEEDED.
_MLFLOW_ERROR_CODES = {
    400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "ENDPOINT_NOT_FOUND",
    408: "DEADLINE_EXCEEDED", 409: "ALREADY_EXISTS", 413: "BAD_REQUEST", 429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED", 500: "INTERNAL_ERROR", 501: "NOT_IMPLEMENTED", 503: "TEMPORARILY_UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
# MlflowException (3.x) adds these to its JSON for some codes (mlflow/error_classification.py).
_MLFLOW_CLASSIFICATION = {
    "BAD_REQUEST": ("KAM00", "INVALID_PARAMETER_VALUE"),
    "INVALID_PARAMETER_VALUE": ("KAM00", "INVALID_PARAMETER_VALUE"),
    "ENDPOINT_NOT_FOUND": ("KAM00", "RESOURCE_NOT_FOUND"),
    "RESOURCE_DOES_NOT_EXIST": ("KAM00", "RESOURCE_NOT_FOUND"),
    "PERMISSION_DENIED": ("KAM00", "PERMISSION_DENIED"),
    "INTERNAL_ERROR": ("XXM00", "CLIENT_INTERNAL_ERROR"),
    "TEMPORARILY_UNAVAILABLE": ("XXM00", "CLIENT_INTERNAL_ERROR"),
}


def mlflow_error(message: str, *, error_code: str = "BAD_REQUEST") -> dict[str, Any]:
    """``MlflowException.serialize_as_json()`` as the scoring server sends it; never a stack trace (MLflow adds
    one only when the model itself raised, which mlray logs instead)."""
    body: dict[str, Any] = {"error_code": error_code, "message": message}
    if error_code in _MLFLOW_CLASSIFICATION:
        body["sqlstate"], body["error_class"] = _MLFLOW_CLASSIFICATION[error_code]
    return body


def mlflow_error_code(status: int) -> str:
    """MLflow's error code for an HTTP status (INTERNAL_ERROR for one it has no name for, as MLflow does)."""
    return _MLFLOW_ERROR_CODES.get(status, "INTERNAL_ERROR")


def mlflow_status(err: MlrayError) -> int:
    """MLflow's scoring server answers 400 (BAD_REQUEST) to every input it cannot use, so mlray's 422 becomes
    400; a body over the limit stays 413 (MLflow has no limit; 413 is the status proxies use too)."""
    return 400 if isinstance(err, InvalidInput) else err.status_code
