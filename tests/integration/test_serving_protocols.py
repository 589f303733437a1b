"""Acceptance (f), (g), (h), (i) of the serving issue, on one app deployed from the cluster's Serve YAML
(`serve_apps/digits.cluster.yaml`, API keys on):

- auth: every route of the app is either public or refuses a request without a key (401), a wrong key
  (403), and answers a right one;
- the V1, V2 and `/invocations` routes answer the same predictions, and errors follow each protocol;
- a property-based fuzz of 240 generated bodies: no 5xx, the replica unchanged afterwards;
- the replica metrics, scraped from Ray's metrics export endpoint after the traffic above.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlray.config import parse_config
from mlray.serving.auth import add_key_to_file, hash_key, is_public
from mlray.training.data import sample_test_rows
from tests.conftest import deploy_app, register_copy
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SERVE_YAML = REPO / "serve_apps" / "digits.cluster.yaml"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("keys") / "api_keys"


@pytest.fixture(scope="module")
def secure(trained, serve_port, key_file):
    """The cluster YAML's app args (auth on), with the key file pointed at a throwaway one."""
    from mlray.registry import promote
    from mlray.serving.deploy import load_plan

    plan = load_plan(CLUSTER_SERVE_YAML)
    assert plan.args["auth"]["enabled"] is True, "the cluster's Serve config must require API keys"
    key = add_key_to_file(key_file)
    version = register_copy("proto", trained)
    promote("proto", version=version, alias="champion")
    args = {**plan.args, "model": "proto", "auth": {**plan.args["auth"], "keys_file": str(key_file), "keys_env": None}}
    url = deploy_app("proto", args, port=serve_port)
    yield url, key, version
    from ray import serve

    serve.delete("proto")


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _concrete(path: str) -> str:
    return path.replace("{name}", "proto")


def test_every_route_is_public_or_protected(secure):
    from fastapi.routing import APIRoute
    from starlette.routing import Route

    from mlray.serving.app import api

    url, key, _ = secure
    # Every route the running app has: its OpenAPI paths (the class's routes, added in the replica) and
    # FastAPI's own documentation routes.
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    routes = {(method.upper(), path) for path, methods in spec["paths"].items() for method in methods}
    routes |= {(method, route.path_format) for route in api.routes if isinstance(route, (APIRoute, Route))
               for method in route.methods or {"GET"} if method != "HEAD"}
    assert len(routes) >= 17, sorted(routes)  # 13 of the app, 4 of FastAPI
    checked = []
    for method, template in sorted(routes):
        path = _concrete(template)
        anonymous = requests.request(method, f"{url}{path}", timeout=30)
        if is_public(path):
            assert anonymous.status_code not in (401, 403), (method, path, anonymous.status_code)
        else:
            assert anonymous.status_code == 401, f"{method} {path} is neither public nor protected"
            assert anonymous.headers["www-authenticate"].startswith("Bearer")
            wrong = requests.request(method, f"{url}{path}", headers=_auth("not-the-key"), timeout=30)
            assert wrong.status_code == 403, (method, path)
            right = requests.request(method, f"{url}{path}", headers=_auth(key), timeout=30)
            assert right.status_code not in (401, 403), (method, path, right.text)
        checked.append(f"{method} {path}")
    protected = [c for c in checked if not is_public(c.split(" ", 1)[1])]
    assert {"POST /v1/models/proto:predict", "POST /v2/models/proto/infer", "POST /invocations"} <= set(protected)
    assert {"GET /healthz", "GET /v2/health/ready", "GET /v2/models/proto/ready"} <= set(checked) - set(protected)
    # an unknown path does not tell an anonymous caller whether it exists
    assert requests.get(f"{url}/v1/nothing", timeout=10).status_code == 401


def test_no_key_wrong_key_right_key(secure):
    url, key, version = secure
    body = {"instances": [[0.0] * 64]}
    assert requests.post(f"{url}/v1/models/proto:predict", json=body, timeout=10).status_code == 401
    wrong = requests.post(f"{url}/invocations", json=body, headers=_auth(key + "x"), timeout=10)
    assert wrong.status_code == 403 and wrong.json()["error_code"] == "PERMISSION_DENIED"
    right = requests.post(f"{url}/v1/models/proto:predict", json=body, headers=_auth(key), timeout=10)
    assert right.status_code == 200 and right.headers["x-model-version"] == str(version)


