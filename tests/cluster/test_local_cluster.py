"""`ray up cluster.local.yaml` for real, on two SSH hosts (network-namespace hosts on this machine): a head
with MLflow and token auth, a worker the autoscaler adds for a job and removes when idle, the security
properties of what runs, and a teardown that leaves nothing.

The tests run in file order on one cluster (module-scoped fixtures in conftest.py). Printed lines starting
with "lab:" are the timings (run with -s to see them).
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests
import yaml

from mlray.cluster.listeners import EXPOSED_BY_DESIGN, LOOPBACK, WILDCARD, Listener, findings
from tests.cluster.conftest import BIN, IDLE_TIMEOUT_MINUTES, ROOT, LabCluster, Tunnel
from tests.helpers import free_port, wait_for
from tests.listener_probes import how_it_refuses

pytestmark = pytest.mark.integration

JOB_WORKERS = 3  # Train workers of 1 CPU each: the head has 2 CPUs, so the job needs a worker node
JOB_TIMEOUT_S = 900  # 112-144 s on 2 cores beside another test suite; 231 s under a load average of 10


def ray_processes(lines: list[str]) -> list[str]:
    return [line for line in lines if re.search(r"raylet|gcs_server|ray::|ray/dashboard|monitor\.py", line)]


def monitor_events(cluster: LabCluster) -> dict[str, datetime]:
    """When the head's autoscaler queued the worker, found it up to date, and removed it as idle."""
    log = cluster.lab.ray_log("head", "monitor.log") + cluster.lab.ray_log("head", "monitor.out")
    marks = {"launch": "Launching 1 nodes", "ready": "New status: up-to-date", "idle_removed": "(idle)"}
    events = {}
    for line in re.sub(r"\x1b\[[0-9;]*m", "", log).splitlines():
        stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
        for event, mark in marks.items():
            if stamp and mark in line and event not in events:
                events[event] = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
    return events


def alive_nodes(cluster: LabCluster) -> int:
    out = cluster.lab.ssh("head", "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.mlray/secrets/ray_token "
                                  "~/mlray-env/bin/ray status").stdout
    active = out.split("Active:")[1].split("Pending:")[0]
    return sum(int(n) for n in re.findall(r"^\s*(\d+) ", active, re.M))


# -- launch ------------------------------------------------------------------------------------------------


def test_the_lab_runs_cluster_local_yaml(cluster: LabCluster, raw_local_config: dict[str, Any]) -> None:
    launched = yaml.safe_load(cluster.config.read_text())
    changed = {key for key in launched if launched[key] != raw_local_config[key]}
    assert changed == {"cluster_name", "auth", "file_mounts", "idle_timeout_minutes"}
    assert launched["auth"]["ssh_user"] == raw_local_config["auth"]["ssh_user"]
    assert list(launched["file_mounts"]) == list(raw_local_config["file_mounts"])


@pytest.mark.timeout(480)
def test_ray_up_starts_the_head_with_mlflow_and_token_auth(cluster: LabCluster) -> None:
    log = cluster.up.stdout + cluster.up.stderr
    assert cluster.up.returncode == 0, log[-4000:]
    print(f"\nlab: ray up took {cluster.up_seconds:.1f} s")
    assert "MLflow jobs user: 200" in log
    head = cluster.lab.processes("head")
    for needed in ("gcs_server", "raylet", "mlflow server --app-name basic-auth"):
        assert any(needed in line for line in head), (needed, head)
    # min_workers: 0, so the worker machine runs nothing until a job needs it.
    assert ray_processes(cluster.lab.processes("worker1")) == []
    assert requests.get(f"{cluster.mlflow_url}/health", timeout=10).status_code == 200

    # On the head, a Ray CLI without the token is refused; with it, it works.
    status = "~/mlray-env/bin/ray status"
    refused = cluster.lab.ssh("head", f"RAY_AUTH_MODE=disabled {status}")
    assert refused.returncode != 0 and "InvalidAuthToken" in refused.stdout + refused.stderr
    assert alive_nodes(cluster) == 1


