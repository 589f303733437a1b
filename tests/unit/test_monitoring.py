"""mlray's alert rules, checked by Prometheus's own tool: `promtool check rules` and `promtool test rules`
(series given as input, alerts expected at given times). No Ray, no running Prometheus."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from mlray.cluster.monitoring import AlertThresholds, alert_rules, check_rules, discovery_from_nodes, prometheus_config
from mlray.errors import ConfigError, MlrayError
from tests.helpers import need_program, printed_lines

need_program("promtool", "apt-get install prometheus")

REQ = 'ray_mlray_requests_total{application="digits",model="digits",status="%s"}'


def _promtool_test(tmp_path: Path, tests: list[dict], thresholds: AlertThresholds = AlertThresholds()) -> str:
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(alert_rules(thresholds)))
    spec = tmp_path / "test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "15s", "tests": tests}))
    done = subprocess.run(["promtool", "test", "rules", str(spec)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(alert_rules(AlertThresholds(min_replicas=2, for_="30s"))))
    check_rules(path)


def test_promtool_refusal_is_reported_with_its_reason(tmp_path: Path) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "sum(("}]}]}))
    with pytest.raises(MlrayError, match="promtool refused the rules"):
        check_rules(path)


def test_error_rate_alert_fires_above_the_threshold_only(tmp_path: Path) -> None:
    # 10 % of requests are 5xx in "digits", 1 % in "other": only digits fires, after the 1-minute hold.
    _promtool_test(tmp_path, [{
        "interval": "15s",
        "input_series": [
            {"series": REQ % "200", "values": "0+90x20"},
            {"series": REQ % "500", "values": "0+10x20"},
            {"series": REQ.replace('"digits"', '"other"') % "200", "values": "0+99x20"},
            {"series": REQ.replace('"digits"', '"other"') % "503", "values": "0+1x20"},
        ],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "MlrayHighErrorRate", "exp_alerts": []},  # pending, not firing
            {"eval_time": "4m", "alertname": "MlrayHighErrorRate", "exp_alerts": [{
                "exp_labels": {"severity": "page", "application": "digits", "model": "digits"},
                "exp_annotations": {"summary": "digits answers 10% of requests with a 5xx (threshold 5%)"},
            }]},
        ],
    }])


def test_latency_and_replica_alerts(tmp_path: Path) -> None:
    bucket = 'ray_mlray_request_latency_seconds_bucket{application="a",model="m",le="%s"}'
    _promtool_test(tmp_path, [{
        "interval": "15s",
        "input_series": [
            # every request takes between 0.5 and 1 s: p99 is above 0.25 s
            {"series": bucket % "0.5", "values": "0+0x20"},
            {"series": bucket % "1.0", "values": "0+100x20"},
            {"series": bucket % "+Inf", "values": "0+100x20"},
            {"series": 'ray_serve_deployment_replica_healthy{application="a",deployment="ModelServer",replica="r1"}',
             "values": "1x20"},
            {"series": 'ray_serve_deployment_replica_healthy{application="a",deployment="ModelServer",replica="r2"}',
             "values": "1x4 0x16"},
        ],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "MlrayHighLatencyP99",
             "exp_alerts": [{"exp_labels": {"severity": "ticket", "application": "a", "model": "m"},
                             "exp_annotations": {
                                 "summary": "m: p99 inside the replica is 0.995 s (threshold 0.25 s)"}}]},
            # two replicas for the first minute, then one: below a minimum of 2 once the hold has passed
            {"eval_time": "45s", "alertname": "MlrayReplicasBelowMinimum", "exp_alerts": []},
            {"eval_time": "4m", "alertname": "MlrayReplicasBelowMinimum",
             "exp_alerts": [{"exp_labels": {"severity": "page", "application": "a", "deployment": "ModelServer"},
                             "exp_annotations": {"summary": "a/ModelServer has 1 healthy replicas (minimum 2)"}}]},
        ],
    }], AlertThresholds(min_replicas=2))


@pytest.mark.parametrize("values", ["0x4 1x20", "_x4 1x20"], ids=["counter-rises", "counter-appears-at-1"])
def test_load_failure_alert(tmp_path: Path, values: str) -> None:
    failures = 'ray_mlray_model_load_failures_total{application="a",model="m",version="7",replica="r1"}'
    _promtool_test(tmp_path, [{
        "interval": "15s",
        "input_series": [{"series": failures, "values": values}],
        "alert_rule_test": [
            {"eval_time": "30s", "alertname": "MlrayModelLoadFailures", "exp_alerts": []},
            {"eval_time": "3m", "alertname": "MlrayModelLoadFailures", "exp_alerts": [
                {"exp_labels": {"severity": "ticket", "application": "a", "model": "m", "version": "7"},
                 "exp_annotations": {"summary": "m version 7 failed to load (mlray status shows the error)"}}]},
        ],
    }])


@pytest.mark.parametrize(("field", "value", "message"), [
    ("error_ratio", 1.5, "error_ratio must be between 0 and 1, got 1.5"),
    ("p99_seconds", 0.0, "p99_seconds must be positive, got 0.0"),
    ("min_replicas", 0, "min_replicas must be at least 1, got 0"),
])
def test_bad_thresholds_are_named(field: str, value: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AlertThresholds(**{field: value})


def test_discovery_lists_live_nodes_metrics_ports() -> None:
    nodes = [
        {"Alive": True, "NodeManagerAddress": "10.0.0.5", "MetricsExportPort": 61000},
        {"Alive": False, "NodeManagerAddress": "10.0.0.6", "MetricsExportPort": 61001},
        {"Alive": True, "NodeManagerAddress": "10.0.0.7", "MetricsExportPort": 61002},
    ]
    assert discovery_from_nodes(nodes) == [{"labels": {"job": "ray"}, "targets": ["10.0.0.5:61000", "10.0.0.7:61002"]}]
    with pytest.raises(MlrayError, match="no live node"):
        discovery_from_nodes(nodes[1:2])


def test_prometheus_config_is_rays_scrape_job_with_mlrays_rules(tmp_path: Path) -> None:
    config = prometheus_config(discovery=tmp_path / "sd.json", rules=tmp_path / "rules.yml", scrape_interval_s=5)
    assert config["rule_files"] == [str(tmp_path / "rules.yml")]
    sd = {"files": [str(tmp_path / "sd.json")]}
    assert config["scrape_configs"] == [{"job_name": "ray", "file_sd_configs": [sd]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(alert_rules()))
    (tmp_path / "sd.json").write_text("[]")
    done = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cli_refuses_a_bad_threshold_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from mlray.cli import run

    assert run(["monitor", "up", "--error-ratio", "2"]) == 1
    assert printed_lines(capsys.readouterr().err) == ["error: error_ratio must be between 0 and 1, got 2.0"]


def test_cli_down_without_a_running_prometheus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from mlray.cli import run

    monkeypatch.setenv("MLRAY_HOME", str(tmp_path))
    assert run(["monitor", "down", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"stopped": False}
