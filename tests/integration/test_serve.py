"""Acceptance (c) and (e): the Serve app loads @champion from the registry, answers exactly what the
offline model answers, and turns every kind of bad request into a 4xx without hurting the replica."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
import requests

from mlray.config import parse_config
from mlray.training.data import sample_test_rows

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(trained, serve_port):
    from mlray.registry import promote
    from mlray.serving.deploy import deploy, load_plan

    promote("digits", version=trained.version, alias="champion")
    url = deploy(load_plan(None, port=serve_port))  # serve_apps/digits.yaml, as `serve deploy` reads it
    yield url
    from ray import serve

    serve.delete("digits")


def _predict(url: str, body, **kwargs) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(f"{url}/v1/models/digits:predict", data=data, timeout=30, **kwargs)


def test_http_predictions_equal_offline_model(served, trained):
    from mlray.serving.loader import load_registered

    x, _ = sample_test_rows(parse_config({}).data, seed=42, count=64)
    offline = load_registered("digits", alias="champion").loaded.predict_proba(x)
    response = _predict(served, {"instances": x.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    online = np.asarray(body["predictions"])
    assert online.shape == (64, 10)
    np.testing.assert_allclose(online, offline, atol=1e-5)
    assert body["labels"] == [str(i) for i in offline.argmax(1)]
    assert body["model_name"] == "digits" and body["model_version"] == trained.version
    assert response.headers["x-model-version"] == str(trained.version)
    assert response.headers["x-model-run-id"] == trained.run_id


def test_single_rows_sent_together_match_too(served):
    from concurrent.futures import ThreadPoolExecutor

    x, _ = sample_test_rows(parse_config({}).data, seed=42, count=16)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda row: _predict(served, {"instances": [row.tolist()]}).json(), x))
    together = np.asarray(_predict(served, {"instances": x.tolist()}).json()["predictions"])
    np.testing.assert_allclose(np.asarray([a["predictions"][0] for a in answers]), together, atol=1e-5)


def test_metadata_and_readiness(served, trained):
    body = requests.get(f"{served}/v1/models/digits", timeout=10).json()
    assert body["ready"] is True and body["version"] == trained.version and body["alias"] == "champion"
    assert body["run_id"] == trained.run_id and body["inputs"]["num_features"] == 64
    assert body["metrics"]["test_accuracy"] == pytest.approx(trained.test_accuracy)
    assert requests.get(f"{served}/healthz", timeout=10).json() == {"status": "ok"}


ROW = [0.0] * 64
BAD_REQUESTS = [
    ("not json", b"{instances: ", 400, "not valid JSON"),
    ("empty body", b"", 400, "empty"),
    ("not an object", [ROW], 400, "must be a JSON object"),
    ("no instances", {"rows": [ROW]}, 422, "no 'instances' field"),
    ("instances not a list", {"instances": "abc"}, 422, "must be a list of rows"),
    ("empty list", {"instances": []}, 422, "is empty"),
    ("row not a list", {"instances": [5]}, 422, "must be a list of 64 numbers"),
    ("wrong feature count", {"instances": [[1.0] * 63]}, 422, "has 63 features; the model expects 64"),
    ("non-number", {"instances": [ROW[:-1] + ["x"]]}, 422, "must be a number"),
    ("boolean", {"instances": [ROW[:-1] + [True]]}, 422, "must be a number, got true"),
    ("NaN", '{"instances": [[' + ",".join(["0"] * 63 + ["NaN"]) + "]]}", 422, "NaN is not a number"),
    ("infinity", '{"instances": [[' + ",".join(["0"] * 63 + ["-Infinity"]) + "]]}", 422, "-Infinity"),
    ("too many rows", {"instances": [ROW] * 1025}, 413, "1025 rows; the limit is 1024"),
]


@pytest.mark.parametrize(("case", "body", "status", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_4xx_naming_the_problem(served, case, body, status, message):
    response = _predict(served, body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_values_near_float32s_limit_get_finite_probabilities(served):
    """Any finite float32 input is answered: rows that overflow the trained network in float32 are computed
    again in float64 on the replica (the OpenAPI document promises every number within float32's range)."""
    response = _predict(served, {"instances": [ROW, [3e38] * 64, [-3.4e38] * 32 + [3.4e38] * 32]})
    assert response.status_code == 200, response.text
    probabilities = np.asarray(response.json()["predictions"])
    assert probabilities.shape == (3, 10) and np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_routing_errors_and_replica_still_answers(served):
    assert requests.post(f"{served}/v1/models/other:predict", json={"instances": [ROW]}, timeout=10).status_code == 404
    wrong_method = requests.get(f"{served}/v1/models/digits:predict", timeout=10)
    assert wrong_method.status_code in (404, 405) and "error" in wrong_method.json()
    missing = requests.get(f"{served}/v2/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json() == {"error": "no route GET /v2/nothing"}

    from ray import serve

    status = serve.status().applications["digits"]
    assert status.status == "RUNNING"
    replicas = status.deployments["ModelServer"].replica_states
    from mlray.serving.deploy import load_plan

    started = load_plan(None).deployment_options["autoscaling_config"]["min_replicas"]  # the YAML's: 2
    assert replicas.get("RUNNING") == started and sum(replicas.values()) == started  # none died or restarted
    x, y = sample_test_rows(parse_config({}).data, seed=42, count=20)
    good = _predict(served, {"instances": x.tolist()})
    assert good.status_code == 200
    assert (np.asarray(good.json()["predictions"]).argmax(1) == y).mean() >= 0.9


def test_ray_processes_buffer_few_access_log_records(served):
    """mlray's heads run Serve in throughput mode, whose 1,000-record access-log buffer stalled a replica
    30-60 ms per flush; mlray's setting (100) must reach the Ray processes that replicas run in."""
    import ray

    @ray.remote(num_cpus=0)
    def serve_logging() -> tuple[bool, int]:
        from ray.serve._private import constants

        return constants.RAY_SERVE_THROUGHPUT_OPTIMIZED, constants.RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE

    assert ray.get(serve_logging.remote()) == (True, 100)


def _replica_task_counts() -> dict[str, int]:
    """Serve's count of the asyncio tasks its direct-ingress replicas hold for requests in flight (one that
    runs the request, one that watches for the client to hang up), summed over the app's replicas."""
    import ray

    totals = {"request_tasks": 0, "receive_tasks": 0}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "SERVE_REPLICA::digits#ModelServer" in actor["name"]:
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            counts = ray.get(handle._get_inflight_direct_ingress_task_counts_for_testing.remote(), timeout=30)
            totals = {key: totals[key] + counts[key] for key in totals}
    return totals


def _start_prediction(port: int, body: bytes) -> socket.socket:
    """A V1 prediction whose body is sent all but its last byte: it waits in a replica for the rest."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:-1])
    return sock


def _finish_prediction(sock: socket.socket, body: bytes) -> bytes:
    sock.sendall(body[-1:])
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    sock.close()
    return answer


def test_predictions_through_haproxy_skip_serves_disconnect_watch(served):
    """mlray's HAProxy wrapper marks prediction POSTs `x-request-disconnect-disabled: ?1`, so a replica
    awaits the app directly instead of starting two tasks per request (bench: +15 % req/s, p99 halved)."""
    import os
    import re
    from pathlib import Path

    haproxy_port = int(served.rsplit(":", 1)[1])
    rundir = Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent  # Ray adds a folder per node
    config = next(text for path in rundir.glob("*/haproxy.cfg")
                  if f"127.0.0.1:{haproxy_port}\n" in (text := path.read_text()))
    frontend = config.split("frontend http_frontend", 1)[1].split("\nbackend ", 1)[0]
    assert frontend.count("set-header x-request-disconnect-disabled ?1") == 1, frontend
    assert frontend.count("no log  # mlray:") == 1, frontend  # its per-request log line: off (serve_env.py)
    replica_port = int(re.findall(r"server SERVE_REPLICA_digits-ModelServer\S* 127\.0\.0\.1:(\d+)", config)[0])
    body = json.dumps({"instances": [ROW]}).encode()

    # Straight to a replica's own port (no HAProxy, no header): Serve's two tasks are there while it waits.
    direct = _start_prediction(replica_port, body)
    deadline = time.monotonic() + 20
    while _replica_task_counts() != {"request_tasks": 1, "receive_tasks": 1}:
        assert time.monotonic() < deadline, _replica_task_counts()
        time.sleep(0.2)
    assert b" 200 OK" in _finish_prediction(direct, body)

    # Through HAProxy: the same waiting request holds no extra task, and is answered when the body is complete.
    via_haproxy = _start_prediction(haproxy_port, body)
    time.sleep(2)
    assert _replica_task_counts() == {"request_tasks": 0, "receive_tasks": 0}
    answer = _finish_prediction(via_haproxy, body)
    assert b" 200 OK" in answer and b'"predictions"' in answer


def test_replicas_put_rays_metrics_agent_below_them(served):
    """Ray's metrics agent replays every histogram observation in ~1 s bursts at nice 0, above the replicas
    (nice 15); a replica of mlray's app puts every thread of it at nice 19 (`metrics_agent_nice`), and
    nothing else: the raylet (whose command line names the agent's script), GCS and the workers keep theirs."""
    import os

    import psutil

    from mlray.cluster.serve_env import is_metrics_agent

    def nices(pid: int) -> set[int]:
        return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}

    processes = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"]]
    agents = [p for p in processes if is_metrics_agent(p.info["cmdline"])]
    assert agents
    for agent in agents:
        assert len(os.listdir(f"/proc/{agent.pid}/task")) > 1
        assert nices(agent.pid) == {19}, agent.pid
    core = [p for p in processes if p.info["cmdline"][0].endswith(("/raylet", "/gcs_server"))]
    assert core and all(nices(p.pid) == {0} for p in core), [(p.pid, nices(p.pid)) for p in core]
    workers = [p for p in processes if p.info["cmdline"][0].startswith("ray::ServeReplica:digits")]
    assert len(workers) >= 3  # two ModelServer replicas and the RegistryWatcher
    assert all(p.nice() == 15 for p in workers), [(p.info["cmdline"][0], p.nice()) for p in workers]