@pytest.mark.timeout(120)
def test_a_job_without_the_token_is_refused(cluster: LabCluster, dashboard: Tunnel) -> None:
    assert requests.get(f"{dashboard.url}/api/version", timeout=10).status_code == 401
    token = (cluster.secrets / "ray_token").read_text()
    assert requests.get(f"{dashboard.url}/api/version", headers={"Authorization": f"Bearer {token}"},
                        timeout=10).status_code == 200
    done = cluster.ray("job", "submit", "--address", dashboard.url, "--", "echo", "never runs", timeout=60)
    assert done.returncode != 0
    assert "Missing authentication token" in done.stdout + done.stderr
    wrong = cluster.ray("job", "list", "--address", dashboard.url, timeout=60,
                        extra_env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})
    assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stdout + wrong.stderr


# -- a job that scales the cluster out ---------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedOnCluster:
    output: str
    seconds: float
    ended: datetime  # the lab hosts share this machine's clock
    result: dict[str, Any]
    submission_id: str
    worker_joined: bool


def worker_runs_ray(cluster: LabCluster) -> bool:
    return any("raylet" in line for line in cluster.lab.processes("worker1"))


@pytest.fixture(scope="module")
def trained(cluster: LabCluster, dashboard: Tunnel) -> TrainedOnCluster:
    """`ray job submit` of jobs/train.py with 3 workers, watching the worker host and the autoscaler meanwhile."""
    started, worker_joined = time.monotonic(), False
    submit = subprocess.Popen(
        [str(BIN / "ray"), "job", "submit", "--address", dashboard.url, "--working-dir", ".", "--", "python",
         "jobs/train.py", "--config", "configs/digits.yaml", "--epochs", "3", "--workers", str(JOB_WORKERS)],
        cwd=ROOT, env=cluster.env(token=True), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while submit.poll() is None and time.monotonic() - started < JOB_TIMEOUT_S:
            worker_joined = worker_joined or worker_runs_ray(cluster)
            # v1 then leaves the relaunched worker "uninitialized" for good (8 minutes in one run): fail now.
            if "(launch failed)" in cluster.lab.ray_log("head", "monitor.log"):
                pytest.fail("the autoscaler failed to start Ray on the worker; its raylet.out says why (on a "
                            "loaded machine: `Timed out waiting for file .../metrics_agent_port_...`, "
                            "ray-project/ray#65983)")
            time.sleep(1)
        assert submit.poll() is not None, f"the job ran past {JOB_TIMEOUT_S} s"
    finally:
        if submit.poll() is None:
            submit.kill()
        output = submit.communicate(timeout=30)[0]
    seconds = time.monotonic() - started
    ended = datetime.now()
    assert submit.returncode == 0, output[-6000:]
    result = json.loads([line for line in output.splitlines() if line.startswith('{"run_id"')][-1])
    submission = re.search(r"(raysubmit_\w+)", output)
    assert submission is not None
    return TrainedOnCluster(output=output, seconds=seconds, ended=ended, result=result,
                            submission_id=submission.group(1), worker_joined=worker_joined)


@pytest.mark.timeout(JOB_TIMEOUT_S + 300)
@pytest.mark.slow
def test_a_job_that_needs_more_than_the_head_adds_a_worker_registers_and_the_idle_worker_goes(
        cluster: LabCluster, trained: TrainedOnCluster) -> None:
    jobs = cluster.credentials("jobs.env")
    auth = (jobs["MLFLOW_TRACKING_USERNAME"], jobs["MLFLOW_TRACKING_PASSWORD"])
    assert trained.worker_joined, "the autoscaler never started Ray on the worker"

    # Registered in the head's MLflow server, with the job's lineage, trained on both nodes.
    version = requests.get(f"{cluster.mlflow_url}/api/2.0/mlflow/model-versions/get", auth=auth, timeout=30,
                           params={"name": "digits", "version": trained.result["version"]}).json()["model_version"]
    tags = {tag["key"]: tag["value"] for tag in version.get("tags", [])}
    assert tags["ray.job_id"] == trained.submission_id
    assert version["run_id"] == trained.result["run_id"]
    run = requests.get(f"{cluster.mlflow_url}/api/2.0/mlflow/runs/get", auth=auth, timeout=30,
                       params={"run_id": trained.result["run_id"]}).json()["run"]
    run_tags = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
    assert len(run_tags["mlray.worker_nodes"].split(",")) == JOB_WORKERS
    assert len(set(run_tags["mlray.worker_nodes"].split(","))) == 2, "the ranks did not run on both nodes"
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/")

    # The idle worker goes: the autoscaler removes it, and its Ray processes end.
    wait_for(lambda: not worker_runs_ray(cluster), timeout=180, interval=1, what="the idle worker's raylet gone")
    assert alive_nodes(cluster) == 1
    events = monitor_events(cluster)
    assert {"launch", "ready", "idle_removed"} <= set(events), events
    started = trained.ended - timedelta(seconds=trained.seconds)
    print(f"\nlab: job {trained.seconds:.1f} s; from its submission: worker queued +"
          f"{(events['launch'] - started).total_seconds():.0f} s, up to date +"
          f"{(events['ready'] - started).total_seconds():.0f} s, removed as idle +"
          f"{(events['idle_removed'] - started).total_seconds():.0f} s (idle_timeout_minutes {IDLE_TIMEOUT_MINUTES})"
          f"; left on the worker until `ray stop`: {cluster.lab.processes('worker1')}")


# -- what the head exposes ---------------------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_the_head_exposes_only_the_known_listeners_and_each_refuses_callers_without_credentials(
        cluster: LabCluster) -> None:
    done = cluster.exec_on_head("~/mlray-env/bin/python -m mlray.cluster.listeners --json")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    listeners = [row for row in rows if "port" in row]
    assert rows and rows[-1] == {"findings": []}, done.stdout[-3000:]
    assert done.returncode == 0

    assert findings([Listener(**row) for row in listeners]) == []
    by_role: dict[str, list[dict[str, Any]]] = {}
    for row in listeners:
        by_role.setdefault(row["role"], []).append(row)
    # The HTTP servers mlray starts: the dashboard on loopback only, MLflow on the head's address only.
    assert {(r["address"], r["reach"]) for r in by_role["ray-dashboard"] if r["port"] == 8265} == {
        ("127.0.0.1", LOOPBACK)}
    assert {(r["address"], r["port"]) for r in by_role["mlflow"]} == {(cluster.head_ip, 5000)}
    assert {"ray-gcs", "ray-raylet", "ray-dashboard-agent", "mlflow", "sshd"} <= set(by_role)

    answers = {}
    for row in listeners:
        if row["reach"] == LOOPBACK:
            continue
        assert row["role"] in EXPOSED_BY_DESIGN, row
        address = cluster.head_ip if row["reach"] == WILDCARD else row["address"].removeprefix("::ffff:")
        answers[f"{row['role']}@{row['address']}:{row['port']}"] = how_it_refuses(row["role"], address, row["port"])
    print("\nlab: head listeners beyond loopback, called without credentials:\n  " + "\n  ".join(
        f"{where}: {answer}" for where, answer in sorted(answers.items())))
    assert not [where for where, answer in answers.items() if answer.startswith("ANSWERED")], answers
    metrics = {where for where, answer in answers.items() if answer.startswith("metrics")}
    assert {where.split("@")[0] for where in metrics} <= {"ray-dashboard", "ray-autoscaler", "ray-dashboard-agent"}


