"""The binary data extension of OIP v2 against tritonclient's own encoder and decoder, and /invocations' CSV and
Parquet bodies against MLflow's own parsers (the test oracle), without Ray."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from mlray.errors import BadRequest, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from mlray.serving import oip
from mlray.serving.scoring import parse_body, parse_csv, parse_parquet
from mlray.serving.validation import parse_v1

FEATURES = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
F = len(FEATURES)
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3, 5.2, 2.3], [0.1, 1e-7, -2.5, 1234567.891]]
CLASSES = ["setosa", "versicolor", "virginica"]
LIMIT = 1 << 20

httpclient = pytest.importorskip("tritonclient.http")


def expected() -> np.ndarray:
    return parse_v1({"instances": ROWS}, num_features=F, max_rows=8)


def triton_body(x: np.ndarray, datatype: str, *, binary: bool = True, outputs=None, request_id: str = ""):
    """The request body and header tritonclient.http sends for ``x``."""
    tensor = httpclient.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [tensor], outputs=outputs, request_id=request_id)
    return body, json_size


def parse_triton(body: bytes, json_size: int | None, *, max_rows: int = 8) -> oip.Request:
    payload, raw = oip.split_body(body, None if json_size is None else str(json_size), max_bytes=LIMIT)
    return oip.parse_infer(payload, num_features=F, max_rows=max_rows, binary=raw)


@pytest.mark.parametrize("dtype,datatype", [(np.float32, "FP32"), (np.float64, "FP64"), (np.float16, "FP16")])
def test_tritonclients_binary_tensors_give_the_v1_array(dtype, datatype):
    x = np.asarray(ROWS if datatype != "FP16" else ROWS[:2], dtype=dtype)  # FP16 holds no 1234567.891
    body, json_size = triton_body(x, datatype)
    assert json_size is not None and len(body) > json_size  # JSON then raw bytes: the extension is in use
    request = parse_triton(body, json_size)
    assert request.x.dtype == np.float32 and request.x.shape == x.shape
    assert np.array_equal(request.x, x.astype(np.float32))
    if datatype != "FP16":
        assert np.array_equal(request.x, expected())
    # no outputs named: tritonclient asks for all of them in binary
    assert request.outputs is None and request.binary == frozenset(oip.OUTPUTS)


@pytest.mark.parametrize("dtype,datatype", [(np.int64, "INT64"), (np.uint8, "UINT8"), (np.int8, "INT8")])
def test_binary_integer_tensors(dtype, datatype):
    x = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=dtype)
    assert np.array_equal(parse_triton(*triton_body(x, datatype)).x, x.astype(np.float32))


def test_binary_response_is_read_by_tritonclient():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    outputs = [httpclient.InferRequestedOutput("probabilities"),  # binary_data=True by default
               httpclient.InferRequestedOutput("label", binary_data=False)]
    body, json_size = triton_body(np.asarray(ROWS[:2], np.float32), "FP32", outputs=outputs, request_id="r1")
    request = parse_triton(body, json_size)
    assert request.outputs == ["probabilities", "label"] and request.binary == {"probabilities"}
    answer, raw = oip.infer_response(probs, CLASSES, model_name="iris", model_version="3", request=request)
    content, headers = oip.binary_body(json.dumps(answer).encode(), raw)
    assert headers["content-type"] == "application/octet-stream"
    result = httpclient.InferenceServerClient.parse_response_body(
        content, header_length=int(headers[oip.HEADER_LENGTH]))
    assert np.array_equal(result.as_numpy("probabilities"), probs)
    assert result.as_numpy("label").tolist() == ["setosa", "virginica"]
    assert result.get_response()["id"] == "r1"
    # all outputs binary, labels as BYTES: 4-byte little-endian length, then the UTF-8 bytes
    everything = oip.Request(id=None, x=request.x, outputs=None, binary=frozenset(oip.OUTPUTS))
    answer, raw = oip.infer_response(probs, ["zéro", "un", "deux"], model_name="m", model_version="1",
                                     request=everything)
    content, headers = oip.binary_body(json.dumps(answer).encode(), raw)
    result = httpclient.InferenceServerClient.parse_response_body(
        content, header_length=int(headers[oip.HEADER_LENGTH]))
    assert [v.decode() for v in result.as_numpy("label").tolist()] == ["zéro", "deux"]
    assert np.array_equal(result.as_numpy("probabilities"), probs)


def test_json_only_requests_from_tritonclient_still_parse():
    x = np.asarray(ROWS, np.float32)
    body, json_size = triton_body(x, "FP32", binary=False)
    assert json_size is None
    assert np.array_equal(parse_triton(body, None).x, expected())


def _binary(header: dict, raw: bytes) -> tuple[bytes, int]:
    text = json.dumps(header).encode()
    return text + raw, len(text)


@pytest.mark.parametrize(("header", "raw", "length", "error", "message"), [
    ({"inputs": [{"name": "x", "shape": [1, F], "datatype": "FP32", "parameters": {"binary_data_size": 12}}]},
     b"\0" * 12, None, InvalidInput, r"binary_data_size' is 12 \(int\); shape \[1, 4\] of FP32 is 16 bytes"),
    ({"inputs": [{"name": "x", "shape": [1, F], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]},
     b"\0" * 20, None, InvalidInput, "the body has 20 bytes after the JSON header; 'inputs\\[0\\]' declares 16"),
    ({"inputs": [{"name": "x", "shape": [1, F], "datatype": "FP32", "data": [1, 2, 3, 4],
                  "parameters": {"binary_data_size": 16}}]}, b"\0" * 16, None, InvalidInput, "both 'data' and"),
    ({"inputs": [{"name": "x", "shape": [1, F], "datatype": "FP32", "data": [1, 2, 3, 4]}]}, b"\0" * 4, None,
     InvalidInput, "4 bytes after the JSON header but no input declares"),
    ({"inputs": [{"name": "x", "shape": [1, F], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]},
     np.array([1, np.inf, 2, 3], "<f4").tobytes(), None, InvalidInput, r"value \[0\]\[1\] is inf"),
    ({"inputs": [{"name": "x", "shape": [1, F], "datatype": "FP64", "parameters": {"binary_data_size": 32}}]},
     np.array([1, 1e300, 2, 3], "<f8").tobytes(), None, InvalidInput, "within float32's range"),
    ({"inputs": []}, b"\0", "abc", BadRequest, "Inference-Header-Content-Length header is 'abc'"),
    ({"inputs": []}, b"", "99999", BadRequest, "a whole number from 1 to the body's"),
    ({"inputs": [{"name": "x", "shape": [1, F], "datatype": "FP32", "data": [1, 2, 3, 4]}],
      "parameters": {"binary_data_output": "yes"}}, b"", None, InvalidInput, "binary_data_output' must be true"),
    ({"inputs": [{"name": "x", "shape": [1, F], "datatype": "FP32", "data": [1, 2, 3, 4]}],
      "outputs": [{"name": "label", "parameters": {"binary_data": 1}}]}, b"", None, InvalidInput,
     r"'outputs\[0\].parameters.binary_data' must be true or false"),
])
def test_bad_binary_requests_name_the_problem(header, raw, length, error, message):
    body, size = _binary(header, raw)
    with pytest.raises(error, match=message):
        payload, rest = oip.split_body(body, str(size) if length is None else length, max_bytes=LIMIT)
        oip.parse_infer(payload, num_features=F, max_rows=8, binary=rest)


def test_server_metadata_is_the_specs():
    assert oip.server_metadata(version="1.2") == {"name": "mlray", "version": "1.2",
                                                  "extensions": ["binary_tensor_data"]}


# --- /invocations: CSV and Parquet, with MLflow's parsers as the oracle ----------------------------------------


@pytest.fixture(scope="module")
def mlflow_oracle():
    """MLflow's CSV and Parquet parsers and the input schema mlray logs (named double columns)."""
    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.pyfunc import scoring_server

    frame = pd.DataFrame(np.asarray(ROWS, dtype=np.float64), columns=FEATURES)
    return scoring_server, infer_signature(frame).inputs, frame


