"""The seam between mlray and Ray (mlray/_ray/): nothing private of Ray's is used elsewhere, every HAProxy
rewrite rule still applies to the config Ray's real template renders, and the metrics-agent renice finds
only the agent of the caller's own raylet."""

from __future__ import annotations

import ast
import logging
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("mlray", "jobs", "serve_apps")
SEAM = ROOT / "mlray" / "_ray"
TORCH_SEAM = ROOT / "mlray" / "_torch.py"  # the same for PyTorch's state-dict and quantized-tensor internals
PRIVATE_IMPORT = re.compile(r"\b(ray\._private|serve\._private|_internal)\b")


def _python_files() -> list[Path]:
    files = [p for folder in SCANNED for p in (ROOT / folder).rglob("*.py")]
    return [p for p in files if SEAM not in p.parents and p != TORCH_SEAM]


def private_uses(source: str) -> list[str]:
    """Private Ray imports and underscore attributes of anything but ``self``/``cls`` in ``source``."""
    found = [f"line {n}: {line.strip()}" for n, line in enumerate(source.splitlines(), 1)
             if PRIVATE_IMPORT.search(line)]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray":
            found += [f"line {node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if a.name.startswith("_")]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
              and str(node.args[1].value).startswith("_") and not str(node.args[1].value).startswith("__")):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_private_ray_use_outside_the_seam():
    offenders = {str(p.relative_to(ROOT)): private_uses(p.read_text()) for p in _python_files()}
    offenders = {path: uses for path, uses in offenders.items() if uses}
    assert not offenders, f"private API use outside mlray/_ray/ and mlray/_torch.py (move it into a seam): {offenders}"


@pytest.mark.parametrize("snippet", [
    "import ray._private.state",
    "from ray.serve._private.haproxy import HAProxyApi",
    "from ray.train.v2._internal import x",
    "handle._init(_run_router_in_separate_loop=True)",
    "cast(Any, tuner)._local_tuner.get_run_config()",
    "from ray.util import _helper",
    "getattr(handle, '_init')()",
])
def test_the_scan_catches_each_kind(snippet):
    assert private_uses(snippet)


def test_the_scan_leaves_public_code_alone():
    assert private_uses("self._loop = None\nserve.get_deployment_handle('x', app_name='y').__class__\n") == []


@pytest.fixture
def default_serve_env(monkeypatch):
    for key in ("MLRAY_SERVE_CANCEL_ON_DISCONNECT", "RAY_SERVE_HAPROXY_LOG_TARGET",
                "RAY_SERVE_HAPROXY_METRICS_ENABLED"):
        monkeypatch.delenv(key, raising=False)


def test_every_rewrite_rule_applies_to_rays_real_template(tmp_path, default_serve_env):
    from mlray._ray.haproxy import RULES, active_rules, rewrite_ray_template

    assert {rule.name for rule in active_rules()} == set(RULES)  # the default environment uses every rule
    text, missed = rewrite_ray_template(tmp_path)
    assert missed == [], missed
    assert "bind :" not in text and "bind *:" not in text  # no listener left on every interface
    frontend = text.split("\nfrontend http_frontend\n", 1)[1]
    assert frontend.index("x-request-disconnect-disabled") < frontend.index("bind ")


def test_with_metrics_on_the_access_log_rule_is_off_and_the_rest_still_apply(tmp_path, default_serve_env,
                                                                               monkeypatch):
    from mlray._ray.haproxy import active_rules, rewrite_ray_template

    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_ENABLED", "1")
    assert "no-access-log" not in {rule.name for rule in active_rules()}
    _, missed = rewrite_ray_template(tmp_path)
    assert missed == [], missed