def test_keys_added_and_revoked_in_the_file_reach_the_running_replica(secure, key_file):
    url, key, _ = secure
    predict = f"{url}/v1/models/proto:predict"
    body = {"instances": [[0.0] * 64]}
    kept = key_file.read_text()
    added = add_key_to_file(key_file)  # `mlray keys create --file`, on a live app
    try:
        wait_for(lambda: requests.post(predict, json=body, headers=_auth(added), timeout=10).status_code == 200,
                 timeout=20, what="the new key accepted")
        key_file.write_text(hash_key(added) + "\n")  # the first key revoked: its line deleted
        wait_for(lambda: requests.post(predict, json=body, headers=_auth(key), timeout=10).status_code == 403,
                 timeout=20, what="the revoked key refused")
        assert requests.post(predict, json=body, headers=_auth(added), timeout=10).status_code == 200
    finally:
        key_file.write_text(kept)
        wait_for(lambda: requests.post(predict, json=body, headers=_auth(key), timeout=10).status_code == 200 and
                 requests.post(predict, json=body, headers=_auth(added), timeout=10).status_code == 403,
                 timeout=20, what="the module's key back alone")


def test_v1_v2_and_invocations_answer_the_same(secure):
    url, key, version = secure
    x, _ = sample_test_rows(parse_config({}).data, seed=42, count=32)
    headers = _auth(key)
    v1 = requests.post(f"{url}/v1/models/proto:predict", json={"instances": x.tolist()}, headers=headers, timeout=30)
    assert v1.status_code == 200, v1.text
    expected = np.asarray(v1.json()["predictions"])

    v2 = requests.post(f"{url}/v2/models/proto/infer", headers=headers, timeout=30, json={
        "id": "req-1", "inputs": [{"name": "input", "shape": [32, 64], "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]})
    assert v2.status_code == 200, v2.text
    body = v2.json()
    assert body["id"] == "req-1" and body["model_name"] == "proto" and body["model_version"] == str(version)
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["probabilities"]["shape"] == [32, 10] and outputs["probabilities"]["datatype"] == "FP32"
    np.testing.assert_allclose(np.asarray(outputs["probabilities"]["data"]).reshape(32, 10), expected, atol=1e-6)
    assert outputs["label"]["data"] == v1.json()["labels"]

    names = requests.get(f"{url}/v2/models/proto", headers=headers, timeout=10).json()
    assert names["inputs"][0]["shape"] == [-1, 64] and names["versions"] == [str(version)]
    meta = requests.get(f"{url}/v1/models/proto", headers=headers, timeout=10).json()
    columns = meta["inputs"]["feature_names"]
    order = list(reversed(range(64)))
    formats = {
        "dataframe_split": {"dataframe_split": {"columns": [columns[i] for i in order],
                                                "data": x[:, order].tolist()}},
        "dataframe_records": {"dataframe_records": [dict(zip(columns, row, strict=True)) for row in x.tolist()]},
        "instances": {"instances": x.tolist()},
        "inputs": {"inputs": {c: x[:, i].tolist() for i, c in enumerate(columns)}},
    }
    for name, payload in formats.items():
        answer = requests.post(f"{url}/invocations", json=payload, headers=headers, timeout=30)
        assert answer.status_code == 200, (name, answer.text)
        np.testing.assert_allclose(np.asarray(answer.json()["predictions"]), expected, atol=1e-6, err_msg=name)

    # the same mistake, in each protocol's own error shape
    bad_v1 = requests.post(f"{url}/v1/models/proto:predict", json={"instances": [[1.0] * 63]}, headers=headers,
                           timeout=10)
    assert bad_v1.status_code == 422 and "63 features" in bad_v1.json()["error"]
    bad_v2 = requests.post(f"{url}/v2/models/proto/infer", headers=headers, timeout=10, json={
        "inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [1.0] * 63}]})
    assert bad_v2.status_code == 400 and set(bad_v2.json()) == {"error"} and "shape" in bad_v2.json()["error"]
    bad_mlflow = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["nope"], "data": [[1]]}},
                               headers=headers, timeout=10)
    assert bad_mlflow.status_code == 400
    assert bad_mlflow.json()["error_code"] == "BAD_REQUEST" and "nope" in bad_mlflow.json()["message"]
    assert requests.get(f"{url}/docs", timeout=10).status_code == 200
    assert "/v2/models/{name}/infer" in requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]


# -- real protocol clients ---------------------------------------------------------------------------------


def test_tritonclient_with_its_defaults_answers_as_v1(secure):
    """tritonclient.http as a user runs it: binary tensors in and out, server and model metadata."""
    import tritonclient.http as httpclient

    url, key, version = secure
    headers = _auth(key)
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    try:
        server = client.get_server_metadata(headers=headers)
        assert server["name"] == "mlray" and "binary_tensor_data" in server["extensions"]
        model = client.get_model_metadata("proto", headers=headers)
        assert model["versions"] == [str(version)] and model["inputs"][0]["shape"] == [-1, 64]
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("proto")
        x, _ = sample_test_rows(parse_config({}).data, seed=3, count=16)
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x.astype(np.float32))  # binary_data=True: tritonclient's default
        result = client.infer("proto", [tensor], headers=dict(headers), request_id="t-1")  # it adds to the dict
        answer = result.get_response()
        assert answer["id"] == "t-1" and answer["model_version"] == str(version)
        assert all("binary_data_size" in out["parameters"] for out in answer["outputs"])  # binary answers too
        v1 = requests.post(f"{url}/v1/models/proto:predict", json={"instances": x.tolist()}, headers=headers,
                           timeout=30).json()
        np.testing.assert_allclose(result.as_numpy("probabilities"), np.asarray(v1["predictions"]), atol=1e-6)
        assert [label.decode() for label in result.as_numpy("label")] == v1["labels"]
        only = client.infer("proto", [tensor], headers=dict(headers),
                            outputs=[httpclient.InferRequestedOutput("label", binary_data=False)])
        assert only.as_numpy("label").tolist() == v1["labels"] and only.as_numpy("probabilities") is None
    finally:
        client.close()


def test_invocations_csv_and_parquet_equal_the_json_answer(secure):
    import pandas as pd

    url, key, _ = secure
    headers = _auth(key)
    x, _ = sample_test_rows(parse_config({}).data, seed=5, count=8)
    columns = requests.get(f"{url}/v1/models/proto", headers=headers, timeout=10).json()["inputs"]["feature_names"]
    frame = pd.DataFrame(x, columns=columns)
    as_json = requests.post(f"{url}/invocations", json={"dataframe_split": frame.to_dict(orient="split")},
                            headers=headers, timeout=30)
    assert as_json.status_code == 200, as_json.text
    for content_type, body in (("text/csv", frame.to_csv(index=False).encode()),
                               ("text/csv", frame[columns[::-1]].to_csv().encode()),
                               ("application/vnd.apache.parquet", frame.to_parquet())):
        answer = requests.post(f"{url}/invocations", data=body, headers={**headers, "Content-Type": content_type},
                               timeout=30)
        assert answer.status_code == 200, (content_type, answer.text)
        assert answer.json() == as_json.json(), content_type
    bad = requests.post(f"{url}/invocations", data=b"a,b\n1,2\n", headers={**headers, "Content-Type": "text/csv"},
                        timeout=10)
    assert bad.status_code == 400 and bad.json()["error_code"] == "BAD_REQUEST"
    assert "csv header" in bad.json()["message"]


def test_schemathesis_all_checks_on_the_deployed_app(secure, tmp_path):
    """The same run as tests/unit/test_openapi_fuzz.py, through HAProxy to a real replica, without its stateful
    phase (sequences of calls along the document's links, ~27 s): the unit test runs those over the same app."""
    from tests.unit.test_openapi_fuzz import run_schemathesis

    url, key, _ = secure
    result = run_schemathesis(f"{url}/openapi.json", tmp_path, key=key, max_examples=5, max_time_s=30,
                              phases="examples,coverage,fuzzing")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


# -- h: property-based fuzz ------------------------------------------------------------------------------------

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=8),
                      st.floats(allow_nan=False, allow_infinity=False))
JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6),
                                                                                           inner, max_size=4),
                    max_leaves=30)
NUMBER = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32), st.integers(-1000, 1000))
ROW = st.lists(NUMBER, min_size=62, max_size=66) | st.lists(JSON_LEAF, min_size=64, max_size=64)
V1_BODY = st.fixed_dictionaries({"instances": st.lists(ROW, max_size=4) | JSON})
V2_BODY = st.fixed_dictionaries({"inputs": st.lists(st.fixed_dictionaries({
    "name": st.text(max_size=6), "shape": st.lists(st.integers(-2, 70), max_size=3),
    "datatype": st.sampled_from(["FP32", "FP64", "INT64", "BYTES", "BOOL", "fp32", "UINT8"]),
    "data": st.lists(NUMBER, max_size=130) | JSON}), max_size=2)}, optional={"outputs": JSON, "id": JSON})
MLFLOW_BODY = st.dictionaries(st.sampled_from(["dataframe_split", "dataframe_records", "instances", "inputs",
                                               "params", "other"]), JSON | st.lists(ROW, max_size=3), max_size=3)
ROUTES = {"v1": "/v1/models/proto:predict", "v2": "/v2/models/proto/infer", "mlflow": "/invocations"}


def test_fuzzed_bodies_never_get_a_5xx(secure):
    from mlray.serving.deploy import app_status

    url, key, _ = secure
    before = set(app_status("proto")["replicas"])
    seen: list[int] = []
    session = requests.Session()
    session.headers.update(_auth(key))

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(route=st.sampled_from(sorted(ROUTES)), body=st.data())
    def fuzz(route: str, body: st.DataObject) -> None:
        strategy = {"v1": V1_BODY | JSON, "v2": V2_BODY | JSON, "mlflow": MLFLOW_BODY | JSON}[route]
        payload = json.dumps(body.draw(strategy))
        response = session.post(f"{url}{ROUTES[route]}", data=payload, timeout=30)
        seen.append(response.status_code)
        assert response.status_code < 500, (route, payload[:300], response.text[:300])
        answer = response.json()
        if response.status_code != 200:
            assert ("error_code" in answer) if route == "mlflow" else ("error" in answer), answer

    for _ in range(3):  # 3 x 80 = 240 generated bodies
        fuzz()
    assert len(seen) == 240
    assert set(seen) - {200, 400, 413, 422} == set(), sorted(set(seen))
    after = app_status("proto")
    assert set(after["replicas"]) == before, "a replica was replaced during the fuzz"

    from ray import serve

    replicas = serve.status().applications["proto"].deployments["ModelServer"].replica_states
    assert replicas == {"RUNNING": 1}


