"""The V2 and /invocations protocols: the same rows give the same array as V1, every bad body names its field,
and the shapes match the Open Inference Protocol spec and what MLflow's own scoring server says and parses."""

import copy
import io
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlray.errors import BadRequest, InvalidInput, MlrayError, PayloadTooLarge
from mlray.serving.http import mlflow_error, mlflow_error_code, render_error, status_for
from mlray.serving.oip import OUTPUTS as V2_OUTPUTS
from mlray.serving.oip import Request, infer_response
from mlray.serving.oip import model_metadata as v2_model_metadata
from mlray.serving.oip import parse_infer as parse_v2_infer
from mlray.serving.scoring import invocations_response, parse_invocations
from mlray.serving.validation import parse_json, parse_v1


def v2_status(err: MlrayError) -> int:
    return status_for("v2", err)


def mlflow_status(err: MlrayError) -> int:
    return status_for("mlflow", err)


def v2_infer_response(probs, classes, *, model_name, model_version, request_id, outputs):
    request = Request(id=request_id, x=np.zeros((len(probs), 1), np.float32), outputs=outputs)
    body, raw = infer_response(probs, classes, model_name=model_name, model_version=model_version, request=request)
    assert raw == b""  # nothing asked for as binary
    return body

FEATURES = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
F = len(FEATURES)
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3, 5.2, 2.3], [0.1, 1e-7, -2.5, 1234567.891]]
FLAT = [value for row in ROWS for value in row]
CLASSES = ["setosa", "versicolor", "virginica"]
SPEC_DATATYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                  "FP16", "FP32", "FP64", "BYTES"}


def via_json(payload):
    """Bodies go through the same JSON decoding the app uses."""
    return parse_json(json.dumps(payload).encode(), max_bytes=1_000_000)


def v2(payload, *, max_rows=8):
    return parse_v2_infer(via_json(payload), num_features=F, max_rows=max_rows)


def invocations(payload, *, max_rows=8):
    return parse_invocations(via_json(payload), feature_names=FEATURES, max_rows=max_rows)


def tensor(data, shape, datatype="FP32", **extra):
    return {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data, **extra}]}


def records(rows, names=FEATURES):
    return [dict(zip(names, row, strict=True)) for row in rows]


@pytest.fixture(scope="module")
def expected():
    return parse_v1(via_json({"instances": ROWS}), num_features=F, max_rows=8)


# --- the same rows, every protocol, the same array --------------------------------------------------------

REORDER = [2, 0, 3, 1]

V2_SAME = {
    "v2 flat [N, F]": tensor(FLAT, [3, F]),
    "v2 nested [N, F]": tensor(ROWS, [3, F]),
    "v2 FP64": tensor(FLAT, [3, F], "FP64"),
    "v2 FP16": tensor(FLAT, [3, F], "FP16"),
}
INVOCATIONS_SAME = {
    "split, no columns": {"dataframe_split": {"data": ROWS}},
    "split, columns": {"dataframe_split": {"columns": FEATURES, "data": ROWS}},
    "split, columns reordered": {"dataframe_split": {
        "columns": [FEATURES[j] for j in REORDER], "data": [[row[j] for j in REORDER] for row in ROWS]}},
    "split, pandas to_dict(orient='split')": {"dataframe_split": {"index": [0, 1, 2], "columns": FEATURES,
                                                                  "data": ROWS}},
    "records": {"dataframe_records": records(ROWS)},
    "records, keys in another order": {"dataframe_records": [{FEATURES[j]: row[j] for j in REORDER} for row in ROWS]},
    "instances rows": {"instances": ROWS},
    "instances records": {"instances": records(ROWS)},
    "inputs rows": {"inputs": ROWS},
    "inputs records": {"inputs": records(ROWS)},
    "inputs columns": {"inputs": {name: [row[j] for row in ROWS] for j, name in enumerate(FEATURES)}},
    "params are accepted": {"instances": ROWS, "params": {"temperature": 1}},
}


