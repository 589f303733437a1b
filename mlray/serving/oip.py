"""Open Inference Protocol v2, the KServe v2 / Triton / MLServer data plane, parsed into the same (N, F)
float32 array the V1 route makes.

Spec: github.com/kserve/open-inference-protocol, ``specification/protocol/inference_rest.md``; the binary
data extension as Triton documents it (``docs/protocol/extension_binary_data.md``) and ``tritonclient.http``
speaks it by default: an ``Inference-Header-Content-Length: L`` header says the first L bytes of the body are
the JSON request, the rest is raw tensor bytes (little-endian, row-major) in input order, each input giving
its byte count as ``parameters.binary_data_size`` instead of ``data``. Outputs asked for with
``parameters.binary_data: true`` (or all of them, with the request's ``parameters.binary_data_output``) come
back the same way. Nothing here needs Ray, a model or pandas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mlray.errors import BadRequest, InvalidInput, PayloadTooLarge
from mlray.serving.validation import _FLOAT32_MAX, _describe, _to_float32, parse_json

INPUT = "input"
OUTPUTS = ("probabilities", "label")
# The spec's platform names read "<project>_<format>" (pytorch_torchscript, onnx_onnxv1, ...).
PLATFORM = "mlray_pytorch"
HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]  # Triton's name for the extension, as its GET /v2 lists it
_FLOATS = ("FP32", "FP64", "FP16")
_INTEGERS = {
    **{f"INT{bits}": (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) for bits in (8, 16, 32, 64)},
    **{f"UINT{bits}": (0, 2**bits - 1) for bits in (8, 16, 32, 64)},
}
DATATYPES = (*_FLOATS, *_INTEGERS)
# Raw bytes of each datatype: little-endian, as the extension says.
_NUMPY = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2",
          **{f"INT{bits}": f"<i{bits // 8}" for bits in (8, 16, 32, 64)},
          **{f"UINT{bits}": f"<u{bits // 8}" for bits in (8, 16, 32, 64)}}


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed inference request: ``x`` is (N, F) float32; ``outputs`` is None for "all of them";
    ``binary`` names the outputs to send as raw bytes."""

    id: str | None
    x: np.ndarray
    outputs: list[str] | None
    binary: frozenset[str] = frozenset()


def split_body(body: bytes, header_length: str | None, *, max_bytes: int) -> tuple[Any, bytes]:
    """(JSON payload, raw tensor bytes) of a request body; without the header the whole body is JSON."""
    if header_length is None:
        return parse_json(body, max_bytes=max_bytes), b""
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 < length <= len(body):
        raise BadRequest(f"the Inference-Header-Content-Length header is {header_length!r}; expected the byte "
                         f"length of the JSON header, a whole number from 1 to the body's {len(body)} bytes")
    return parse_json(body[:length], max_bytes=max_bytes), body[length:]


def parse_infer(payload: Any, *, num_features: int, max_rows: int, binary: bytes = b"",
                output_names: tuple[str, ...] = OUTPUTS) -> Request:
    """The body of ``POST /v2/models/{name}/infer``, with exactly one input tensor of shape [N, F] or [F].

    ``data`` may be flat (row-major, as the spec's own example) or nested rows, or absent with the tensor's
    bytes in ``binary``; FP16 and integer data are read as float32, integer values checked against their
    datatype's range.
    """
    if not isinstance(payload, dict):
        raise BadRequest(f"request body must be a JSON object with 'inputs', got {_describe(payload)}")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {_describe(request_id)}")
    params = _parameters(payload, "parameters")
    inputs = payload.get("inputs")
    if inputs is None:
        raise InvalidInput(f"request has no 'inputs' field (got fields {sorted(payload)[:10]}); expected "
                           '{"inputs": [{"name": ..., "shape": [N, F], "datatype": "FP32", "data": [...]}]}')
    if not isinstance(inputs, list) or len(inputs) != 1:
        got = f"{len(inputs)} tensors" if isinstance(inputs, list) else _describe(inputs)
        raise InvalidInput(f"'inputs' must be a list of exactly one tensor (this model has one input, "
                           f"{INPUT!r}, of shape [-1, {num_features}]), got {got}")
    x = _tensor(inputs[0], field="inputs[0]", num_features=num_features, max_rows=max_rows, binary=binary)
    all_binary = params.get("binary_data_output", False)
    if not isinstance(all_binary, bool):
        raise InvalidInput(f"'parameters.binary_data_output' must be true or false, got {_describe(all_binary)}")
    outputs, binary_outputs = _requested_outputs(payload.get("outputs"), all_binary=all_binary, names=output_names)
    return Request(id=request_id, x=x, outputs=outputs, binary=binary_outputs)