@pytest.mark.timeout(60)
def test_the_head_starts_ray_with_mlrays_serve_settings(cluster: LabCluster) -> None:
    """`eval "$(python -m mlray.cluster.serve_env)"` in the start commands: the head's raylet (whose environment every
    Serve process inherits) has HAProxy on, its replays, and the loopback wrapper."""
    import psutil

    pattern = re.compile(rf"node[_-]ip[_-]address={re.escape(cluster.head_ip)}(\s|$)")
    raylets = [p for p in psutil.process_iter(["name", "cmdline"])  # the lab's processes are visible here
               if p.info["name"] == "raylet" and pattern.search(" ".join(p.info["cmdline"] or []))]
    assert len(raylets) == 1, raylets
    env = raylets[0].environ()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure empty-response"
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith("/haproxy-loopback")


# -- MLflow ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_mlflow_refuses_anonymous_writes_read_only_alias_moves_and_the_default_admin_password(
        cluster: LabCluster, trained: TrainedOnCluster) -> None:
    api = f"{cluster.mlflow_url}/api/2.0/mlflow"
    admin = ("admin", cluster.credentials("mlflow.env")["MLFLOW_AUTH_ADMIN_PASSWORD"])
    jobs_env = cluster.credentials("jobs.env")
    jobs = (jobs_env["MLFLOW_TRACKING_USERNAME"], jobs_env["MLFLOW_TRACKING_PASSWORD"])
    alias = {"name": "digits", "alias": "champion", "version": str(trained.result["version"])}

    assert requests.post(f"{api}/experiments/create", json={"name": "anonymous"}, timeout=30).status_code == 401
    assert requests.post(f"{api}/registered-models/alias", json=alias, timeout=30).status_code == 401
    # MLflow's old default admin password is refused; the one from mlflow.env works.
    assert requests.get(f"{api}/users/get", params={"username": "admin"}, auth=("admin", "password1234"),
                        timeout=30).status_code == 401
    assert requests.get(f"{api}/users/get", params={"username": "admin"}, auth=admin, timeout=30).status_code == 200

    viewer = ("viewer", secrets.token_urlsafe(16))
    created = requests.post(f"{api}/users/create", json={"username": viewer[0], "password": viewer[1]}, auth=admin,
                            timeout=30)
    assert created.status_code == 200, created.text
    assert requests.get(f"{api}/registered-models/get", params={"name": "digits"}, auth=viewer,
                        timeout=30).status_code == 200  # default_permission = READ
    assert requests.post(f"{api}/registered-models/alias", json=alias, auth=viewer, timeout=30).status_code == 403
    # The jobs user created the model, so it may move the alias; it may not create users.
    assert requests.post(f"{api}/registered-models/alias", json=alias, auth=jobs, timeout=30).status_code == 200
    assert requests.post(f"{api}/users/create", json={"username": "x", "password": "x" * 16}, auth=jobs,
                         timeout=30).status_code == 403


