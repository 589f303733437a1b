"""Acceptance (c), (d), (e) of the serving issue, on the session's multi-node cluster:

- overload gives 503 with Retry-After and a JSON error, and every request that was admitted succeeds;
- under steady load from 8 keep-alive clients that never retry (``http.client``), no request fails while the
  replica set changes: 3 replica SIGKILLs, a node removed, a redeploy, an autoscaling cycle from 1 to 2
  replicas on different nodes and back to 1 when idle (the alias rollout is in
  tests/integration/test_serving_rollout.py).

Replicas are confined to nodes added here (custom resource ``serve_slot``), one per node.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import deploy_app, register_copy
from tests.helpers import SteadyLoad, wait_for

pytestmark = pytest.mark.integration

ROW = [0.0] * 64
SLOT = {"serve_slot": 1}
ON_SLOTS = {"ray_actor_options": {"num_cpus": 0.25, "resources": {"serve_slot": 0.5}}, "max_replicas_per_node": 1}


@pytest.fixture(scope="module")
def model(trained):
    from mlray.registry import promote

    version = register_copy("ops", trained)
    promote("ops", version=version, alias="champion")
    return version


@pytest.fixture(scope="module")
def slot_nodes(ray_cluster):
    nodes = [ray_cluster.add_node(num_cpus=1, resources=SLOT) for _ in range(2)]
    ray_cluster.wait_for_nodes()
    yield nodes  # tests append replacement nodes here
    for node in nodes:
        if node in ray_cluster.worker_nodes:
            ray_cluster.remove_node(node)


def _replicas(app: str) -> list[dict]:
    """Live replicas as the app's watcher sees them (their reports carry node and pid)."""
    import psutil

    from mlray.serving.deploy import app_status

    return [{"pid": r["pid"], "node": r["node"], "id": replica}
            for replica, r in app_status(app)["replicas"].items() if psutil.pid_exists(r["pid"])]


