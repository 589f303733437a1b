"""A real `ray up cluster.local.yaml` on a lab of namespace hosts (tests/cluster/lab.py), torn down whatever
happens: `ray down`, then every process on every lab host is killed and the namespaces are deleted.

These tests never use the session Ray cluster of tests/conftest.py and never run `ray stop` on this machine:
every Ray process they start lives in a lab host's PID namespace.
"""

from __future__ import annotations

import copy
import getpass
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.cluster.lab import Lab, kill_ssh_clients, missing_prerequisites
from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLUSTER_LOCAL_YAML = ROOT / "cluster.local.yaml"

# What the tests change in cluster.local.yaml, and nothing else (test_the_lab_runs_cluster_local_yaml).
IDLE_TIMEOUT_MINUTES = 0.2


def lab_config(raw: dict[str, Any], *, name: str, key: Path, secrets_dir: Path) -> dict[str, Any]:
    config = copy.deepcopy(raw)
    config["cluster_name"] = name
    config["auth"]["ssh_private_key"] = str(key)
    config["file_mounts"]["~/.mlray/secrets"] = str(secrets_dir)
    config["idle_timeout_minutes"] = IDLE_TIMEOUT_MINUTES
    return config


@dataclass
class LabCluster:
    lab: Lab
    config: Path
    name: str
    secrets: Path
    up: subprocess.CompletedProcess[str]
    up_seconds: float
    down: subprocess.CompletedProcess[str] | None = None

    @property
    def head_ip(self) -> str:
        return self.lab.hosts["head"].address

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.head_ip}:5000"

    def env(self, *, token: bool = False) -> dict[str, str]:
        """This machine's environment for the Ray CLIs: token auth with the cluster's token, or none."""
        env = {key: value for key, value in os.environ.items()
               if key not in ("SSH_CLIENT", "SSH_CONNECTION", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        env.update(PATH=f"{BIN}:{env['PATH']}", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
        if token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.secrets / "ray_token"))
        return env

    def ray(self, *args: str, timeout: float = 120, token: bool = False,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT, env={**self.env(token=token), **(extra_env or {})})

    def exec_on_head(self, command: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.ray("exec", "--no-config-cache", str(self.config), command, timeout=timeout)

    def credentials(self, name: str) -> dict[str, str]:
        """The KEY=value lines of a secrets file (mlflow.env, jobs.env)."""
        lines = (self.secrets / name).read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def tear_down(self) -> subprocess.CompletedProcess[str]:
        """docs/operations.md's teardown for a local cluster: MLflow, `ray down`, then `ray stop` on workers."""
        self.exec_on_head("kill -- -$(cat ~/.mlray/mlflow.pid)", timeout=60)
        self.down = self.ray("down", "-y", str(self.config), timeout=180)
        for name in self.lab.hosts:
            if name != "head":
                self.lab.ssh(name, "~/mlray-env/bin/ray stop", timeout=120)
        return self.down


def forget_cluster(name: str) -> None:
    """What the Ray CLIs keep on the machine that runs them: the local provider's state and lock
    (/tmp/ray/cluster-NAME.*), the configs that `ray down` and `ray get-head-ip` cache (/tmp/ray-config-*; they
    have no --no-config-cache) and the folder of SSH control sockets (/tmp/ray_ssh_USER/CLUSTER)."""
    for suffix in ("state", "lock"):
        Path(f"/tmp/ray/cluster-{name}.{suffix}").unlink(missing_ok=True)
    for cached in Path("/tmp").glob("ray-config-*"):
        try:
            if json.loads(cached.read_text()).get("config", {}).get("cluster_name") == name:
                cached.unlink()
        except (OSError, ValueError):
            continue
    user, cluster = (hashlib.sha256(text.encode()).hexdigest()[:10] for text in (getpass.getuser(), name))
    shutil.rmtree(f"/tmp/ray_ssh_{user}/{cluster}", ignore_errors=True)


def write_secrets(folder: Path) -> Path:
    """The secrets folder of docs/operations.md, freshly generated: 0700, files 0600."""
    folder.mkdir(mode=0o700)
    files = {
        "ray_token": secrets.token_hex(32),
        "mlflow.env": f"MLFLOW_AUTH_ADMIN_PASSWORD={secrets.token_urlsafe(24)}\n"
                      f"MLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(32)}\n",
        "jobs.env": f"MLFLOW_TRACKING_USERNAME=mlray-jobs\nMLFLOW_TRACKING_PASSWORD={secrets.token_urlsafe(24)}\n",
    }
    for name, text in files.items():
        path = folder / name
        path.write_text(text)
        path.chmod(0o600)
    return folder


@pytest.fixture(scope="module")
def raw_local_config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_LOCAL_YAML.read_text())


def started_lab(root: Path, hosts: dict[str, str]) -> Lab:
    """A started lab whose hosts have mlray installed where the cluster files expect it, or a skip (a failure
    under MLRAY_REQUIRE_LAB=1, as in CI) where the lab cannot run. The caller stops it."""
    why = missing_prerequisites()
    if why:
        if os.environ.get("MLRAY_REQUIRE_LAB") == "1":
            pytest.fail(f"MLRAY_REQUIRE_LAB=1 but the lab cannot run: {why}")
        pytest.skip(why)
    lab = Lab(root, hosts)
    try:
        lab.start()
        # The machine image: Python with mlray installed at ~/mlray-env.
        (lab.home / "mlray-env").symlink_to(Path(sys.prefix))
    except BaseException:
        lab.stop()
        raise
    return lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, raw_local_config: dict[str, Any]) -> Iterator[Lab]:
    provider = raw_local_config["provider"]
    hosts = {"head": provider["head_ip"], **{f"worker{i}": ip for i, ip in enumerate(provider["worker_ips"], 1)}}
    lab = started_lab(tmp_path_factory.mktemp("lab"), hosts)
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture(scope="module")
def cluster(lab: Lab, raw_local_config: dict[str, Any]) -> Iterator[LabCluster]:
    name = f"mlray-lab-{os.getpid()}"
    secrets_dir = write_secrets(lab.root / "secrets")
    config = lab.root / "cluster.yaml"
    config.write_text(yaml.safe_dump(lab_config(raw_local_config, name=name, key=lab.key, secrets_dir=secrets_dir),
                                     sort_keys=False))
    handle = LabCluster(lab=lab, config=config, name=name, secrets=secrets_dir,
                        up=subprocess.CompletedProcess([], 0), up_seconds=0.0)
    try:
        started = time.monotonic()
        handle.up = handle.ray("up", "-y", "--no-config-cache", str(config), timeout=420)
        handle.up_seconds = time.monotonic() - started
        (lab.root / "ray-up.log").write_text(handle.up.stdout + handle.up.stderr)
        yield handle
    finally:
        if handle.down is None:
            try:
                handle.tear_down()
            except subprocess.TimeoutExpired:
                pass  # lab.stop() kills whatever is left
        forget_cluster(name)


@dataclass
class Tunnel:
    """`ray dashboard cluster.local.yaml --port N`: the head's 127.0.0.1:8265 at ``url``."""

    url: str
    process: subprocess.Popen[bytes]
    key: Path

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # `ray dashboard` and its ssh -L child
            self.process.wait(timeout=30)
        kill_ssh_clients(self.key)


@pytest.fixture(scope="module")
def dashboard(cluster: LabCluster) -> Iterator[Tunnel]:
    assert cluster.up.returncode == 0, "ray up failed"
    port = free_port()
    process = subprocess.Popen([str(BIN / "ray"), "dashboard", "--no-config-cache", "-p", str(port),
                                str(cluster.config)], cwd=ROOT, env=cluster.env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    tunnel = Tunnel(url=f"http://127.0.0.1:{port}", process=process, key=cluster.lab.key)
    try:
        wait_for(lambda: requests.get(f"{tunnel.url}/api/version", timeout=5).status_code == 401, timeout=60,
                 what="the dashboard tunnel answering (401 without the token)")
        yield tunnel
    finally:
        tunnel.close()
