"""Acceptance (b) and (f), through the real command line: the quickstart on a fresh home, then
`ray job submit` of jobs/train.py against the head it started, the registry CLI, and `mlray down`.

This module runs before tests/integration (pytest collects e2e/ first) and owns its Ray head: a
`ray start --head` (dashboard on 127.0.0.1:8265) started by the quickstart and stopped by `mlray down`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.helpers import free_port, ray_processes, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e-home")
    values = {**os.environ, "MLRAY_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}",
              "RAY_AUTH_MODE": "disabled"}
    values.pop("RAY_ADDRESS", None)
    yield values
    # whatever happened above, leave no Ray behind
    subprocess.run([str(BIN / "mlray"), "down"], env=values, cwd=ROOT, capture_output=True, timeout=180)


def run(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quickstart(env):
    port = free_port()
    done = run([str(BIN / "mlray"), "quickstart", "--port", str(port)], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return port, done.stdout


def test_quickstart_trains_serves_and_says_where_to_look(quickstart, env):
    port, out = quickstart
    accuracy = float(re.search(r"Test accuracy:\s+([0-9.]+)", out).group(1))
    assert accuracy >= 0.95
    predictions = re.findall(r"true (\d)\s+predicted (\d)", out)
    assert len(predictions) == 5 and sum(t == p for t, p in predictions) >= 4
    assert "Ray dashboard:   http://127.0.0.1:8265" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{env['MLRAY_HOME']}/mlflow.db" in out
    assert f"curl -s -X POST http://127.0.0.1:{port}/v1/models/digits:predict" in out
    assert "mlray down" in out
    # the model stays served after the command has returned
    body = requests.get(f"http://127.0.0.1:{port}/v1/models/digits", timeout=10).json()
    assert body["ready"] and body["alias"] == "champion" and body["version"] == 1
    assert requests.get("http://127.0.0.1:8265/api/version", timeout=10).status_code == 200


def test_the_local_default_serves_through_haproxy_on_loopback_only(quickstart):
    """mlray's head runs Serve with HAProxy (mlray.serve_env); none of its HTTP listeners reach past loopback:
    the frontend, HAProxy's stats and metrics ports (rewritten by mlray's wrapper), the replicas' direct
    ingress ports (30000-31000), the dashboard."""
    from mlray.listeners import listeners

    port, _ = quickstart
    found = listeners()
    haproxy = [item for item in found if item.role == "ray-serve-haproxy"]
    assert len(haproxy) >= 3, found  # the frontend, stats, Prometheus
    assert [item for item in haproxy if item.exposed] == []
    assert port in {item.port for item in haproxy}
    direct = [item for item in found if 30000 <= item.port <= 31000]
    assert direct and [item for item in direct if item.exposed] == []
    assert [item for item in found if item.port in (port, 8265) and item.exposed] == []


def test_ray_job_submit_registers_a_new_version(quickstart, env):
    done = run([str(BIN / "ray"), "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".",
                "--", "python", "jobs/train.py", "--config", "configs/digits.yaml", "--epochs", "5"], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    submission = re.search(r"(raysubmit_\w+)", done.stdout).group(1)
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith('{"run_id"')][-1])
    assert result["version"] == 2

    listing = run([str(BIN / "mlray"), "models"], env)
    assert listing.returncode == 0 and "@champion=1" in listing.stdout and "v2" in listing.stdout

    from mlray.registry import get_version

    os.environ["MLRAY_HOME"], saved = env["MLRAY_HOME"], os.environ.get("MLRAY_HOME")
    try:
        version = get_version("digits", version=2)
    finally:
        os.environ["MLRAY_HOME"] = saved or ""
    assert version.tags["ray.job_id"] == submission
    assert len(version.tags["git.commit"]) == 40
    assert version.run_id == result["run_id"]


def test_promote_cli_and_down_leaves_nothing_running(quickstart, env):
    promoted = run([str(BIN / "mlray"), "promote", "digits", "--version", "2", "--alias", "challenger"], env)
    assert promoted.returncode == 0, promoted.stderr
    assert "digits@challenger -> version 2" in promoted.stdout
    missing = run([str(BIN / "mlray"), "promote", "digits", "--version", "9"], env)
    assert missing.returncode == 1 and "has no version 9" in missing.stderr  # a user error, not a usage error

    down = run([str(BIN / "mlray"), "down"], env, timeout=180)
    assert down.returncode == 0 and "stopped the local Ray cluster" in down.stdout
    wait_for(lambda: not ray_processes(), timeout=60, what="every Ray process gone")