def _running(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or status.status != "RUNNING":
        return 0
    return status.deployments["ModelServer"].replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_overload_answers_503_with_retry_after_and_admitted_requests_succeed(model, serve_port):
    url = deploy_app("busy", {"model": "ops", "batching": {"enabled": False},
                              "admission": {"max_ongoing_requests": 1, "max_queued_requests": 2, "retry_after_s": 2}},
                     port=serve_port)
    big = {"instances": [[float(i % 7) for i in range(64)]] * 512}

    def one(_: int) -> requests.Response:
        return requests.post(f"{url}/v1/models/ops:predict", json=big, timeout=60)

    try:
        answers: list[requests.Response] = []
        for _ in range(3):  # each round is 48 requests at once; stop once overload was seen
            with ThreadPoolExecutor(48) as pool:
                answers += list(pool.map(one, range(48)))
            if any(r.status_code == 503 for r in answers):
                break
        statuses = [r.status_code for r in answers]
        assert set(statuses) <= {200, 503}, sorted(set(statuses))
        refused = [r for r in answers if r.status_code == 503]
        assert refused, "48 concurrent 512-row requests never overloaded a replica limited to 1 + 2"
        assert all(r.headers["retry-after"] == "2" and "at capacity" in r.json()["error"] for r in refused)
        assert statuses.count(200) >= 3  # the running and the queued ones
        assert _running("busy") == 1
        assert requests.post(f"{url}/v1/models/ops:predict", json=big, timeout=60).status_code == 200
    finally:
        from ray import serve

        serve.delete("busy")


CLIENTS = 8  # the serving issue's load: 8 keep-alive HTTP/1.1 clients (http.client), no retries of any kind


@pytest.fixture(scope="module")
def ha(model, serve_port, slot_nodes):
    """App `ha`: 2 replicas of `ops`, one per slot node; the tests below disturb it in turn, under load."""
    url = deploy_app("ha", {"model": "ops"}, port=serve_port, options={**ON_SLOTS, "num_replicas": 2})
    wait_for(lambda: _running("ha") == 2, timeout=120, what="2 replicas")
    yield f"{url}/v1/models/ops:predict"
    from ray import serve

    serve.delete("ha")


def _traffic_continues(load: SteadyLoad, what: str) -> None:
    count = load.count()
    try:
        wait_for(lambda: load.count() > count + 50, timeout=60, what=f"traffic after {what}")
    except TimeoutError as err:
        from ray import serve

        raise AssertionError(f"{err}: {load.count() - count} answers since; last results {load.results[-8:]}; "
                             f"load still running: {load.running()}; replicas {_replicas('ha')}; "
                             f"status {serve.status().applications['ha'].deployments['ModelServer']}") from err


# What these rely on (each seen failing without it, in HAProxy's access log): a request running on a replica
# at the instant it dies gets no answer from it, and HAProxy replays it on another replica
# (RAY_SERVE_HAPROXY_RETRY_ON adds empty-response to Ray's conn-failure) because it holds the whole request
# (`option http-buffer-request`, mlray/_ray/haproxy.py; else a body sent after the headers, as http.client
# does, leaves nothing to replay and HAProxy closes the client's connection unanswered) and has retries to
# spare once the dead replica is marked down (RAY_SERVE_HAPROXY_RETRIES=10); a replica sends each answer's
# head and body in one write (mlray/_ray/onewrite.py; else a kill between them truncates an answer the
# client already started reading). Each change of replicas makes Serve reload HAProxy; the old process keeps
# its idle keep-alive connections and answers their next request with `Connection: close`
# (`option idle-close-on-response`, no `close-spread-time`: mlray/_ray/haproxy.py).


@pytest.mark.slow
def test_replica_sigkilled_three_times_under_load_loses_no_request(ha):
    with SteadyLoad(ha, row=ROW, threads=CLIENTS, max_seconds=600, max_requests=1_000_000) as load:
        wait_for(lambda: load.count() > 50, timeout=60, what="load running")
        for kill in range(3):
            victim = _replicas("ha")[0]
            os.kill(victim["pid"], signal.SIGKILL)
            wait_for(lambda gone=victim["id"]: gone not in {r["id"] for r in _replicas("ha")}
                     and len(_replicas("ha")) == 2 and _running("ha") == 2,
                     timeout=120, what=f"a replacement replica (kill {kill + 1})")
            _traffic_continues(load, f"kill {kill + 1}")
    assert load.failures() == [], load.failures()[:5]
    assert load.count() > 300


def test_node_removed_under_load_loses_no_request(ha, slot_nodes, ray_cluster):
    with SteadyLoad(ha, row=ROW, threads=CLIENTS, max_seconds=600, max_requests=1_000_000) as load:
        wait_for(lambda: load.count() > 50, timeout=60, what="load running")
        doomed = next(n for n in slot_nodes if n.node_id in {r["node"] for r in _replicas("ha")})
        ray_cluster.remove_node(doomed)
        slot_nodes.append(ray_cluster.add_node(num_cpus=1, resources=SLOT))
        wait_for(lambda: _running("ha") == 2 and doomed.node_id not in {r["node"] for r in _replicas("ha")},
                 timeout=180, what="2 replicas again, none on the removed node")
        _traffic_continues(load, "the node loss")
    assert load.failures() == [], load.failures()[:5]
    wait_for(lambda: len({r["node"] for r in _replicas("ha")}) == 2, timeout=60,
             what="the 2 replicas on 2 nodes, as reported to the watcher")


def test_redeploy_under_load_loses_no_request(ha, serve_port):
    """A new config of the same app (what `serve deploy` of an edited YAML does): Serve starts replicas of
    the new version, then drains and stops the old ones."""
    before = {r["id"] for r in _replicas("ha")}
    with SteadyLoad(ha, row=ROW, threads=CLIENTS, max_seconds=600, max_requests=1_000_000) as load:
        wait_for(lambda: load.count() > 50, timeout=60, what="load running")
        deploy_app("ha", {"model": "ops", "batching": {"enabled": False}}, port=serve_port,
                   options={**ON_SLOTS, "num_replicas": 2})
        wait_for(lambda: _running("ha") == 2 and not before & {r["id"] for r in _replicas("ha")}
                 and len(_replicas("ha")) == 2, timeout=180, what="2 replicas of the new config, none of the old")
        _traffic_continues(load, "the redeploy")
    assert load.failures() == [], load.failures()[:5]


def test_autoscaling_goes_to_two_nodes_under_load_and_back(model, serve_port, slot_nodes):
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
                   "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2}
    url = deploy_app("auto", {"model": "ops"}, port=serve_port, options={**ON_SLOTS, "autoscaling_config": autoscaling})
    try:
        wait_for(lambda: _running("auto") == 1, timeout=60, what="1 replica at first")
        with SteadyLoad(f"{url}/v1/models/ops:predict", row=ROW, threads=CLIENTS, max_seconds=400,
                        max_requests=1_000_000) as load:
            wait_for(lambda: _running("auto") == 2, timeout=150, what="a second replica under load")
            # both replicas report their node to the watcher within a heartbeat of starting
            wait_for(lambda: len({r["node"] for r in _replicas("auto")}) == 2, timeout=60,
                     what="the 2 replicas on 2 different nodes")
        assert load.failures() == [], load.failures()[:5]
        wait_for(lambda: _running("auto") == 1 and len(_replicas("auto")) == 1, timeout=150,
                 what="back to 1 replica when idle")
    finally:
        from ray import serve

        serve.delete("auto")
