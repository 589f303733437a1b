"""mlray's replica metrics are gathered per request and handed to Ray's recorder once per heartbeat."""

from __future__ import annotations

from typing import Any

from mlray.serving.metrics import MAX_HELD, ServingMetrics


class Recorded:
    """What Ray's metric objects were given (Ray's recorder needs a running cluster; its export is tested in
    tests/integration/test_serving_protocols.py)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, str]]] = []

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append((value, dict(tags)))

    inc = observe


def _metrics() -> tuple[ServingMetrics, Recorded, Recorded, Recorded]:
    metrics, latency, batch, requests = ServingMetrics(), Recorded(), Recorded(), Recorded()
    metrics_any: Any = metrics
    metrics_any.latency, metrics_any.batch_size, metrics_any.requests = latency, batch, requests
    return metrics, latency, batch, requests


def test_every_observation_reaches_ray_at_flush_with_its_tags() -> None:
    metrics, latency, batch, requests = _metrics()
    metrics.observe_latency(0.002, model="m", version="3", protocol="v1")
    metrics.observe_latency(0.004, model="m", version="3", protocol="v1")
    metrics.observe_latency(0.5, model="m", version="4", protocol="v2")
    metrics.observe_batch(2, model="m", version="3")
    metrics.count_request("m", "3", "champion", "v1", "200")
    metrics.count_request("m", "3", "champion", "v1", "200")
    assert latency.calls == [] and batch.calls == [] and requests.calls == []  # nothing in the request path

    metrics.flush()
    assert latency.calls == [(0.002, {"model": "m", "version": "3", "protocol": "v1"}),
                             (0.004, {"model": "m", "version": "3", "protocol": "v1"}),
                             (0.5, {"model": "m", "version": "4", "protocol": "v2"})]
    assert batch.calls == [(2, {"model": "m", "version": "3"})]
    assert requests.calls == [(2, {"model": "m", "version": "3", "role": "champion", "protocol": "v1",
                                   "status": "200"})]
    metrics.flush()  # handed over once, not again
    assert len(latency.calls) == 3 and len(batch.calls) == 1 and len(requests.calls) == 1


def test_a_missed_heartbeat_does_not_hold_observations_without_bound() -> None:
    metrics, latency, batch, _ = _metrics()
    for _ in range(MAX_HELD - 1):
        metrics.observe_latency(0.001, model="m", version="1", protocol="v1")
    assert latency.calls == []
    metrics.observe_latency(0.001, model="m", version="1", protocol="v1")
    assert len(latency.calls) == MAX_HELD
    for _ in range(MAX_HELD):
        metrics.observe_batch(1, model="m", version="1")
    assert len(batch.calls) == MAX_HELD