def _first_ipv4(output: str) -> str:
    found = re.search(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])", "\n".join(
        line for line in output.splitlines() if not re.match(r"\s*\d{4}-\d\d-\d\d", line)))
    assert found, f"no IPv4 address in {output!r}"
    return found.group(1)


@pytest.mark.timeout(120)
def test_the_mlflow_ui_is_reached_through_the_documented_ssh_tunnel(cluster: LabCluster) -> None:
    # docs/operations.md: the head's private address from `ray exec`, then `ssh -N -L` to it.
    # `ray exec` and `ray get-head-ip` may print Ray's own log lines around the answer: take the address.
    private = _first_ipv4(cluster.exec_on_head("hostname -I").stdout)
    head = _first_ipv4(cluster.ray("get-head-ip", str(cluster.config)).stdout)
    assert (private, head) == (cluster.head_ip, cluster.head_ip)  # one address per lab host
    port = free_port()
    tunnel = subprocess.Popen([*cluster.lab.ssh_args("head")[:-1], "-N", "-L", f"{port}:{private}:5000",
                               f"root@{head}"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200,
                 timeout=30, what="MLflow through the tunnel")
        assert requests.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search", timeout=10,
                            params={"max_results": 1}).status_code == 401
    finally:
        tunnel.kill()
        tunnel.wait(timeout=30)


# -- tearing down ------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_the_documented_teardown_leaves_no_process_on_any_host(cluster: LabCluster, dashboard: Tunnel) -> None:
    dashboard.close()  # its remote end is a shell on the head that `ray down` leaves alone
    started = time.monotonic()
    down = cluster.tear_down()
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-2000:]
    print(f"\nlab: teardown (MLflow, ray down, ray stop on the worker) took {time.monotonic() - started:.1f} s")
    for name in cluster.lab.hosts:
        try:
            wait_for(lambda n=name: cluster.lab.processes(n) == [], timeout=60, what=f"nothing left on {name}")
        except TimeoutError:
            pass
        assert cluster.lab.processes(name) == [], f"left running on {name}"