@pytest.mark.parametrize("payload", V2_SAME.values(), ids=V2_SAME.keys())
def test_v2_gives_the_v1_array(payload, expected):
    x = v2(payload).x
    assert x.dtype == np.float32 and x.shape == (3, F) and x.flags.c_contiguous
    assert np.array_equal(x, expected)


@pytest.mark.parametrize("payload", INVOCATIONS_SAME.values(), ids=INVOCATIONS_SAME.keys())
def test_invocations_give_the_v1_array(payload, expected):
    x = invocations(payload)
    assert x.dtype == np.float32 and x.shape == (3, F) and x.flags.c_contiguous
    assert np.array_equal(x, expected)


ONE_ROW = {
    "v2 flat [F]": lambda: v2(tensor(ROWS[0], [F])).x,
    "v2 flat [1, F]": lambda: v2(tensor(ROWS[0], [1, F])).x,
    "v2 nested [1, F]": lambda: v2(tensor([ROWS[0]], [1, F])).x,
    "inputs columns of scalars": lambda: invocations({"inputs": dict(zip(FEATURES, ROWS[0], strict=True))}),
    "instances one row": lambda: invocations({"instances": [ROWS[0]]}),
}


@pytest.mark.parametrize("make", ONE_ROW.values(), ids=ONE_ROW.keys())
def test_one_row(make, expected):
    assert np.array_equal(make(), expected[:1])


def test_v2_integer_datatypes_and_the_request_fields():
    request = v2({"id": "42", "parameters": {"content_type": "np"}, **tensor([[1, 2, 3, 4]], [1, F], "INT64"),
                  "outputs": [{"name": "label", "parameters": {"binary_data": True}}]})
    assert request.id == "42" and request.outputs == ["label"]
    assert request.x.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert v2(tensor([0, 255, 7, 9], [F], "UINT8")).x.tolist() == [[0.0, 255.0, 7.0, 9.0]]
    assert v2(tensor(FLAT, [3, F])).outputs is None and v2(tensor(FLAT, [3, F])).id is None
    assert v2({**tensor(FLAT, [3, F]), "outputs": []}).outputs is None  # none requested: all of them


def test_large_requests_agree_with_v1_and_name_bad_values():
    rows = np.random.default_rng(0).normal(0, 1e3, size=(300, F)).tolist()  # > 128 values: numpy's checks
    flat = [value for row in rows for value in row]
    v1 = parse_v1({"instances": rows}, num_features=F, max_rows=300)
    assert np.array_equal(parse_v2_infer(tensor(flat, [300, F]), num_features=F, max_rows=300).x, v1)
    assert np.array_equal(parse_invocations({"dataframe_records": records(rows)}, feature_names=FEATURES,
                                            max_rows=300), v1)
    flat[1002] = 1e39
    with pytest.raises(InvalidInput, match=r"'inputs\[0\].data\[1002\]' is 1e\+39 \(float\), too large"):
        parse_v2_infer(tensor(flat, [300, F]), num_features=F, max_rows=300)
    rows[250][2] = math.nan
    with pytest.raises(InvalidInput, match=r"'instances\[250\]\[2\]' is nan; only finite numbers"):
        parse_invocations({"instances": rows}, feature_names=FEATURES, max_rows=300)