def _parameters(obj: dict[str, Any], field: str, *, where: str = "") -> dict[str, Any]:
    value = obj.get("parameters")
    if value is not None and not isinstance(value, dict):
        raise InvalidInput(f"'{where}{field}' must be an object of name/value pairs, got {_describe(value)}")
    return value or {}


def _tensor(tensor: Any, *, field: str, num_features: int, max_rows: int, binary: bytes) -> np.ndarray:
    if not isinstance(tensor, dict):
        raise InvalidInput(f"'{field}' must be an object with name, shape, datatype and data, got {_describe(tensor)}")
    params = _parameters(tensor, "parameters", where=f"{field}.")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise InvalidInput(f"'{field}.name' must be a string (this model's input is {INPUT!r}), "
                           f"got {_describe(name)}")
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        kind = " (this model takes numbers)" if datatype in ("BYTES", "BOOL") else ""
        raise InvalidInput(f"'{field}.datatype' is {_describe(datatype)}{kind}; expected one of {list(DATATYPES)}")
    rows = _rows(tensor.get("shape"), field=f"{field}.shape", num_features=num_features, max_rows=max_rows)
    if "binary_data_size" in params:
        if "data" in tensor:
            raise InvalidInput(f"'{field}' has both 'data' and 'parameters.binary_data_size'; send one of them")
        return _binary_tensor(binary, params["binary_data_size"], field=field, datatype=datatype,
                              shape=(rows, num_features))
    if binary:
        raise InvalidInput(f"the body has {len(binary)} bytes after the JSON header but no input declares "
                           f"'parameters.binary_data_size'")
    data = tensor.get("data")
    where = f"{field}.data"
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
    return _to_float32(values, shape=(rows, num_features), where=name_value, integer_range=_INTEGERS.get(datatype))


def _binary_tensor(binary: bytes, size: Any, *, field: str, datatype: str, shape: tuple[int, int]) -> np.ndarray:
    """The one input's raw bytes (it is first in input order, so at offset 0) -> (N, F) float32."""
    dtype = np.dtype(_NUMPY[datatype])
    expected = shape[0] * shape[1] * dtype.itemsize
    if isinstance(size, bool) or not isinstance(size, int) or size != expected:
        raise InvalidInput(f"'{field}.parameters.binary_data_size' is {_describe(size)}; shape {list(shape)} of "
                           f"{datatype} is {expected} bytes")
    if len(binary) != size:
        raise InvalidInput(f"the body has {len(binary)} bytes after the JSON header; '{field}' declares {size}")
    values = np.frombuffer(binary, dtype=dtype)
    if dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):  # as JSON numbers: beyond float32's range is refused
            array = np.where(np.abs(values) <= _FLOAT32_MAX, values, np.inf).astype(np.float32)
        if not np.isfinite(array).all():
            k = int(np.flatnonzero(~np.isfinite(array))[0])
            raise InvalidInput(f"'{field}' value [{k // shape[1]}][{k % shape[1]}] is {float(values[k])}; "
                               "only finite numbers within float32's range are accepted")
    else:
        array = values.astype(np.float64).astype(np.float32)  # as JSON integers are read
    return array.reshape(shape)


def _rows(shape: Any, *, field: str, num_features: int, max_rows: int) -> int:
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
    return int(rows)


def _nested_mismatch(data: list[Any], *, field: str, shape: list[int]) -> str:
    if len(shape) != 2:
        return f"'{field}' is nested rows but the shape {shape} has one dimension; send [1, {shape[-1]}] or flat data"
    for i, row in enumerate(data):
        if type(row) is not list:
            return f"'{field}[{i}]' must be a list of {shape[1]} numbers, got {_describe(row)}"
        if len(row) != shape[1]:
            return f"'{field}[{i}]' has {len(row)} values; the shape {shape} says {shape[1]} per row"
    return f"'{field}' has {len(data)} rows; the shape {shape} says {shape[0]}"


