"""Prometheus metrics from the replicas, exported through Ray's metrics endpoint (``ray_`` prefix).

Serve adds ``deployment``, ``replica`` and ``application`` tags to each of these. Created in the replica
(Ray must be running), never at import.
"""

from __future__ import annotations

from typing import Any

LATENCY_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_BOUNDARIES = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]
# Observations held between heartbeats, at most (a heartbeat stuck on the registry must not grow them forever).
MAX_HELD = 10_000


class ServingMetrics:
    """One set per replica. Names as scraped: ``ray_mlray_requests_total`` and so on."""

    def __init__(self) -> None:
        from ray.serve import metrics as ray_metrics

        metrics: Any = ray_metrics  # Ray types tag_keys as a 1-tuple; any tuple of names works

        self.requests = metrics.Counter(
            "mlray_requests", description="HTTP requests by model, version, role, protocol and status code",
            tag_keys=("model", "version", "role", "protocol", "status"))
        self.latency = metrics.Histogram(
            "mlray_request_latency_seconds", description="time from request to response inside the replica",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("model", "version", "protocol"))
        self.batch_size = metrics.Histogram(
            "mlray_batch_rows", description="rows per model call (after batching)",
            boundaries=BATCH_BOUNDARIES, tag_keys=("model", "version"))
        self.load_seconds = metrics.Gauge(
            "mlray_model_load_seconds", description="seconds to download, verify, load and warm up a version",
            tag_keys=("model", "version"))
        self.load_failures = metrics.Counter(
            "mlray_model_load_failures", description="versions that failed to load or warm up",
            tag_keys=("model", "version"))
        self.serving_version = metrics.Gauge(
            "mlray_serving_version", description="the version each role answers with", tag_keys=("model", "role"))
        self.lean_ingress = metrics.Gauge(
            "mlray_replica_lean_ingress", description="1 where the replica's prediction requests take mlray's "
                                                      "lean wrapper (mlray/_ray/ingress.py), 0 where Serve's")
        self.shadow = metrics.Counter(
            "mlray_shadow_comparisons", description="shadow predictions, by whether the challenger agreed",
            tag_keys=("model", "version", "agree"))
        # Gathered here and handed to Ray once per heartbeat (:meth:`flush`): a dict update per request
        # instead of a call into Ray's metrics recorder (~5 % of a replica's CPU per single-row request as an
        # observe() in the request; bench/README.md, "Cheaper metrics").
        self._pending: dict[tuple[str, str, str, str, str], int] = {}
        self._latencies: dict[tuple[str, str, str], list[float]] = {}
        self._batches: dict[tuple[str, str], list[int]] = {}

    def count_request(self, model: str, version: str, role: str, protocol: str, status: str) -> None:
        key = (model, version, role, protocol, status)
        self._pending[key] = self._pending.get(key, 0) + 1

    def observe_latency(self, seconds: float, *, model: str, version: str, protocol: str) -> None:
        values = self._latencies.setdefault((model, version, protocol), [])
        values.append(seconds)
        if len(values) >= MAX_HELD:
            self.flush()

    def observe_batch(self, rows: int, *, model: str, version: str) -> None:
        sizes = self._batches.setdefault((model, version), [])
        sizes.append(rows)
        if len(sizes) >= MAX_HELD:
            self.flush()

    def flush(self) -> None:
        """Everything gathered since the last call, to Ray (which exports it within its own interval)."""
        pending, self._pending = self._pending, {}
        latencies, self._latencies = self._latencies, {}
        batches, self._batches = self._batches, {}
        for (model, version, role, protocol, status), count in pending.items():
            self.requests.inc(count, tags={"model": model, "version": version, "role": role, "protocol": protocol,
                                           "status": status})
        for (model, version, protocol), values in latencies.items():
            tags = {"model": model, "version": version, "protocol": protocol}
            for seconds in values:
                self.latency.observe(seconds, tags=tags)
        for (model, version), sizes in batches.items():
            tags = {"model": model, "version": version}
            for rows in sizes:
                self.batch_size.observe(rows, tags=tags)