def test_tritonclient_and_kserve_bodies():
    # tritonclient.http with binary_data=False, and KServe's InferRequest.to_rest(): any input name is fine
    triton = {"inputs": [{"name": "INPUT0", "shape": [1, F], "datatype": "FP32", "data": ROWS[0]}],
              "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}]}
    kserve = {"id": "a1b2", "inputs": [{"name": "input-0", "shape": [1, F], "datatype": "FP32",
                                        "data": [ROWS[0]], "parameters": {}}]}
    assert np.array_equal(v2(triton).x, v2(kserve).x)


# --- bad bodies name the field ----------------------------------------------------------------------------

V2_BAD = [
    ([1, 2], BadRequest, "must be a JSON object with 'inputs'"),
    ({}, InvalidInput, "no 'inputs' field"),
    ({"instances": ROWS}, InvalidInput, r"no 'inputs' field \(got fields \['instances'\]\)"),
    ({"inputs": {"name": "input"}}, InvalidInput, "'inputs' must be a list of exactly one tensor"),
    ({"inputs": []}, InvalidInput, "got 0 tensors"),
    ({"inputs": tensor(FLAT, [3, F])["inputs"] * 2}, InvalidInput, "got 2 tensors"),
    ({"inputs": [5]}, InvalidInput, r"'inputs\[0\]' must be an object"),
    ({"id": 42, **tensor(FLAT, [3, F])}, InvalidInput, "'id' must be a string, got 42"),
    ({"parameters": [1], **tensor(FLAT, [3, F])}, InvalidInput, "'parameters' must be an object"),
    (tensor(FLAT, [3, F], parameters="x"), InvalidInput, r"'inputs\[0\].parameters' must be an object"),
    ({"inputs": [{"shape": [F], "datatype": "FP32", "data": ROWS[0]}]}, InvalidInput,
     r"'inputs\[0\].name' must be a string .* got null"),
    (tensor(["a", "b", "c", "d"], [F], "BYTES"), InvalidInput,
     r"'inputs\[0\].datatype' is \"BYTES\" \(str\) \(this model takes numbers\)"),
    (tensor([True] * 4, [F], "BOOL"), InvalidInput, r"'inputs\[0\].datatype' is \"BOOL\".*takes numbers"),
    (tensor(ROWS[0], [F], "fp32"), InvalidInput, r"'inputs\[0\].datatype' is \"fp32\".*expected one of \['FP32'"),
    (tensor(ROWS[0], None), InvalidInput, r"'inputs\[0\].shape' is null .*expected \[N, 4\] or \[4\]"),
    (tensor(ROWS[0], [1, 1, F]), InvalidInput, r"'inputs\[0\].shape' is \[1, 1, 4\]"),
    (tensor(ROWS[0] + [1], [1, 5]), InvalidInput, r"'inputs\[0\].shape' is \[1, 5\]: 5 features"),
    (tensor(ROWS[0], [1.5, F]), InvalidInput, r"'inputs\[0\].shape\[0\]' is 1.5 \(float\)"),
    (tensor(ROWS[0], [-1, F]), InvalidInput, r"'inputs\[0\].shape\[0\]' is -1"),
    (tensor(ROWS[0], [True, F]), InvalidInput, r"'inputs\[0\].shape\[0\]' is true"),
    (tensor([], [0, F]), InvalidInput, r"'inputs\[0\].shape' is \[0, 4\], no rows"),
    (tensor(ROWS[0] * 9, [9, F]), PayloadTooLarge, r"'inputs\[0\].shape' is \[9, 4\]: 9 rows; the limit is 8"),
    ({"inputs": [{"name": "x", "shape": [F], "datatype": "FP32"}]}, InvalidInput,
     r"'inputs\[0\].data' must be a list of numbers, got null"),
    ({"inputs": [{"name": "x", "shape": [F], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]},
     InvalidInput, r"the body has 0 bytes after the JSON header; .inputs\[0\]. declares 16"),
    (tensor(FLAT[:7], [2, F]), InvalidInput, r"'inputs\[0\].data' has 7 values; shape \[2, 4\] needs 8"),
    (tensor(ROWS, [2, F]), InvalidInput, r"'inputs\[0\].data' has 3 rows; the shape \[2, 4\] says 2"),
    (tensor([ROWS[0], ROWS[1][:3]], [2, F]), InvalidInput, r"'inputs\[0\].data\[1\]' has 3 values"),
    (tensor([ROWS[0], 5], [2, F]), InvalidInput, r"'inputs\[0\].data\[1\]' must be a list of 4 numbers"),
    (tensor([ROWS[0]], [F]), InvalidInput, r"nested rows but the shape \[4\] has one dimension"),
    (tensor([1, 2, "x", 4], [F]), InvalidInput, r"'inputs\[0\].data\[2\]' must be a number, got \"x\" \(str\)"),
    (tensor([1, 2, True, 4], [F]), InvalidInput, r"'inputs\[0\].data\[2\]' must be a number, got true"),
    (tensor([1, 2, None, 4], [F]), InvalidInput, r"'inputs\[0\].data\[2\]' must be a number, got null"),
    (tensor([ROWS[0], [1, 2, [3], 4]], [2, F]), InvalidInput, r"'inputs\[0\].data\[1\]\[2\]' must be a number"),
    (tensor([1, 2, 3, 1e39], [F]), InvalidInput, r"'inputs\[0\].data\[3\]' is 1e\+39 \(float\), too large for float32"),
    (tensor([1, 2, 3.5, 4], [F], "INT32"), InvalidInput, r"'inputs\[0\].data\[2\]' is 3.5; an integer datatype"),
    (tensor([1, 2, 300, 4], [F], "UINT8"), InvalidInput,
     r"'inputs\[0\].data\[2\]' is 300 \(int\); the datatype holds 0..255"),
    (tensor([1, -129, 3, 4], [F], "INT8"), InvalidInput, r"'inputs\[0\].data\[1\]' is -129.*-128..127"),
    ({**tensor(ROWS[0], [F]), "outputs": [{"name": "logits"}]}, InvalidInput,
     r"'outputs\[0\].name' is \"logits\" \(str\); this model's outputs are \['probabilities', 'label'\]"),
    ({**tensor(ROWS[0], [F]), "outputs": [{"name": "label"}, {"name": "label"}]}, InvalidInput,
     r"'outputs\[1\].name' 'label' is requested twice"),
    ({**tensor(ROWS[0], [F]), "outputs": "label"}, InvalidInput, "'outputs' must be a list"),
    ({**tensor(ROWS[0], [F]), "outputs": ["label"]}, InvalidInput, r"'outputs\[0\]' must be an object"),
]


@pytest.mark.parametrize(("payload", "error", "message"), V2_BAD, ids=[m[:40] for _, _, m in V2_BAD])
def test_v2_bad_requests_name_the_field(payload, error, message):
    with pytest.raises(error, match=message):
        v2(payload)


HUGE = "1" + "0" * 400  # JSON numbers have no size limit; this one is beyond float64 too


def v2_body(datatype, data):
    return '{"inputs": [{"name": "x", "shape": [4], "datatype": "%s", "data": %s}]}' % (datatype, data)  # noqa: UP031


@pytest.mark.parametrize(("body", "message"), [
    ('{"instances": [[1, 2, 3, ' + HUGE + "]]}", r"'instances\[0\]\[3\]' is 1000.* \(int\), too large for float32"),
    (v2_body("FP64", f"[1, {HUGE}, 3, 4]"), r"'inputs\[0\].data\[1\]' is 1000.* \(int\), too large for float32"),
    (v2_body("INT64", f"[1, {HUGE}, 3, 4]"), r"'inputs\[0\].data\[1\]' is 1000.* \(int\); the datatype holds -92"),
])
def test_integers_beyond_float64_are_named_not_a_crash(body, message):
    payload = parse_json(body.encode(), max_bytes=10_000)
    parse = parse_invocations if "instances" in payload else parse_v2_infer
    kwargs = {"feature_names": FEATURES} if "instances" in payload else {"num_features": F}
    with pytest.raises(InvalidInput, match=message):
        parse(payload, max_rows=8, **kwargs)


def test_v2_values_that_json_cannot_carry():
    with pytest.raises(InvalidInput, match="NaN is not a number"):
        parse_json(b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', max_bytes=999)
    with pytest.raises(InvalidInput, match=r"'inputs\[0\].data\[1\]' is nan; only finite numbers"):
        parse_v2_infer(tensor([1.0, math.nan, 3.0, 4.0], [F]), num_features=F, max_rows=8)
    with pytest.raises(InvalidInput, match=r"'inputs\[0\].data\[0\]\[3\]' is inf; only finite"):
        parse_v2_infer(tensor([[1.0, 2.0, 3.0, math.inf]], [1, F]), num_features=F, max_rows=8)


COLS = {name: [row[j] for row in ROWS[:2]] for j, name in enumerate(FEATURES)}

MLFLOW_BAD = [
    ([ROWS], BadRequest, r"must be a JSON object with exactly one of the fields \['dataframe_split'"),
    ({}, InvalidInput, r"exactly one of the input fields \['dataframe_split', 'dataframe_records', 'instances', "
                       r"'inputs'\]; got fields \[\]"),
    ({"instances": ROWS, "inputs": ROWS}, InvalidInput,
     r"exactly one of the input fields .* \['inputs', 'instances'\]"),
    ({"data": ROWS}, InvalidInput, r"exactly one of the input fields .*got fields \['data'\]"),
    ({"instances": ROWS, "params": [1]}, InvalidInput, "'params' must be an object"),
    ({"dataframe_split": ROWS}, InvalidInput, r"'dataframe_split' must be an object"),
    ({"dataframe_split": {"data": ROWS, "dtype": "f4"}}, InvalidInput,
     "'dataframe_split' has the unknown field 'dtype'"),
    ({"dataframe_split": {"columns": FEATURES}}, InvalidInput, "'dataframe_split' has no 'data'"),
    ({"dataframe_split": {"columns": "abc", "data": ROWS}}, InvalidInput,
     "'dataframe_split.columns' must be a list of column names"),
    ({"dataframe_split": {"columns": [*FEATURES[:3], "petal_width"], "data": ROWS}}, InvalidInput,
     r"'dataframe_split.columns\[3\]' is \"petal_width\" \(str\), not a feature of this model; expected names "
     r"from \[\"sepal length \(cm\)\""),
    ({"dataframe_split": {"columns": [0, 1, 2, 3], "data": ROWS}}, InvalidInput,
     r"'dataframe_split.columns\[0\]' is 0 \(int\), not a feature"),
    ({"dataframe_split": {"columns": [*FEATURES[:3], FEATURES[0]], "data": ROWS}}, InvalidInput,
     r"'dataframe_split.columns\[3\]' 'sepal length \(cm\)' repeats 'dataframe_split.columns\[0\]'"),
    ({"dataframe_split": {"columns": FEATURES[:3], "data": [r[:3] for r in ROWS]}}, InvalidInput,
     r"'dataframe_split.columns' lacks the feature\(s\) \[\"petal width \(cm\)\"\]"),
    ({"dataframe_split": {"data": [ROWS[0][:3]]}}, InvalidInput,
     r"'dataframe_split.data\[0\]' has 3 features; the model expects 4"),
    ({"dataframe_split": {"data": ROWS, "index": [0]}}, InvalidInput,
     r"'dataframe_split.index' must be a list with one entry per row \(3\), got 1 entries"),
    ({"dataframe_records": {"a": 1}}, InvalidInput, "'dataframe_records' must be a list of records"),
    ({"dataframe_records": []}, InvalidInput, "'dataframe_records' is empty"),
    ({"dataframe_records": [records(ROWS)[0], ROWS[1]]}, InvalidInput, r"'dataframe_records\[1\]' must be a record"),
    ({"dataframe_records": records([r[:3] for r in ROWS], FEATURES[:3])}, InvalidInput,
     r"'dataframe_records\[0\]' has no column \"petal width \(cm\)\" \(1 missing\)"),
    ({"dataframe_records": [{**records(ROWS)[0], "id": 7}]}, InvalidInput,
     r"'dataframe_records\[0\]' has the column \"id\" \(str\), not a feature"),
    ({"dataframe_records": [records(ROWS)[0], {**records(ROWS)[1], FEATURES[3]: "2.3"}]}, InvalidInput,
     r"'dataframe_records\[1\]\[\"petal width \(cm\)\"\]' must be a number, got \"2.3\""),
    ({"dataframe_records": records(ROWS * 3)}, PayloadTooLarge, "'dataframe_records' has 9 rows; the limit is 8"),
    ({"instances": []}, InvalidInput, "'instances' is empty"),
    ({"instances": [ROWS[0][:3]]}, InvalidInput, r"'instances\[0\]' has 3 features; the model expects 4"),
    ({"instances": ROWS[0]}, InvalidInput, r"'instances\[0\]' must be a list of 4 numbers, got 5.1"),
    ({"instances": ROWS * 3}, PayloadTooLarge, "'instances' has 9 rows; the limit is 8"),
    ({"instances": [records(ROWS)[0], ROWS[1]]}, InvalidInput, r"'instances\[1\]' must be a record"),
    ({"inputs": {k: v for k, v in COLS.items() if k != FEATURES[1]}}, InvalidInput,
     r"'inputs' has no column \"sepal width \(cm\)\""),
    ({"inputs": {**COLS, FEATURES[1]: [1.0]}}, InvalidInput,
     r"'inputs\[\"sepal width \(cm\)\"\]' must be a list of 2 values, as 'inputs\[\"sepal length \(cm\)\"\]' "
     r"is, got 1 values"),
    ({"inputs": {**COLS, FEATURES[2]: 1.0}}, InvalidInput, r"'inputs\[\"petal length \(cm\)\"\]' must be a list"),
    ({"inputs": {**COLS, FEATURES[2]: [1.0, None]}}, InvalidInput,
     r"'inputs\[\"petal length \(cm\)\"\]\[1\]' must be a number, got null"),
    ({"inputs": {name: [] for name in FEATURES}}, InvalidInput, "'inputs' has no rows"),
    ({"inputs": {name: [1.0] * 9 for name in FEATURES}}, PayloadTooLarge, "'inputs' has 9 rows; the limit is 8"),
    ({"inputs": {**dict(zip(FEATURES, ROWS[0], strict=True)), FEATURES[0]: "5.1"}}, InvalidInput,
     r"'inputs\[\"sepal length \(cm\)\"\]' must be a number, got \"5.1\""),
    ({"inputs": "abc"}, InvalidInput, r"'inputs' must be a list of rows"),
    ({"dataframe_records": [{**records(ROWS)[0], FEATURES[0]: 1e39}]}, InvalidInput,
     r"'dataframe_records\[0\]\[\"sepal length \(cm\)\"\]' is 1e\+39 \(float\), too large for float32"),
]


@pytest.mark.parametrize(("payload", "error", "message"), MLFLOW_BAD, ids=[m[:40] for _, _, m in MLFLOW_BAD])
def test_invocations_bad_requests_name_the_field(payload, error, message):
    with pytest.raises(error, match=message):
        invocations(payload)


def test_status_for_each_protocol():
    # V2: "a failed inference request must be indicated by an HTTP error status (typically 400)".
    # MLflow: its scoring server answers 400 (BAD_REQUEST) to any input it cannot use.
    for status in (v2_status, mlflow_status):
        assert status(InvalidInput("x")) == 400
        assert status(BadRequest("x")) == 400
        assert status(PayloadTooLarge("x")) == 413


# --- response and metadata shapes (Open Inference Protocol, inference_rest.md) -----------------------------

PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)


def assert_spec_tensor(out):
    required = {"name", "shape", "datatype", "data"}
    assert required <= set(out) <= required | {"parameters"}
    assert out["datatype"] in SPEC_DATATYPES
    assert all(isinstance(d, int) and d >= 0 for d in out["shape"])
    assert len(out["data"]) == math.prod(out["shape"])  # flat, row-major


def test_v2_response_follows_the_spec():
    body = v2_infer_response(PROBS, CLASSES, model_name="iris", model_version="3", request_id="42", outputs=None)
    assert list(body) == ["model_name", "model_version", "id", "outputs"]
    assert (body["model_name"], body["model_version"], body["id"]) == ("iris", "3", "42")
    probabilities, label = body["outputs"]
    for out in body["outputs"]:
        assert_spec_tensor(out)
    assert probabilities == {"name": "probabilities", "datatype": "FP32", "shape": [2, 3],
                             "data": PROBS.reshape(-1).tolist()}
    assert label == {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["setosa", "virginica"]}
    # V2's numbers are V1's numbers: the data reshaped is the V1 body's "predictions"
    assert np.array(probabilities["data"]).reshape(2, 3).tolist() == PROBS.tolist()
    json.dumps(body, allow_nan=False)  # JSON as Starlette's JSONResponse would render it


def test_v2_response_outputs_select_and_order():
    def names(outputs, request_id=None):
        body = v2_infer_response(PROBS, CLASSES, model_name="m", model_version="1", request_id=request_id,
                                 outputs=outputs)
        return [out["name"] for out in body["outputs"]], "id" in body

    assert names(None) == (list(V2_OUTPUTS), False)
    assert names(["label"], "7") == (["label"], True)
    assert names(["label", "probabilities"]) == (["label", "probabilities"], False)
    with pytest.raises(InvalidInput, match=r"'outputs\[1\].name' is \"logits\".*\['probabilities', 'label'\]"):
        names(["label", "logits"])
    with pytest.raises(ValueError, match="do not fit 2 classes"):
        v2_infer_response(PROBS, CLASSES[:2], model_name="m", model_version="1", request_id=None, outputs=None)


def test_v2_metadata_and_error_shapes():
    meta = v2_model_metadata(name="iris", version="3", num_features=F, class_names=CLASSES)
    assert meta == {
        "name": "iris", "versions": ["3"], "platform": "mlray_pytorch",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}],
    }
    for t in meta["inputs"] + meta["outputs"]:  # $metadata_tensor: exactly name, datatype, shape
        assert set(t) == {"name", "datatype", "shape"} and t["datatype"] in SPEC_DATATYPES
    assert [out["name"] for out in meta["outputs"]] == list(V2_OUTPUTS)
    status, body, _ = render_error("v2", InvalidInput("'inputs[0].shape' is [1, 5]"))
    assert (status, body) == (400, {"error": "'inputs[0].shape' is [1, 5]"})