# -- i: metrics -----------------------------------------------------------------------------------------------

def _scrape() -> str:
    import ray

    texts = []
    for node in ray.nodes():
        if node["Alive"] and node.get("MetricsExportPort"):
            try:
                texts.append(requests.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics",
                                          timeout=10).text)
            except requests.RequestException:
                continue
    return "\n".join(texts)


def _series(text: str, name: str, **labels: str) -> list[float]:
    values = []
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            values.append(float(line.rsplit(" ", 1)[1]))
    return values


def test_metrics_are_scraped_from_rays_endpoint(secure):
    url, key, version = secure
    for _ in range(5):
        requests.post(f"{url}/v1/models/proto:predict", json={"instances": [[0.0] * 64] * 3}, headers=_auth(key),
                      timeout=10)
        requests.post(f"{url}/invocations", json={"instances": [[0.0] * 64]}, timeout=10)  # 401
    wanted = {"model": "proto", "version": str(version), "protocol": "v1", "status": "200", "role": "champion"}

    def scraped() -> str | None:  # the agent exports what replicas report every few seconds
        text = _scrape()
        answered = sum(_series(text, "ray_mlray_requests_total", **wanted))
        refused = sum(_series(text, "ray_mlray_requests_total", model="proto", protocol="mlflow", status="401"))
        return text if answered >= 5 and refused >= 5 else None

    text = wait_for(scraped, timeout=90, interval=2, what="mlray request counts on Ray's metrics endpoint")
    assert _series(text, "ray_mlray_request_latency_seconds_count", model="proto", protocol="v1")
    assert _series(text, "ray_mlray_batch_rows_bucket", model="proto", le="4.0")
    loaded = _series(text, "ray_mlray_model_load_seconds", model="proto", version=str(version))
    assert loaded and 0 < loaded[0] < 120
    assert re.search(r'ray_mlray_serving_version\{[^}]*model="proto"[^}]*role="champion"[^}]*\} ' + f"{version}",
                     text)


def test_fastapis_routes_answer_exactly_as_the_fast_path(secure, serve_port, key_file):
    """``fast_path: false`` sends the prediction routes through FastAPI's router: same bodies, statuses, errors."""
    from ray import serve

    fast, key, _ = secure
    args = {"model": "proto", "fast_path": False, "auth": {"enabled": True, "keys_file": str(key_file),
                                                           "keys_env": None}}
    slow = deploy_app("proto-fastapi", args, port=serve_port)
    x, _ = sample_test_rows(parse_config({}).data, seed=7, count=3)
    columns = requests.get(f"{fast}/v1/models/proto", headers=_auth(key), timeout=10).json()["inputs"]["feature_names"]
    calls = [
        ("/v1/models/proto:predict", {"instances": x.tolist()}),
        ("/v1/models/proto:predict", {"instances": [[1.0, 2.0]]}),
        ("/v1/models/other:predict", {"instances": x.tolist()}),
        ("/v2/models/proto/infer", {"inputs": [{"name": "x", "shape": [3, 64], "datatype": "FP32",
                                                "data": x.reshape(-1).tolist()}]}),
        ("/v2/models/proto/infer", {"inputs": []}),
        ("/invocations", {"dataframe_split": {"columns": columns, "data": x.tolist()}}),
        ("/invocations", {"dataframe_split": {"columns": columns[:3], "data": [[1, 2, 3]]}}),
    ]
    try:
        for path, body in calls:
            answers = [requests.post(f"{base}{path}", json=body, headers=_auth(key), timeout=30)
                       for base in (fast, slow)]
            assert answers[0].status_code == answers[1].status_code, (path, [a.text for a in answers])
            assert answers[0].json() == answers[1].json(), path
            if answers[0].status_code == 200:
                assert answers[0].headers["x-model-version"] == answers[1].headers["x-model-version"]
        assert requests.post(f"{slow}/invocations", json={}, timeout=10).status_code == 401  # keys, as before
    finally:
        serve.delete("proto-fastapi")
