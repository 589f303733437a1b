"""The route table, the prediction core and the whole ASGI app, without Ray: a small real model behind the real
routes, middlewares, error renderer and OpenAPI document."""

from __future__ import annotations

import asyncio
import copy
import json

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

from mlray.artifact import LoadedModel
from mlray.errors import InvalidInput, NotFound
from mlray.models import ModelSpec, build
from mlray.serving import routes
from mlray.serving.app import build_api
from mlray.serving.auth import KeyGuard, hash_key
from mlray.serving.config import ServeAppConfig
from mlray.serving.core import Call, PredictionCore
from mlray.serving.fastpath import match
from tests.unit.serving_app import CLASSES, FEATURES, KEY, Versions, make_app, served_model

AUTH = {"Authorization": f"Bearer {KEY}"}
ROWS = np.random.default_rng(0).uniform(0, 16, size=(5, len(FEATURES))).round(2).tolist()


@pytest.fixture(params=[True, False], ids=["fast path", "FastAPI"])
def client(request):
    app, core = make_app(auth=True, fast_path=request.param)
    return TestClient(app)


# -- the table and what is derived from it -----------------------------------------------------------------


def test_the_table_is_the_one_source():
    assert routes.PREDICTION_PATH_ENDS == (":predict", "/infer", "/invocations")
    for route in routes.ROUTES:
        concrete = route.path.replace("{name}", "digits")
        assert routes.match(route.method, concrete) == (route, {"name": "digits"} if "{" in route.path else {})
        assert routes.is_public(concrete) is route.public
        assert routes.protocol_of(concrete) == route.kind
        assert (match(concrete) is not None) is (route.fast and route.method == "POST")
    assert routes.is_public("/openapi.json") and not routes.is_public("/v1/nothing")
    assert routes.protocol_of("/v2/nothing") == "v2" and routes.protocol_of("/nothing") == "other"
    # a name never holds ":" or "/": GET on the predict path is that route's wrong method, not a model's metadata
    assert routes.match("GET", "/v1/models/digits:predict") is None
    assert routes.match("POST", "/v1/models/a/b:predict") is None


def test_the_access_log_is_the_apps_setting_and_survives_a_logging_config_beside_it():
    """Serve's per-request access line is off unless the app asks for it; a ``logging_config`` passed with
    the deployment options (a log level, say) changes what it names and keeps the app's access-log choice."""
    from mlray.serving.app import application

    def logging_config(args, override=None):
        app = application({"model": "digits", **args}, deployment_options_override=override)
        return app._bound_deployment._deployment_config.logging_config  # what Serve's controller receives

    assert logging_config({})["enable_access_log"] is False
    assert logging_config({"access_log": True})["enable_access_log"] is True
    debug = logging_config({"access_log": True}, {"logging_config": {"log_level": "DEBUG"}})
    assert (debug["log_level"], debug["enable_access_log"]) == ("DEBUG", True)
    assert logging_config({}, {"logging_config": {"enable_access_log": True}})["enable_access_log"] is True
    assert logging_config({}, {"logging_config": None})["enable_access_log"] is False  # `logging_config:` left empty


def test_every_table_route_is_registered_once():
    app, _ = make_app()
    registered = {(method, getattr(r, "path", "")) for r in app.routes for method in getattr(r, "methods", ()) or ()}
    for route in routes.ROUTES:
        assert (route.method, route.fastapi_path) in registered


# -- the app, end to end ------------------------------------------------------------------------------------