# --- against MLflow's own scoring server code ---------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server():
    """MLflow's scoring-server module and the input schema mlray logs (tracking.log_model: named double columns)."""
    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.pyfunc import scoring_server

    frame = pd.DataFrame(np.asarray(ROWS, dtype=np.float64), columns=FEATURES)
    return scoring_server, infer_signature(frame, PROBS[:1].repeat(3, axis=0)).inputs


@pytest.mark.parametrize("probs", [PROBS, PROBS[:1], PROBS.astype(np.float64)], ids=["fp32", "one row", "fp64"])
def test_invocations_response_is_what_mlflow_writes(mlflow_server, probs):
    scoring_server, _ = mlflow_server
    written = io.StringIO()
    scoring_server.predictions_to_json(probs, written)
    assert json.dumps(invocations_response(probs)) == written.getvalue()  # byte for byte, with json's defaults
    assert json.loads(written.getvalue()) == {"predictions": probs.tolist()}


def test_mlflow_error_is_what_mlflow_serializes():
    from mlflow.exceptions import HTTP_STATUS_TO_ERROR_CODE, MlflowException
    from mlflow.protos.databricks_pb2 import ErrorCode
    from mlflow.utils.proto_json_utils import MlflowInvalidInputException

    for code in ("BAD_REQUEST", "INVALID_PARAMETER_VALUE", "ENDPOINT_NOT_FOUND", "RESOURCE_DOES_NOT_EXIST",
                 "PERMISSION_DENIED", "UNAUTHENTICATED", "INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE",
                 "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"):
        theirs = MlflowException("'instances[0]' has 3 features", error_code=ErrorCode.Value(code))
        assert json.dumps(mlflow_error("'instances[0]' has 3 features", error_code=code)) == theirs.serialize_as_json()
        status = theirs.get_http_status_code()
        assert mlflow_error_code(status) == HTTP_STATUS_TO_ERROR_CODE[status]
    for status, code in HTTP_STATUS_TO_ERROR_CODE.items():
        assert mlflow_error_code(status) == code
    assert mlflow_error_code(413) == "BAD_REQUEST" and mlflow_error_code(418) == "INTERNAL_ERROR"
    # MLflow's own input errors: BAD_REQUEST, 400; no stack trace in the body
    theirs = MlflowInvalidInputException("x")
    assert theirs.get_http_status_code() == mlflow_status(InvalidInput("x")) == 400
    assert "stack_trace" not in json.loads(theirs.serialize_as_json())


