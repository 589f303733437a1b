"""mlray's HAProxy wrapper (mlray.serve_env): what it rewrites in the config Ray writes, checked by the
HAProxy binary that ships with Ray (`haproxy -c`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

# The parts of Ray's template that the wrapper touches (ray/serve/_private/haproxy_templates.py).
CONFIG = """global
    maxconn 100
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind 127.0.0.1:18000
    acl healthcheck path -i /-/healthz
    default_backend app
backend app
    server replica 127.0.0.1:30002 check
listen stats
  bind *:8404
  stats enable
"""
RULE = "http-request set-header x-request-disconnect-disabled ?1 if METH_POST { path_end :predict /infer /invocations }"


def _check(wrapper: str, config: Path) -> str:
    """Runs the wrapper as Ray does on each start and reload, in HAProxy's check-only mode."""
    done = subprocess.run([wrapper, "-c", "-f", str(config)], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    return config.read_text()


def test_wrapper_binds_loopback_and_marks_prediction_routes_once(tmp_path):
    from mlray.serve_env import haproxy_env

    wrapper = haproxy_env(tmp_path / "run")["RAY_SERVE_HAPROXY_BINARY_PATH"]
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG)
    first = _check(wrapper, config)
    assert "bind 127.0.0.1:9101" in first and "bind 127.0.0.1:8404" in first and "bind *:" not in first
    frontend = first.split("frontend http_frontend\n", 1)[1].split("\nbackend ", 1)[0]
    assert frontend.startswith(f"    {RULE}\n")
    assert first.count(RULE) == 1
    assert _check(wrapper, config) == first  # a second run (a reload of the same file) adds nothing


def test_cancel_on_disconnect_keeps_serves_watcher(tmp_path, monkeypatch):
    from mlray.serve_env import haproxy_env

    monkeypatch.setenv("MLRAY_SERVE_CANCEL_ON_DISCONNECT", "1")
    wrapper = haproxy_env(tmp_path / "run")["RAY_SERVE_HAPROXY_BINARY_PATH"]
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG)
    rewritten = _check(wrapper, config)
    assert "x-request-disconnect-disabled" not in rewritten and "bind 127.0.0.1:8404" in rewritten


@pytest.mark.parametrize("path", ["/v1/models/digits:predict", "/v2/models/digits/infer", "/invocations"])
def test_the_rule_names_every_prediction_route(path):
    from mlray.serving.fastpath import match

    assert match(path) is not None  # the fast path's own list of prediction routes
    assert any(path.endswith(end) for end in RULE.split("path_end ", 1)[1].rstrip(" }").split())


@pytest.mark.parametrize(("cmdline", "agent"), [
    (["ray::DashboardAgent"], True),
    (["/env/bin/python", "-u", "/env/lib/python3.11/site-packages/ray/dashboard/agent.py", "--node-ip=x"], True),
    # The raylet's command line carries the agent's whole command: it must keep its priority.
    (["/env/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet",
      "--dashboard_agent_command=/env/bin/python -u /env/lib/python3.11/site-packages/ray/dashboard/agent.py"], False),
    (["ray::ServeReplica:digits:ModelServer"], False),
    ([], False),
])
def test_only_the_metrics_agent_itself_is_matched(cmdline, agent):
    from mlray.serve_env import is_metrics_agent

    assert is_metrics_agent(cmdline) is agent
