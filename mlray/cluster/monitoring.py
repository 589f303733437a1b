"""Monitoring wired: a local Prometheus that scrapes the Ray cluster's metrics and evaluates mlray's alert rules.

``mlray monitor up`` starts Debian's ``prometheus`` (a program, not a Python package) on 127.0.0.1:9090,
where the Ray dashboard looks for it by default (``RAY_PROMETHEUS_HOST``), so the dashboard's metric views
fill in. The scrape targets are the ones Ray itself generates: the service-discovery file that the
dashboard writes into the session folder (every node's metrics port, the autoscaler's and the
dashboard's). A cluster without a dashboard has no such file; then the targets come from ``ray.nodes()``.
The alert rules (:func:`alert_rules`) read the metrics the Serve replicas export (``mlray.serving.metrics``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlray import settings
from mlray.errors import ConfigError, MlrayError

logger = logging.getLogger(__name__)

DEFAULT_PORT = 9090  # where the Ray dashboard looks for Prometheus unless RAY_PROMETHEUS_HOST says otherwise
DISCOVERY_FILE = "prom_metrics_service_discovery.json"  # Ray's name, in the session folder
GRAFANA_DASHBOARD = "dashboards/mlray-serving.json"


@dataclass(frozen=True)
class AlertThresholds:
    """When mlray's alerts fire; the defaults suit a model answering in milliseconds."""

    error_ratio: float = 0.05  # share of 5xx answers over the last minute
    p99_seconds: float = 0.25  # replica-side p99 latency over the last minute
    min_replicas: int = 1  # healthy Serve replicas per deployment
    for_: str = "1m"  # how long a condition must hold before the alert fires

    def __post_init__(self) -> None:
        if not 0 < self.error_ratio < 1:
            raise ConfigError(f"error_ratio must be between 0 and 1, got {self.error_ratio}")
        if self.p99_seconds <= 0:
            raise ConfigError(f"p99_seconds must be positive, got {self.p99_seconds}")
        if self.min_replicas < 1:
            raise ConfigError(f"min_replicas must be at least 1, got {self.min_replicas}")


def alert_rules(thresholds: AlertThresholds = AlertThresholds()) -> dict[str, Any]:
    """mlray's alerting rules, as a Prometheus rule file (``promtool check rules`` accepts it)."""
    requests = "ray_mlray_requests_total"
    failures = "ray_mlray_model_load_failures_total"
    by_app = "application, model"
    rules = [
        {
            "alert": "MlrayHighErrorRate",
            "expr": f'sum by ({by_app}) (rate({requests}{{status=~"5.."}}[1m])) / '
                    f"sum by ({by_app}) (rate({requests}[1m])) > {thresholds.error_ratio}",
            "labels": {"severity": "page"},
            "annotations": {"summary": "{{ $labels.model }} answers {{ $value | humanizePercentage }} of requests "
                                       f"with a 5xx (threshold {thresholds.error_ratio:.0%})"},
        },
        {
            "alert": "MlrayHighLatencyP99",
            "expr": f"histogram_quantile(0.99, sum by ({by_app}, le) "
                    f"(rate(ray_mlray_request_latency_seconds_bucket[1m]))) > {thresholds.p99_seconds}",
            "labels": {"severity": "ticket"},
            "annotations": {"summary": "{{ $labels.model }}: p99 inside the replica is {{ $value }} s "
                                       f"(threshold {thresholds.p99_seconds} s)"},
        },
        {
            "alert": "MlrayModelLoadFailures",
            # A failed version stays out of traffic; someone has to look at why it failed. A replica's counter
            # first appears at 1, which increase() cannot see: a series new in the window counts too.
            "expr": f"sum by (application, model, version) (increase({failures}[15m]) > 0 "
                    f"or ({failures} unless {failures} offset 15m)) > 0",
            "labels": {"severity": "ticket"},
            "annotations": {"summary": "{{ $labels.model }} version {{ $labels.version }} failed to load "
                                       "(mlray status shows the error)"},
        },
        {
            "alert": "MlrayReplicasBelowMinimum",
            "expr": f"sum by (application, deployment) (ray_serve_deployment_replica_healthy) "
                    f"< {thresholds.min_replicas}",
            "labels": {"severity": "page"},
            "annotations": {"summary": "{{ $labels.application }}/{{ $labels.deployment }} has {{ $value }} "
                                       f"healthy replicas (minimum {thresholds.min_replicas})"},
        },
    ]
    for rule in rules:
        rule["for"] = thresholds.for_
    return {"groups": [{"name": "mlray", "rules": rules}]}


def session_dir(temp_dir: str | None = None) -> Path | None:
    """The newest local Ray session's folder (``/tmp/ray/session_latest``), if there is one."""
    root = Path(temp_dir or os.environ.get("RAY_TMPDIR") or "/tmp/ray")
    latest = root / "session_latest"
    return latest.resolve() if latest.exists() else None


def ray_discovery_file(session: Path | None) -> Path | None:
    """The service-discovery file the Ray dashboard writes and keeps current (None without a dashboard)."""
    if session is None:
        return None
    found = session / DISCOVERY_FILE
    return found if found.is_file() else None