def mlflow_parses(mlflow_server, payload):
    """What ``mlflow models serve`` hands the model for this body, as (N, F) in the signature's column order."""
    from mlflow.models.utils import _enforce_schema

    scoring_server, schema = mlflow_server
    frame = _enforce_schema(scoring_server.infer_and_parse_data(copy.deepcopy(payload), schema), schema)
    return frame[FEATURES].to_numpy(dtype=np.float32)


NAMED = ["split, columns", "split, columns reordered", "split, pandas to_dict(orient='split')", "records",
         "records, keys in another order", "instances records", "inputs records", "inputs columns"]


@pytest.mark.parametrize("case", NAMED)
def test_named_formats_parse_as_mlflow_parses_them(mlflow_server, case):
    payload = INVOCATIONS_SAME[case]
    assert np.array_equal(mlflow_parses(mlflow_server, payload), invocations(payload))


def test_positional_rows_are_a_superset_of_mlflow(mlflow_server, expected):
    # mlflow models serve refuses rows without column names for a model with a named signature (mlray's);
    # mlray takes them in the model's feature order, as its V1 route does.
    from mlflow.exceptions import MlflowException

    for payload in ({"instances": ROWS}, {"inputs": ROWS}, {"dataframe_split": {"data": ROWS}}):
        with pytest.raises(MlflowException, match="Model is missing inputs"):
            mlflow_parses(mlflow_server, payload)
        assert np.array_equal(invocations(payload), expected)


