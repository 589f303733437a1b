"""mlray's HAProxy wrapper (mlray.cluster.serve_env): what it rewrites in the config Ray writes, checked by the
HAProxy binary that ships with Ray (`haproxy -c`)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# The parts of Ray's template that the wrapper touches (ray/serve/_private/haproxy_templates.py).
CONFIG = """global
    maxconn 100
    log 127.0.0.1:514 local0 info
defaults
    mode http
    log global
    option httplog
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
    from mlray.cluster.serve_env import haproxy_env

    wrapper = haproxy_env(tmp_path / "run")["RAY_SERVE_HAPROXY_BINARY_PATH"]
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG)
    first = _check(wrapper, config)
    assert "bind 127.0.0.1:9101" in first and "bind 127.0.0.1:8404" in first and "bind *:" not in first
    frontend = first.split("frontend http_frontend\n", 1)[1].split("\nbackend ", 1)[0]
    assert f"    {RULE}\n" in frontend and frontend.index(RULE) < frontend.index("bind ")
    assert first.count(RULE) == 1
    assert frontend.startswith("    no log  # mlray:") and first.count("no log  # mlray:") == 1
    assert _check(wrapper, config) == first  # a second run (a reload of the same file) adds nothing


def test_cancel_on_disconnect_keeps_serves_watcher(tmp_path, monkeypatch):
    from mlray.cluster.serve_env import haproxy_env

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
    from mlray.cluster.serve_env import is_metrics_agent

    assert is_metrics_agent(cmdline) is agent


@pytest.mark.parametrize("env", [{"RAY_SERVE_HAPROXY_LOG_TARGET": "127.0.0.1:514"},
                                 {"RAY_SERVE_HAPROXY_METRICS_ENABLED": "1"}])
def test_access_log_is_kept_where_something_reads_it(tmp_path, monkeypatch, env):
    """A log target set by hand has a listener; with HAProxy's metrics on, Serve reads that frontend's log."""
    from mlray.cluster.serve_env import haproxy_env

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    wrapper = haproxy_env(tmp_path / "run")["RAY_SERVE_HAPROXY_BINARY_PATH"]
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG)
    rewritten = _check(wrapper, config)
    assert "no log" not in rewritten and RULE in rewritten


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("log_target_set", [False, True])
def test_haproxy_sends_no_request_log_lines_unless_a_target_is_set(tmp_path, monkeypatch, log_target_set):
    """The real HAProxy, run through the wrapper, in front of a loopback backend: its access-log datagrams are
    counted at a UDP socket standing in for syslog."""
    import requests

    from mlray.cluster.serve_env import haproxy_env

    syslog = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    syslog.bind(("127.0.0.1", 0))
    syslog.settimeout(0.2)
    target = f"127.0.0.1:{syslog.getsockname()[1]}"
    if log_target_set:
        monkeypatch.setenv("RAY_SERVE_HAPROXY_LOG_TARGET", target)
    backend = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    front = _free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG.replace("127.0.0.1:514", target).replace("127.0.0.1:18000", f"127.0.0.1:{front}")
                      .replace("127.0.0.1:30002", f"127.0.0.1:{backend.server_address[1]}")
                      .replace(":9101", f":{_free_port()}").replace(":8404", f":{_free_port()}"))
    wrapper = haproxy_env(tmp_path / "run")["RAY_SERVE_HAPROXY_BINARY_PATH"]
    proxy = subprocess.Popen([wrapper, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                answered = requests.post(f"http://127.0.0.1:{front}/v1/models/m:predict", json={}, timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "HAProxy did not start"
                time.sleep(0.1)
        for _ in range(5):
            assert requests.post(f"http://127.0.0.1:{front}/invocations", json={}, timeout=5).status_code == 200
        assert answered.status_code == 200
        lines = []
        try:
            while True:
                lines.append(syslog.recv(65536))
        except TimeoutError:
            pass
        requests_logged = [line for line in lines if b"POST /" in line]
        assert len(requests_logged) == (6 if log_target_set else 0), lines
    finally:
        proxy.kill()
        proxy.wait(timeout=10)
        backend.shutdown()
        syslog.close()


def _replica(name: str, claims: set[str]) -> ThreadingHTTPServer:
    """A loopback stand-in for a replica: answers its name, and claims the models in ``claims``."""

    class Replica(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("content-length", 0)))
            model = self.headers.get("x-mlray-model") or self.path.split("/models/")[-1].split(":")[0].split("/")[0]
            self.send_response(200)
            self.send_header("content-length", str(len(name)))
            if model in claims:
                self.send_header("x-mlray-affinity", model)
            self.end_headers()
            self.wfile.write(name.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Replica)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_haproxy_sends_a_claimed_models_requests_to_the_replica_that_claimed_it(tmp_path):
    """The real HAProxy through the wrapper, in front of two stand-in replicas: requests for a model nobody
    claims are balanced; once a replica's answer claims a model, every request for it (by V1, V2 or the
    /invocations header) goes there; a second run of the wrapper adds nothing."""
    import requests

    from mlray.cluster.serve_env import haproxy_env

    replicas = {"one": _replica("one", set()), "two": _replica("two", {"m2"})}
    front = _free_port()
    config = tmp_path / "haproxy.cfg"
    servers = "".join(f"    server {name} 127.0.0.1:{server.server_address[1]}\n" for name, server in replicas.items())
    config.write_text(CONFIG.replace("127.0.0.1:18000", f"127.0.0.1:{front}")
                      .replace("    server replica 127.0.0.1:30002 check\n", servers)
                      .replace(":9101", f":{_free_port()}").replace(":8404", f":{_free_port()}"))
    wrapper = haproxy_env(tmp_path / "run")["RAY_SERVE_HAPROXY_BINARY_PATH"]
    rewritten = _check(wrapper, config)
    assert rewritten.count("stick store-response res.hdr(x-mlray-affinity)") == 1
    assert _check(wrapper, config) == rewritten
    proxy = subprocess.Popen([wrapper, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})
    base = f"http://127.0.0.1:{front}/app"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.post(f"{base}/v1/models/m1:predict", json={}, timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "HAProxy did not start"
                time.sleep(0.1)
        with requests.Session() as session:
            unclaimed = {session.post(f"{base}/v1/models/m1:predict", json={}, timeout=5).text for _ in range(6)}
            assert unclaimed == {"one", "two"}  # balanced as without affinity
            first = [session.post(f"{base}/v1/models/m2:predict", json={}, timeout=5).text for _ in range(2)]
            assert "two" in first  # round robin reached the claiming replica once
            after = [session.post(f"{base}/v1/models/m2:predict", json={}, timeout=5).text for _ in range(6)]
            after += [session.post(f"{base}/v2/models/m2/infer", json={}, timeout=5).text for _ in range(3)]
            after += [session.post(f"{base}/invocations", json={}, headers={"x-mlray-model": "m2"}, timeout=5).text
                      for _ in range(3)]
            assert set(after) == {"two"}, after
    finally:
        proxy.kill()
        proxy.wait(timeout=10)
        for server in replicas.values():
            server.shutdown()