def oracle_csv(oracle, text: str) -> np.ndarray:
    scoring_server, schema, _ = oracle
    return scoring_server.parse_csv_input(io.StringIO(text), schema)[FEATURES].to_numpy(dtype=np.float32)


def csv_cases(frame):
    reordered = frame[[FEATURES[j] for j in (2, 0, 3, 1)]]
    return {
        "to_csv(index=False)": frame.to_csv(index=False),
        "to_csv() with its index": frame.to_csv(),
        "columns reordered": reordered.to_csv(index=False),
        "CRLF and a blank line": frame.to_csv(index=False, lineterminator="\r\n") + "\r\n",
        "integers": frame.round().astype(int).to_csv(index=False),
        "quoted header": frame.to_csv(index=False, quoting=1),
    }


@pytest.mark.parametrize("case", ["to_csv(index=False)", "to_csv() with its index", "columns reordered",
                                  "CRLF and a blank line", "integers", "quoted header"])
def test_csv_parses_as_mlflow_parses_it(mlflow_oracle, case):
    text = csv_cases(mlflow_oracle[2])[case]
    ours = parse_csv(text.encode(), feature_names=FEATURES, max_rows=8)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert np.array_equal(ours, oracle_csv(mlflow_oracle, text))
    # and through the content-type dispatch
    assert np.array_equal(parse_body(text.encode(), "text/csv; charset=utf-8", feature_names=FEATURES, max_rows=8,
                                     max_bytes=LIMIT), ours)