def discovery_from_nodes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prometheus file-SD content for the metrics port of every live node (``ray.nodes()`` records)."""
    targets = [f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}" for node in nodes if node.get("Alive")]
    if not targets:
        raise MlrayError("the Ray cluster reports no live node with a metrics port")
    return [{"labels": {"job": "ray"}, "targets": targets}]


def prometheus_config(*, discovery: Path, rules: Path, scrape_interval_s: float) -> dict[str, Any]:
    """Ray's own scrape config (a file_sd job named ``ray``) with mlray's rule file."""
    interval = f"{scrape_interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "ray", "file_sd_configs": [{"files": [str(discovery)]}]}],
    }


@dataclass(frozen=True)
class Monitor:
    url: str
    pid: int
    folder: Path
    discovery: Path


def _folder() -> Path:
    return settings.home() / "monitoring"


def _record() -> Path:
    return _folder() / "prometheus.json"


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise MlrayError(f"{name!r} is not installed; on Debian or Ubuntu: apt-get install prometheus")
    return found


def check_rules(path: Path) -> None:
    """``promtool check rules``: a rule file Prometheus would refuse is refused here, with promtool's reason."""
    done = subprocess.run([_binary("promtool"), "check", "rules", str(path)], capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        raise MlrayError(f"promtool refused the rules in {path}: {(done.stdout + done.stderr).strip()}")


def _alive(pid: int) -> bool:
    try:  # reap it first if this process started it (a zombie still answers kill(pid, 0))
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status() -> Monitor | None:
    """The Prometheus that ``up`` started, if it still runs."""
    record = _record()
    if not record.is_file():
        return None
    info = json.loads(record.read_text())
    if not _alive(info["pid"]):
        return None
    return Monitor(url=info["url"], pid=info["pid"], folder=Path(info["folder"]), discovery=Path(info["discovery"]))


def up(*, port: int = DEFAULT_PORT, thresholds: AlertThresholds = AlertThresholds(), scrape_interval_s: float = 5.0,
       nodes: list[dict[str, Any]] | None = None, timeout_s: float = 60.0) -> Monitor:
    """Start Prometheus on 127.0.0.1:``port`` scraping the local Ray cluster, with mlray's alert rules.

    ``nodes`` (``ray.nodes()``) is used only when the cluster has no dashboard to write Ray's own
    service-discovery file. Returns the running one if ``up`` already started it.
    """
    import requests

    running = status()
    if running is not None:
        return running
    folder = _folder()
    folder.mkdir(parents=True, exist_ok=True)
    rules = folder / "mlray-alerts.yml"
    rules.write_text(yaml.safe_dump(alert_rules(thresholds), sort_keys=False))
    check_rules(rules)
    discovery = ray_discovery_file(session_dir())
    if discovery is None:
        if nodes is None:
            raise MlrayError("no Ray dashboard service-discovery file under /tmp/ray/session_latest and no nodes "
                             "given: start the head with its dashboard (mlray quickstart or ray start --head)")
        discovery = folder / DISCOVERY_FILE
        discovery.write_text(json.dumps(discovery_from_nodes(nodes)))
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(discovery=discovery, rules=rules,
                                                       scrape_interval_s=scrape_interval_s), sort_keys=False))
    url = f"http://127.0.0.1:{port}"
    log = (folder / "prometheus.log").open("ab")
    process = subprocess.Popen(
        [_binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise MlrayError(f"prometheus exited with {process.returncode}; see {folder / 'prometheus.log'}")
        try:
            if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise MlrayError(f"prometheus did not get ready at {url} within {timeout_s:.0f} s")
        time.sleep(0.25)
    _record().write_text(json.dumps({"url": url, "pid": process.pid, "folder": str(folder),
                                     "discovery": str(discovery)}))
    logger.info("Prometheus at %s scraping the targets in %s", url, discovery)
    return Monitor(url=url, pid=process.pid, folder=folder, discovery=discovery)


def down(*, timeout_s: float = 30.0) -> bool:
    """Stop the Prometheus that ``up`` started; returns whether one was running."""
    running = status()
    _record().unlink(missing_ok=True)
    if running is None:
        return False
    os.kill(running.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(running.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(running.pid):
        os.kill(running.pid, signal.SIGKILL)
    return True


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """The result vector of an instant PromQL query."""
    import requests

    answer = requests.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    body = answer.json()
    if answer.status_code != 200 or body.get("status") != "success":
        raise MlrayError(f"Prometheus refused {promql!r}: {body.get('error', answer.text[:300])}")
    return list(body["data"]["result"])


def firing_alerts(url: str) -> list[dict[str, Any]]:
    """Alerts Prometheus has firing now (pending ones are left out)."""
    import requests

    body = requests.get(f"{url}/api/v1/alerts", timeout=10).json()
    return [alert for alert in body["data"]["alerts"] if alert.get("state") == "firing"]


class EpochGauges:
    """Training's per-epoch metrics as Prometheus gauges (``ray_mlray_train_epoch_metric``), one series per run
    and metric, exported through Ray's metrics endpoint next to MLflow's record. Rank 0 sets them."""

    def __init__(self, run_id: str) -> None:
        from ray.util import metrics

        self._run_id = run_id
        self._gauge = metrics.Gauge("mlray_train_epoch_metric", description="the latest epoch's training metrics",
                                    tag_keys=("run_id", "metric"))

    def set(self, epoch_metrics: dict[str, float]) -> None:
        for name, value in epoch_metrics.items():
            self._gauge.set(float(value), tags={"run_id": self._run_id, "metric": name})
