"""Monitoring wired (serving-trust issue, part 4): a real Prometheus (Debian's package) started by
``mlray.cluster.monitoring.up`` scrapes the test cluster's metrics ports while a real Serve app takes load; PromQL
returns mlray's request counts and a training's epoch metrics, and mlray's load-failure alert fires when a
replica fails to load a version."""

from __future__ import annotations

import pytest

from tests.conftest import deploy_app, register_copy
from tests.helpers import SteadyLoad, free_port, need_program, wait_for

pytestmark = pytest.mark.integration

need_program("prometheus", "apt-get install prometheus")

ROW = [0.0] * 64


@pytest.fixture(scope="module")
def monitored(trained, serve_port):
    import ray
    from ray import serve

    from mlray.cluster import monitoring
    from mlray.registry import promote

    good, broken = register_copy("mon", trained), register_copy("mon", trained, broken=True)
    promote("mon", version=good, alias="champion")
    url = deploy_app("mon", {"model": "mon", "follow": {"poll_interval_s": 1.0, "sync_interval_s": 0.5}},
                     port=serve_port)
    # for_="0s": fire on the first evaluation that sees the condition (the hold is tested by promtool)
    running = monitoring.up(port=free_port(), thresholds=monitoring.AlertThresholds(for_="0s"),
                            scrape_interval_s=2, nodes=ray.nodes())
    try:
        yield url, running, (good, broken)
    finally:
        assert monitoring.down()
        assert monitoring.status() is None
        serve.delete("mon")


def test_prometheus_returns_mlrays_request_counts_during_load(monitored):
    from mlray.cluster.monitoring import query

    url, running, (good, _) = monitored
    promql = 'sum by (model, version, status) (ray_mlray_requests_total{application="mon", protocol="v1"})'
    with SteadyLoad(f"{url}/v1/models/mon:predict", row=ROW, threads=1, pause_s=0.01) as load:
        series = wait_for(lambda: [s for s in query(running.url, promql) if float(s["value"][1]) >= 20],
                          timeout=120, what="mlray's request counter scraped by Prometheus")
        assert load.failures() == []
    assert series[0]["metric"] == {"model": "mon", "version": str(good), "status": "200"}
    assert float(series[0]["value"][1]) <= load.count()  # counted, never invented


def test_predictions_take_the_lean_wrapper_and_serves_own_metrics_still_count_them(monitored):
    """mlray/_ray/ingress.py answers prediction requests in place of Serve's per-request wrapper; Serve's request
    and ingress counters (what the Ray dashboard's Serve view plots) count them under the route Serve names."""
    from mlray.cluster.monitoring import query

    url, running, _ = monitored
    lean = wait_for(lambda: query(running.url, 'ray_mlray_replica_lean_ingress{application="mon"}'),
                    timeout=120, what="each replica's lean-ingress gauge")
    assert [float(s["value"][1]) for s in lean] == [1.0] * len(lean)
    route = "/mon/v1/models/{name:model}:predict"
    counters = {
        "requests": f'sum(ray_serve_deployment_request_counter_total{{application="mon", route="{route}"}})',
        "ingress": f'sum(ray_serve_num_http_requests_total{{application="mon", route="{route}", '
                   f'status_code="200"}})',
    }
    before = {name: sum(float(s["value"][1]) for s in query(running.url, q)) for name, q in counters.items()}
    with SteadyLoad(f"{url}/v1/models/mon:predict", row=ROW, threads=1, pause_s=0.01) as load:
        for name, promql in counters.items():
            wait_for(lambda q=promql, n=name: [s for s in query(running.url, q)
                                               if float(s["value"][1]) >= before[n] + 20],
                     timeout=120, what=f"Serve's {name} counter for the predict route")
        assert load.failures() == []


def test_load_failure_alert_fires_when_a_replica_fails_to_load(monitored):
    from mlray.cluster.monitoring import firing_alerts
    from mlray.registry import promote
    from mlray.serving.deploy import rollout

    _, running, (good, broken) = monitored
    promote("mon", version=broken, alias="champion", force=True, reason="test: a corrupt upload")
    status = rollout("mon", timeout_s=60)
    assert not status["on_target"], status
    alerts = wait_for(lambda: [a for a in firing_alerts(running.url) if a["labels"]["alertname"] ==
                               "MlrayModelLoadFailures" and a["labels"].get("application") == "mon"],
                      timeout=120, what="MlrayModelLoadFailures firing")
    assert alerts[0]["labels"]["version"] == str(broken)
    assert "failed to load" in alerts[0]["annotations"]["summary"]
    promote("mon", version=good, alias="champion", force=True, reason="test: back to the good version")


def test_training_exports_its_epoch_metrics_to_prometheus(monitored):
    from mlray.cluster.monitoring import query
    from mlray.training.train import train
    from tests.conftest import digits_config

    _, running, _ = monitored
    result = train(digits_config(name="mon-train", train={"epochs": 4}))
    promql = f'max_over_time(ray_mlray_train_epoch_metric{{run_id="{result.run_id}", metric="epoch"}}[10m])'
    # The last epoch's gauge (epoch 3) reaches Prometheus within a few export and scrape intervals.
    series = wait_for(lambda: [s for s in query(running.url, promql) if float(s["value"][1]) == 3.0],
                      timeout=90, what="the training's epoch gauge scraped by Prometheus")
    assert series[0]["metric"]["run_id"] == result.run_id
    val = query(running.url, f'max_over_time(ray_mlray_train_epoch_metric{{run_id="{result.run_id}", '
                             f'metric="val_accuracy"}}[10m])')
    assert val and 0.5 < float(val[0]["value"][1]) <= 1.0