def test_csv_equals_the_json_answer(mlflow_oracle):
    frame = mlflow_oracle[2]
    split = frame.to_json(orient="split", index=False).encode()
    body = b'{"dataframe_split": ' + split + b"}"
    assert np.array_equal(parse_body(frame.to_csv(index=False).encode(), "text/csv", feature_names=FEATURES,
                                     max_rows=8, max_bytes=LIMIT),
                          parse_body(body, "application/json", feature_names=FEATURES, max_rows=8, max_bytes=LIMIT))


HEADER = ",".join(f'"{n}"' for n in FEATURES)


@pytest.mark.parametrize(("text", "error", "message"), [
    ("", BadRequest, "the CSV body is empty"),
    ("a,b,c,d\n1,2,3,4\n", InvalidInput, r"'csv header\[0\]' is \"a\" \(str\), not a feature"),
    (HEADER + "\n", InvalidInput, "'csv rows' is empty"),
    (HEADER + "\n1,2,3\n", InvalidInput, "csv row 1 has 3 fields; the header has 4"),
    (HEADER + "\n1,2,x,4\n", InvalidInput, r"'csv row 1, column \"petal length \(cm\)\"' must be a number"),
    (HEADER + "\n1,2,,4\n", InvalidInput, r"'csv row 1, column \"petal length \(cm\)\"' must be a number"),
    (HEADER + "\n1,2,nan,4\n", InvalidInput, "only finite numbers"),
    (HEADER + "\n1,2,1_000,4\n", InvalidInput, "must be a number"),
    (HEADER + "\n1,2,1e39,4\n", InvalidInput, "too large for float32"),
    (HEADER + "\n" + "1,2,3,4\n" * 9, PayloadTooLarge, "'csv rows' has 9 rows; the limit is 8"),
])
def test_bad_csv_names_the_problem(text, error, message):
    with pytest.raises(error, match=message):
        parse_csv(text.encode(), feature_names=FEATURES, max_rows=8)


def test_mlflow_refuses_what_we_refuse_in_csv(mlflow_oracle):
    from mlflow.exceptions import MlflowException

    for text in ("a,b,c,d\n1,2,3,4\n", HEADER + "\n1,2,x,4\n"):
        with pytest.raises((MlflowException, KeyError, ValueError)):
            oracle_csv(mlflow_oracle, text)


def test_parquet_parses_as_mlflow_parses_it(mlflow_oracle):
    scoring_server, _, frame = mlflow_oracle
    for table in (frame, frame[[FEATURES[j] for j in (3, 1, 0, 2)]], frame.set_index(FEATURES[0], drop=False)):
        data = table.to_parquet()
        theirs = scoring_server.parse_parquet_input(io.BytesIO(data))[FEATURES].to_numpy(dtype=np.float32)
        ours = parse_body(data, "application/vnd.apache.parquet", feature_names=FEATURES, max_rows=8, max_bytes=LIMIT)
        assert np.array_equal(ours, theirs) and np.array_equal(ours, expected())
    with pytest.raises(BadRequest, match="not a readable Parquet file"):
        parse_parquet(b"PAR1 not really", feature_names=FEATURES, max_rows=8)
    with pytest.raises(InvalidInput, match="lacks the feature"):
        parse_parquet(frame[FEATURES[:3]].to_parquet(), feature_names=FEATURES, max_rows=8)
    with pytest.raises(InvalidInput, match="is of type (large_)?string"):
        parse_parquet(frame.astype({FEATURES[1]: str}).to_parquet(), feature_names=FEATURES, max_rows=8)


def test_content_types():
    rows = b'{"instances": [[1, 2, 3, 4]]}'
    for content_type in (None, "application/json", "application/json; charset=UTF-8",
                         "application/x-www-form-urlencoded"):
        assert parse_body(rows, content_type, feature_names=FEATURES, max_rows=8, max_bytes=LIMIT).shape == (1, F)
    with pytest.raises(UnsupportedMediaType, match="charset is 'latin-1'"):
        parse_body(rows, "application/json; charset=latin-1", feature_names=FEATURES, max_rows=8, max_bytes=LIMIT)
    with pytest.raises(PayloadTooLarge):
        parse_body(b"x" * 2000, "text/csv", feature_names=FEATURES, max_rows=8, max_bytes=1024)