def test_every_protocol_answers_the_same(client):
    v1 = client.post("/v1/models/digits:predict", json={"instances": ROWS}, headers=AUTH)
    assert v1.status_code == 200 and v1.headers["x-model-version"] == "3"
    expected = np.asarray(v1.json()["predictions"])
    v2 = client.post("/v2/models/digits/infer", headers=AUTH, json={
        "id": "a", "inputs": [{"name": "input", "shape": [5, len(FEATURES)], "datatype": "FP32",
                               "data": np.asarray(ROWS).reshape(-1).tolist()}]})
    assert v2.status_code == 200 and v2.json()["id"] == "a"
    np.testing.assert_allclose(np.asarray(v2.json()["outputs"][0]["data"]).reshape(5, 3), expected, atol=1e-6)
    csv = ",".join(FEATURES) + "\n" + "\n".join(",".join(str(v) for v in row) for row in ROWS) + "\n"
    answer = client.post("/invocations", content=csv, headers={**AUTH, "content-type": "text/csv"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == client.post("/invocations", json={"instances": ROWS},
                                                       headers=AUTH).json()["predictions"]
    np.testing.assert_allclose(np.asarray(answer.json()["predictions"]), expected, atol=1e-6)


def test_binary_data_extension_through_the_app(client):
    httpclient = pytest.importorskip("tritonclient.http")
    x = np.asarray(ROWS, dtype=np.float32)
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # binary, tritonclient's default
    body, json_size = httpclient.InferenceServerClient.generate_request_body([tensor])
    answer = client.post("/v2/models/digits/infer", content=body,
                         headers={**AUTH, "Inference-Header-Content-Length": str(json_size)})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    result = httpclient.InferenceServerClient.parse_response_body(
        answer.content, header_length=int(answer.headers["inference-header-content-length"]))
    v1 = client.post("/v1/models/digits:predict", json={"instances": ROWS}, headers=AUTH).json()
    np.testing.assert_allclose(result.as_numpy("probabilities"), np.asarray(v1["predictions"]), atol=1e-6)
    assert [label.decode() for label in result.as_numpy("label")] == v1["labels"]


def test_errors_in_each_protocols_shape(client):
    bad_v1 = client.post("/v1/models/digits:predict", json={"instances": [[1.0]]}, headers=AUTH)
    assert bad_v1.status_code == 422 and "1 features" in bad_v1.json()["error"]
    bad_v2 = client.post("/v2/models/digits/infer", json={"inputs": []}, headers=AUTH)
    assert bad_v2.status_code == 400 and set(bad_v2.json()) == {"error"}
    bad_csv = client.post("/invocations", content="x,y\n1,2\n", headers={**AUTH, "content-type": "text/csv"})
    assert bad_csv.status_code == 400 and bad_csv.json()["error_code"] == "BAD_REQUEST"
    latin = client.post("/invocations", content="{}", headers={**AUTH, "content-type": "text/csv; charset=latin-1"})
    assert latin.status_code == 415
    wrong = client.get("/v1/models/digits:predict", headers=AUTH)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    missing = client.get("/v2/models/other", headers=AUTH)
    assert missing.status_code == 404 and "'other' is not served here" in missing.json()["error"]
    anonymous = client.post("/invocations", json={})
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    assert anonymous.json()["error_code"] == "UNAUTHENTICATED"
    assert client.post("/invocations", json={}, headers={"Authorization": "Bearer no"}).status_code == 403
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2", headers=AUTH).json()["extensions"] == ["binary_tensor_data"]


def test_openapi_describes_every_route_its_bodies_and_its_errors():
    app, _ = make_app(auth=True)
    doc = TestClient(app).get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "an mlray API key: Authorization: Bearer <key>"}
    for route in routes.ROUTES:
        op = doc["paths"][route.path][route.method.lower()]
        assert ("security" in op) is not route.public
        assert {"401", "403"} <= set(op["responses"]) or route.public
    v1 = doc["paths"]["/v1/models/{name}:predict"]["post"]
    row = v1["requestBody"]["content"]["application/json"]["schema"]["properties"]["instances"]["items"]
    assert row["minItems"] == row["maxItems"] == len(FEATURES)
    assert {"400", "404", "413", "422", "503", "504"} <= set(v1["responses"])
    mlflow = doc["paths"]["/invocations"]["post"]
    assert set(mlflow["requestBody"]["content"]) == {"application/json", "text/csv"}
    assert mlflow["responses"]["400"]["content"]["application/json"]["schema"]["required"] == ["error_code", "message"]
    assert v1["parameters"][0]["schema"]["enum"] == ["digits"]
    open_app, _ = make_app(auth=False)
    assert "components" not in TestClient(open_app).get("/openapi.json").json()


def test_adding_a_route_is_one_entry(monkeypatch):
    """A new route in the table is served, protected by the API key and documented, with nothing else edited."""

    class Core(PredictionCore):
        async def echo(self, call: Call):
            return {"model": call.params["name"], "body": (await call.read_body()).decode()}, {"x-echo": "1"}

    extra = routes.Route("POST", "/v1/models/{name}:echo", "v1", "echo", "Echo the body")
    monkeypatch.setattr(routes, "ROUTES", (*routes.ROUTES, extra))
    routes.lookup.cache_clear()
    try:
        cfg = ServeAppConfig.model_validate({"model": "digits"})
        core = Core(cfg, Versions({"champion": served_model()}))
        guard = KeyGuard()
        guard.configure(enabled=True, hashes=[hash_key(KEY)])
        client = TestClient(build_api(core=lambda: core, guard=lambda: guard, fast=lambda: core))
        served = client.post("/v1/models/digits:echo", content=b"hello", headers=AUTH)
        assert served.status_code == 200 and served.json() == {"model": "digits", "body": "hello"}
        assert served.headers["x-echo"] == "1"
        assert client.post("/v1/models/digits:echo", content=b"hello").status_code == 401
        assert client.get("/v1/models/digits:echo", headers=AUTH).headers["allow"] == "POST"
        doc = client.get("/openapi.json").json()
        op = doc["paths"]["/v1/models/{name}:echo"]["post"]
        assert op["summary"] == "Echo the body" and op["security"] == [{"apiKey": []}]
    finally:
        routes.lookup.cache_clear()


# -- the core, alone ----------------------------------------------------------------------------------------


def _call(core: PredictionCore, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    route, params = routes.match(method, path)

    async def read() -> bytes:
        return body

    return asyncio.run(core.answer(Call(route, params, headers or {}, read)))


def test_core_splits_by_sticky_key_and_records_shadows():
    champion, challenger = served_model(3, seed=0), served_model(4, seed=1)
    versions = Versions({"champion": champion, "challenger": challenger})
    split = PredictionCore(ServeAppConfig.model_validate(
        {"model": "digits", "challenger": {"mode": "split", "weight": 0.5}}), versions)
    body = json.dumps({"instances": ROWS[:1]}).encode()
    seen = {key: _call(split, "POST", "/v1/models/digits:predict", body, {"x-mlray-key": key})[1]["x-model-role"]
            for key in map(str, range(40))}
    assert set(seen.values()) == {"champion", "challenger"}
    again = {key: _call(split, "POST", "/v1/models/digits:predict", body, {"x-mlray-key": key})[1]["x-model-role"]
             for key in seen}
    assert again == seen  # the same key, the same side

    shadow = PredictionCore(ServeAppConfig.model_validate({"model": "digits", "challenger": {"mode": "shadow"}}),
                            versions)

    async def with_shadow():
        route, params = routes.match("POST", "/v1/models/digits:predict")

        async def read() -> bytes:
            return body

        answer = await shadow.answer(Call(route, params, {}, read))
        await asyncio.gather(*shadow.background)
        return answer

    answer, headers = asyncio.run(with_shadow())
    assert headers["x-model-role"] == "champion" and answer["model_version"] == 3
    assert len(versions.shadows) == 1 and versions.shadows[0]["challenger_version"] == 4


def test_core_batches_per_version_and_answers_the_other_routes():
    core = PredictionCore(ServeAppConfig.model_validate({"model": "digits"}), Versions({"champion": served_model()}))
    other = served_model(9, seed=2)
    x = np.asarray(ROWS, dtype=np.float32)
    parts = core._predict_batch([(core.champion, x[:2]), (other, x[2:3]), (core.champion, x[3:])])
    assert [len(p) for p in parts] == [2, 1, 2]
    np.testing.assert_allclose(np.concatenate([parts[0], parts[2]]),
                               core.champion.loaded.predict_proba(np.concatenate([x[:2], x[3:]])), atol=1e-6)
    np.testing.assert_allclose(parts[1], other.loaded.predict_proba(x[2:3]), atol=1e-6)
    with torch.no_grad():  # every weight 1: rows near float32's limit overflow the first layer
        for layer in core.champion.loaded.model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.fill_(1.0)
    with torch.no_grad():
        assert not np.isfinite(core.champion.loaded.model(torch.full((1, len(FEATURES)), 3e38)).numpy()).all()
    # float32 overflows on the second row; it is computed again in float64, where the probabilities are finite
    huge = json.dumps({"instances": [[1.0] * len(FEATURES), [3e38] * len(FEATURES)]}).encode()
    answer, _ = _call(core, "POST", "/v1/models/digits:predict", huge)
    wide = copy.deepcopy(core.champion.loaded.model).double()
    with torch.no_grad():
        expected = torch.softmax(wide(torch.tensor([[3e38] * len(FEATURES)], dtype=torch.float64)), dim=1).numpy()
    np.testing.assert_allclose(answer["predictions"][1], expected[0], atol=1e-6)
    assert np.isfinite(answer["predictions"]).all() and abs(sum(answer["predictions"][1]) - 1) < 1e-5


def test_a_regressor_whose_value_overflows_float32_is_refused_naming_the_row():
    torch.manual_seed(0)
    spec = ModelSpec(factory="mlray.models:mlp", num_features=len(FEATURES), num_outputs=1, kwargs={"hidden": [16]},
                     task="regression")
    model = build(spec).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.fill_(1.0)
    loaded = LoadedModel(model=model, feature_names=list(FEATURES), class_names=[], meta={})
    values = loaded.predict(np.array([[1.0] * len(FEATURES), [3e38] * len(FEATURES)], dtype=np.float32))
    assert np.isfinite(values[0]).all() and not np.isfinite(values[1]).all()  # 8 * 16 * 3e38 > float32's max
    served = served_model()
    regressor = type(served)(loaded=loaded, info=served.info, alias="champion", load_seconds=0.1)
    core = PredictionCore(ServeAppConfig.model_validate({"model": "digits"}), Versions({"champion": regressor}))
    huge = json.dumps({"instances": [[1.0] * len(FEATURES), [3e38] * len(FEATURES)]}).encode()
    with pytest.raises(InvalidInput, match=r"gives no finite output for row\(s\) \[1\] .*largest \|x\| = 3e\+38"):
        _call(core, "POST", "/v1/models/digits:predict", huge)


def test_core_answers_the_other_routes():
    core = PredictionCore(ServeAppConfig.model_validate({"model": "digits"}), Versions({"champion": served_model()}))
    with pytest.raises(NotFound):
        _call(core, "GET", "/v2/models/other")
    meta, _ = _call(core, "GET", "/v2/models/digits")
    assert meta["outputs"][0]["shape"] == [-1, len(CLASSES)] and meta["versions"] == ["3"]
    status, _ = _call(core, "GET", "/v1/models/digits/status")
    assert status == {"targets": {"champion": 3}}
