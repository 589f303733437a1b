"""Acceptance (c), (d), (e) of the serving issue, on the session's multi-node cluster:

- overload gives 503 with Retry-After and a JSON error, and every request that was admitted succeeds;
- a replica killed and a node removed under load: a client that retries on 503 sees no failure, and the
  app is back to its replica count;
- autoscaling from 1 to 2 replicas on different nodes under load, and back to 1 when idle.

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


def test_replica_killed_and_node_removed_under_load(model, serve_port, slot_nodes, ray_cluster):
    url = deploy_app("ha", {"model": "ops"}, port=serve_port, options={**ON_SLOTS, "num_replicas": 2})
    try:
        wait_for(lambda: _running("ha") == 2, timeout=120, what="2 replicas")
        with SteadyLoad(f"{url}/v1/models/ops:predict", row=ROW, threads=2, retry_on_503=True, pause_s=0.01) as load:
            wait_for(lambda: load.count() > 30, timeout=60, what="load running")
            victim = _replicas("ha")[0]
            os.kill(victim["pid"], signal.SIGKILL)
            wait_for(lambda: len({r["id"] for r in _replicas("ha")} - {victim["id"]}) == 2 and _running("ha") == 2,
                     timeout=120, what="a replacement replica")

            count = load.count()
            wait_for(lambda: load.count() > count + 30, timeout=60, what="traffic after the kill")
            doomed = next(n for n in slot_nodes if n.node_id in {r["node"] for r in _replicas("ha")})
            ray_cluster.remove_node(doomed)
            slot_nodes.append(ray_cluster.add_node(num_cpus=1, resources=SLOT))
            wait_for(lambda: _running("ha") == 2 and doomed.node_id not in {r["node"] for r in _replicas("ha")},
                     timeout=180, what="2 replicas again, none on the removed node")
            count = load.count()
            wait_for(lambda: load.count() > count + 30, timeout=60, what="traffic after the node loss")
        # A request running on the replica at the instant it dies gets no answer from it; HAProxy replays it
        # on the other replica (mlray's RAY_SERVE_HAPROXY_RETRY_ON adds empty-response to Ray's
        # conn-failure), so no request gets an error status. Serve's Python proxy, without HAProxy, answered
        # it 500 (1-2 per run). Each change of replicas reloads HAProxy; once in CI a client's keep-alive
        # connection was reset by that (a ConnectionError, before mlray stopped setting HAProxy's
        # close-spread-time). At most one such reset per disruption is tolerated; nothing else.
        failures = load.failures()
        assert all(status == -1 and kind == "ConnectionError" for status, kind, _ in failures), failures[:5]
        assert len(failures) <= 2, failures
        assert load.count() > 100
        wait_for(lambda: len({r["node"] for r in _replicas("ha")}) == 2, timeout=60,
                 what="the 2 replicas on 2 nodes, as reported to the watcher")
    finally:
        from ray import serve

        serve.delete("ha")


def test_autoscaling_goes_to_two_nodes_under_load_and_back(model, serve_port, slot_nodes):
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
                   "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2}
    url = deploy_app("auto", {"model": "ops"}, port=serve_port, options={**ON_SLOTS, "autoscaling_config": autoscaling})
    try:
        wait_for(lambda: _running("auto") == 1, timeout=60, what="1 replica at first")
        with SteadyLoad(f"{url}/v1/models/ops:predict", row=ROW, threads=6, retry_on_503=True) as load:
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