def test_a_rule_that_matches_nothing_is_reported_by_the_wrapper_and_the_check(tmp_path, default_serve_env):
    """A future template that renames the HTTP frontend: the wrapper says so on stderr, the rule reads as missed."""
    from mlray._ray.haproxy import RULES, render_ray_template, write_wrapper

    config = render_ray_template(tmp_path, stats_port=8404, metrics_port=9101)
    renamed = config.read_text().replace("frontend http_frontend", "frontend serve_http")
    config.write_text(renamed)
    wrapper = write_wrapper(tmp_path / "wrapper")
    done = subprocess.run([str(wrapper), "-c", "-f", str(config)], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert "mlray: HAProxy rewrite 'frontend-rules' matched nothing" in done.stderr
    assert not RULES["prediction-header"].applied(config.read_text(), 8404, 9101)
    assert RULES["loopback-binds"].applied(config.read_text(), 8404, 9101)


@pytest.mark.parametrize("change", ["close-spread-time", "no idle-close-on-response", "short hard-stop-after"])
def test_a_config_that_would_close_idle_connections_on_reload_is_caught(tmp_path, default_serve_env, change):
    """Ray's config keeps idle keep-alive connections through a reload; each way of losing that is caught."""
    from mlray._ray.haproxy import RULES

    text = render_ray_template_text(tmp_path)
    assert RULES["reload-keeps-idle"].applied(text, 8404, 9101)
    if change == "close-spread-time":
        text = re.sub(r"^global$", "global\n    close-spread-time 2s", text, count=1, flags=re.M)
    elif change == "no idle-close-on-response":
        text = text.replace("option idle-close-on-response", "")
    else:
        text = re.sub(r"hard-stop-after \S+", "hard-stop-after 60s", text)
    assert not RULES["reload-keeps-idle"].applied(text, 8404, 9101), change


def test_requests_are_buffered_once_so_haproxy_can_replay_them(tmp_path, default_serve_env):
    """``option http-buffer-request`` lands in the HTTP frontend once, even when HAProxy is started again on a
    config the wrapper already rewrote; a config without it reads as missed."""
    from mlray._ray.haproxy import RULES, render_ray_template, write_wrapper

    config = render_ray_template(tmp_path, stats_port=8404, metrics_port=9101)
    assert not RULES["buffer-request"].applied(config.read_text(), 8404, 9101)  # Ray's own config lacks it
    wrapper = write_wrapper(tmp_path / "wrapper")
    for _ in range(2):
        done = subprocess.run([str(wrapper), "-c", "-f", str(config)], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stdout + done.stderr
    text = config.read_text()
    assert RULES["buffer-request"].applied(text, 8404, 9101)
    assert text.count("option http-buffer-request") == 1
    frontend = text.split("\nfrontend http_frontend\n", 1)[1].split("\nbackend ", 1)[0]
    assert "option http-buffer-request" in frontend


def render_ray_template_text(folder) -> str:
    from mlray._ray.haproxy import render_ray_template

    return render_ray_template(folder, stats_port=8404, metrics_port=9101).read_text()


def test_verify_warns_loudly_when_ray_changes(monkeypatch, caplog, default_serve_env):
    from mlray._ray import haproxy

    def broken(folder, **ports):
        raise ImportError("cannot import name 'HAProxyApi'")

    monkeypatch.setattr(haproxy, "render_ray_template", broken)
    with caplog.at_level(logging.WARNING, logger="mlray._ray.haproxy"):
        problems = haproxy.verify_against_ray()
    assert problems and "HAProxyApi" in problems[0]
    assert any("does not apply" in r.getMessage() and "HAProxyApi" in r.getMessage() for r in caplog.records)


def test_a_different_ray_version_is_warned_about(monkeypatch, caplog):
    import mlray._ray as seam

    monkeypatch.setattr(seam, "WRITTEN_FOR", "0.0.1")
    seam.check_version.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mlray._ray"):
            assert seam.check_version("test item") is False
        assert any("written for Ray 0.0.1" in r.getMessage() for r in caplog.records)
    finally:
        seam.check_version.cache_clear()


def test_ray_is_the_version_the_seam_was_written_for():
    import mlray._ray as seam

    assert seam.installed_ray_version() == seam.WRITTEN_FOR, "review every item in mlray/_ray/, then bump it"


def _fake_node(folder: Path) -> subprocess.Popen:
    """A process named ``raylet`` that starts an "agent" (python running .../ray/dashboard/agent.py) and a
    "worker", as a Ray node does."""
    agent = folder / "ray" / "dashboard" / "agent.py"
    agent.parent.mkdir(parents=True)
    agent.write_text("import time\ntime.sleep(120)\n")
    raylet = folder / "raylet"
    python = sys.executable  # the child's own sys.executable would follow its argv[0], "raylet"
    raylet.write_text(f"import subprocess, time\n"
                      f"subprocess.Popen([{python!r}, {str(agent)!r}])\n"
                      f"subprocess.Popen([{python!r}, '-c', 'import time; time.sleep(120)'])\n"
                      f"time.sleep(120)\n")
    return subprocess.Popen([str(raylet), str(raylet)], executable=sys.executable)  # argv[0]: .../raylet


def test_only_the_agent_of_the_callers_own_raylet_is_found(tmp_path):
    import psutil

    from mlray._ray.agent import own_metrics_agents

    mine, other = tmp_path / "mine", tmp_path / "other"
    mine.mkdir()
    other.mkdir()
    nodes = [_fake_node(mine), _fake_node(other)]
    try:
        deadline = time.monotonic() + 30
        while any(len(psutil.Process(n.pid).children()) < 2 for n in nodes):
            assert time.monotonic() < deadline, "the fake nodes did not start their children"
            time.sleep(0.05)
        node = psutil.Process(nodes[0].pid)
        worker = next(c for c in node.children() if "-c" in c.cmdline())
        agent = next(c for c in node.children() if "-c" not in c.cmdline())
        assert [p.pid for p in own_metrics_agents(worker.pid)] == [agent.pid]
        assert own_metrics_agents() == []  # pytest itself runs under no raylet
    finally:
        for n in nodes:
            for child in psutil.Process(n.pid).children():
                child.kill()
            n.kill()
            n.wait(timeout=10)


def test_haproxy_marks_exactly_the_route_tables_prediction_paths() -> None:
    # The wrapper's rule is a literal (the seam does not import the serving stack); the route table is the
    # source of truth, so a new prediction route must appear in the rule too.
    from mlray._ray.haproxy import PREDICTION_RULE
    from mlray.serving.routes import PREDICTION_PATH_ENDS

    assert PREDICTION_RULE.endswith("{ path_end " + " ".join(PREDICTION_PATH_ENDS) + " }")


def test_haproxy_ports_are_distinct_free_and_outside_the_ephemeral_range(tmp_path):
    """A port from the ephemeral range can be taken by an outgoing connection before HAProxy binds it."""
    from mlray._ray.haproxy import RESERVED_PORTS, _ephemeral_ports, haproxy_env

    env = haproxy_env(tmp_path / "run")
    names = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
             "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
    ports = [int(env[name]) for name in names]
    assert len(set(ports)) == 4, ports
    ephemeral = _ephemeral_ports()
    assert all(port in RESERVED_PORTS and port not in ephemeral for port in ports), (ports, ephemeral)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free now