def _requested_outputs(outputs: Any, *, all_binary: bool, names: tuple[str, ...] = OUTPUTS
                       ) -> tuple[list[str] | None, frozenset[str]]:
    known = names
    if outputs is None or outputs == []:
        # the spec: not given means every output, with default settings
        return None, frozenset(known) if all_binary else frozenset()
    if not isinstance(outputs, list):
        raise InvalidInput(f"'outputs' must be a list of {{\"name\": ...}} objects, got {_describe(outputs)}")
    asked: list[str] = []
    binary: set[str] = set()
    for i, item in enumerate(outputs):
        if not isinstance(item, dict):
            raise InvalidInput(f"'outputs[{i}]' must be an object with a 'name', got {_describe(item)}")
        params = _parameters(item, "parameters", where=f"outputs[{i}].")
        name = item.get("name")
        if name not in known:
            raise InvalidInput(f"'outputs[{i}].name' is {_describe(name)}; this model's outputs are {list(known)}")
        if name in asked:
            raise InvalidInput(f"'outputs[{i}].name' {name!r} is requested twice")
        as_binary = params.get("binary_data", all_binary)
        if not isinstance(as_binary, bool):
            raise InvalidInput(f"'outputs[{i}].parameters.binary_data' must be true or false, "
                               f"got {_describe(as_binary)}")
        if as_binary:
            binary.add(name)
        asked.append(name)
    return asked, frozenset(binary)


def infer_response(probabilities: np.ndarray, class_names: list[str], *, model_name: str, model_version: str,
                   request: Request) -> tuple[dict[str, Any], bytes]:
    """:func:`tensors_response` for (N, K) class probabilities: ``probabilities`` and ``label`` outputs."""
    probs = np.asarray(probabilities, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[1] != len(class_names):
        raise ValueError(f"probabilities of shape {probs.shape} do not fit {len(class_names)} classes")
    n, k = probs.shape
    labels = [class_names[c] for c in probs.argmax(axis=1).tolist()]
    return tensors_response({"probabilities": ("FP32", [n, k], probs), "label": ("BYTES", [n], labels)},
                            model_name=model_name, model_version=model_version, request=request)


def tensors_response(tensors: dict[str, tuple[str, list[int], np.ndarray | list[str]]], *, model_name: str,
                     model_version: str, request: Request) -> tuple[dict[str, Any], bytes]:
    """(JSON response object, raw bytes of the outputs asked for as binary, in output order) for the model's
    outputs by name, each (datatype, shape, data); the bytes are empty when every output is in the JSON (see
    :func:`binary_body`)."""
    body: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        body["id"] = request.id  # the spec: the request's id, if any, must come back
    out: list[dict[str, Any]] = []
    raw: list[bytes] = []
    for i, name in enumerate(request.outputs if request.outputs is not None else list(tensors)):
        if name not in tensors:
            raise InvalidInput(f"'outputs[{i}].name' is {_describe(name)}; this model's outputs are {list(tensors)}")
        datatype, shape, data = tensors[name]
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if name in request.binary:
            raw.append(_to_bytes(data))
            tensor["parameters"] = {"binary_data_size": len(raw[-1])}
        else:
            tensor["data"] = data.reshape(-1).tolist() if isinstance(data, np.ndarray) else data
        out.append(tensor)
    body["outputs"] = out
    return body, b"".join(raw)


def binary_body(header: bytes, raw: bytes) -> tuple[bytes, dict[str, str]]:
    """(response body, response headers) of an answer with binary outputs: the JSON header's bytes, then the
    outputs' bytes; ``Inference-Header-Content-Length`` says where one ends."""
    return header + raw, {HEADER_LENGTH: str(len(header)), "content-type": "application/octet-stream"}


def _to_bytes(data: np.ndarray | list[str]) -> bytes:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data, dtype="<f4").tobytes()
    # BYTES: each element is its length as a 4-byte little-endian integer, then its bytes
    parts = []
    for text in data:
        encoded = text.encode()
        parts += [len(encoded).to_bytes(4, "little"), encoded]
    return b"".join(parts)


def model_metadata(*, name: str, version: str, num_features: int, class_names: list[str],
                   outputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``GET /v2/models/{name}``: variable-size dimensions are -1, as the spec says. ``outputs`` defaults to a
    classifier's (probabilities and label)."""
    return {
        "name": name, "versions": [str(version)], "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, num_features]}],
        "outputs": outputs if outputs is not None else [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(class_names)]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]}],
    }


def server_metadata(*, version: str) -> dict[str, Any]:
    """``GET /v2``: the spec's ``$metadata_server_response``."""
    return {"name": "mlray", "version": version, "extensions": list(EXTENSIONS)}