@pytest.mark.parametrize("payload", [
    {}, {"instances": ROWS, "inputs": ROWS}, {"data": ROWS}, {"dataframe_split": ROWS},
    {"dataframe_split": {"data": ROWS, "dtype": "f4"}}, {"dataframe_records": {"a": [1]}},
], ids=["no format", "two formats", "old format", "split is a list", "split extra key", "records not a list"])
def test_bodies_mlflow_refuses_are_refused_with_its_status(mlflow_server, payload):
    from mlflow.exceptions import MlflowException

    scoring_server, schema = mlflow_server
    with pytest.raises(MlflowException) as theirs:
        scoring_server.infer_and_parse_data(copy.deepcopy(payload), schema)
    with pytest.raises(MlrayError) as ours:
        invocations(payload)
    assert mlflow_status(ours.value) == theirs.value.get_http_status_code() == 400


# --- any JSON body: an array or an MlrayError, never anything else ---------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["input", "FP32", "INT8", "BYTES", *FEATURES]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.sampled_from(["inputs", "name", "shape", "datatype", "data", "outputs", "id", "parameters", "columns",
                         "index", "dataframe_split", "dataframe_records", "instances", "params", *FEATURES]),
        inner, max_size=5),
    max_leaves=30,
)
VALUE = st.floats(-1e40, 1e40) | st.integers(-300, 300) | st.just(-(10**400)) | st.none() | st.text(max_size=2)
ROW = st.lists(VALUE, min_size=F, max_size=F)
NEAR_V2 = st.builds(lambda rows, shape, dt: tensor(rows, shape, dt), st.lists(ROW, min_size=1, max_size=3),
                    st.lists(st.integers(-1, 5), min_size=1, max_size=3), st.sampled_from(["FP32", "INT8", "UINT8"]))
NEAR_MLFLOW = st.lists(ROW, min_size=1, max_size=3).flatmap(lambda rows: st.sampled_from([
    {"instances": rows}, {"dataframe_split": {"columns": FEATURES, "data": rows}},
    {"dataframe_records": records(rows)}, {"inputs": {n: [r[j] for r in rows] for j, n in enumerate(FEATURES)}},
]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=JSON | NEAR_V2 | NEAR_MLFLOW)
def test_any_body_gives_an_array_or_an_mlray_error(body):
    for parse in (lambda b: parse_v2_infer(b, num_features=F, max_rows=2).x,
                  lambda b: parse_invocations(b, feature_names=FEATURES, max_rows=2)):
        try:
            x = parse(copy.deepcopy(body))
        except MlrayError as err:
            assert str(err) and v2_status(err) in (400, 413) and mlflow_status(err) in (400, 413)
        else:
            assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == F and 1 <= len(x) <= 2
            assert np.isfinite(x).all()
