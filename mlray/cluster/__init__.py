"""Connecting to Ray: an existing cluster when there is one, else a local one started on demand.

Every Ray process mlray starts gets :func:`mlray.settings.ray_process_env`, so the auth mode, the MLflow
store and the Train settings are the same in the driver, the workers and the Serve replicas. Unless the caller
chose otherwise, that is token auth with mlray's own token (mlray/_ray/auth.py): a head or a throwaway local
cluster mlray starts refuses every caller without it.

The package holds what runs the cluster around the library: this module connects; ``quickstart`` starts a
head and goes from nothing to a served model; ``serve_env`` is the Serve settings of a head mlray starts;
``listeners`` audits what a node exposes; ``monitoring`` runs Prometheus for it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from mlray import settings
from mlray._ray import auth
from mlray._ray.env import local_head_env
from mlray.errors import MlrayError

logger = logging.getLogger(__name__)

DASHBOARD_PORT = 8265
GCS_PORT = 6379  # Ray's default


@dataclass(frozen=True)
class HeadInfo:
    address: str
    dashboard_url: str
    started_here: bool
    auth_mode: str = "disabled"
    token_path: str | None = None  # where its callers find the token, when in a file


def apply_env() -> None:
    """Give this process (and the Ray processes it starts) mlray's environment, without overriding; creates
    mlray's Ray token when that is the one to use."""
    env = ray_env()
    auth_before = {key: os.environ.get(key) for key in auth.AUTH_ENV}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if {key: os.environ.get(key) for key in auth.AUTH_ENV} != auth_before:
        auth.refresh_ray_config()


def ray_env() -> dict[str, str]:
    """:func:`settings.ray_process_env`, after creating (or checking) mlray's token if it names it."""
    env = settings.ray_process_env()
    if env.get("RAY_AUTH_TOKEN_PATH") == str(settings.ray_token_path()):
        auth.ensure_token(settings.ray_token_path())
    return env


def connect(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Connect this process to Ray: ``address``, ``$RAY_ADDRESS``, a running local cluster, or a new one.

    A new one lives only as long as this process (use :func:`start_head` for one that outlives it). It has its
    dashboard on 127.0.0.1 (port 8265, or the next free one): Ray's State API lives there, and Ray Train asks it
    whether a stopped Tune trial's controller died before it frees the trial's CPUs.
    ``log_to_driver=False`` keeps the workers' logs out of this process's output (they stay in the
    dashboard and under /tmp/ray/session_latest/logs).
    """
    import ray

    # An address that names no cluster is refused even in a process that is connected already.
    target = resolve_address(address or os.environ.get("RAY_ADDRESS"))
    if ray.is_initialized():
        return
    apply_env()
    if target:
        ray.init(address=target, log_to_driver=log_to_driver)
        return
    try:
        ray.init(address="auto", log_to_driver=log_to_driver)
        logger.info("Connected to the running local Ray cluster")
    except ConnectionError:
        logger.info("No Ray cluster running: starting one for this process")
        for key, value in local_head_env().items():
            os.environ.setdefault(key, value)  # the processes ray.init starts inherit it
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=log_to_driver)


def resolve_address(address: str | None) -> str | None:
    """A GCS address (``host:port``) from ``--address``, which may also be a dashboard URL (``http://host:8265``)
    as Ray's own CLIs take it. A URL resolves to the GCS address of the head mlray started with that
    dashboard, else to the host's default GCS port (6379) once the dashboard answers as a Ray dashboard."""
    if not address or not address.startswith(("http://", "https://")):
        return address
    import requests

    url = address.rstrip("/")
    record = _record()
    if record.exists():
        info = json.loads(record.read_text())
        if _same_url(info.get("dashboard_url", ""), url):
            return str(info["address"])
    try:
        version = requests.get(f"{url}/api/version", headers=auth.bearer({**os.environ, **ray_env()}), timeout=10)
        version.raise_for_status()
        version.json()["ray_version"]
    except (requests.RequestException, ValueError, KeyError) as err:
        raise MlrayError(f"--address {address!r} is not a Ray dashboard that answers ({err}); pass the "
                         "dashboard URL (http://HOST:8265) or the GCS address (HOST:6379)") from None
    host = urlparse(url).hostname or "127.0.0.1"
    return f"{host}:{GCS_PORT}"


def _same_url(a: str, b: str) -> bool:
    def norm(url: str) -> tuple[str | None, int | None]:
        parsed = urlparse(url.rstrip("/"))
        host = "127.0.0.1" if parsed.hostname in ("localhost", "127.0.0.1") else parsed.hostname
        return host, parsed.port

    return bool(a) and norm(a) == norm(b)


def _record() -> Path:
    return settings.home() / "cluster.json"


def _ray_cli() -> str:
    found = Path(sys.executable).with_name("ray")
    return str(found) if found.exists() else (shutil.which("ray") or "ray")


def start_head(*, num_cpus: int | None = None, dashboard_port: int = DASHBOARD_PORT) -> HeadInfo:
    """Start (or find) a local head that outlives this process, with its dashboard on 127.0.0.1."""
    record = _record()
    if record.exists():
        info = json.loads(record.read_text())
        if subprocess.run([_ray_cli(), "status", "--address", info["address"]], capture_output=True,
                          env={**os.environ, **ray_env()}, timeout=60).returncode == 0:
            if info.get("token_path"):
                auth.install_hook(record)
            return HeadInfo(info["address"], info["dashboard_url"], started_here=False,
                            auth_mode=info.get("auth_mode", "disabled"), token_path=info.get("token_path"))
        record.unlink()
    cmd = [_ray_cli(), "start", "--head", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
           "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    from mlray.cluster.serve_env import serve_head_env

    env = {**os.environ, **ray_env(), **local_head_env(), **serve_head_env(settings.home())}
    # Job entrypoints (`ray job submit -- python ...`) run with the head's PATH: put this interpreter's
    # folder first, so `python` there is the one mlray is installed in, not whatever the caller's PATH had.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    if done.returncode != 0:
        raise MlrayError(f"`ray start --head` failed ({done.returncode}):\n{done.stderr[-2000:]}")
    mode = env["RAY_AUTH_MODE"].lower()
    # The token file, when the head's callers find theirs in a file: the venv's hook reads it from the record.
    token_path = env.get("RAY_AUTH_TOKEN_PATH") if mode == "token" and not env.get("RAY_AUTH_TOKEN") else None
    info = HeadInfo(address=_gcs_address_from(done.stdout + done.stderr),
                    dashboard_url=f"http://127.0.0.1:{dashboard_port}", started_here=True, auth_mode=mode,
                    token_path=str(Path(token_path).resolve()) if token_path else None)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"address": info.address, "dashboard_url": info.dashboard_url, "auth_mode": mode,
                                  **({"token_path": info.token_path} if info.token_path else {})}))
    hook = auth.install_hook(record) if info.token_path else None
    logger.info("Started a local Ray head at %s (dashboard %s, auth %s%s)", info.address, info.dashboard_url,
                env["RAY_AUTH_MODE"], f"; this venv's Ray CLIs find the token through {hook}" if hook else "")
    return info


def _gcs_address_from(output: str) -> str:
    """The GCS address from `ray start`'s "ray start --address='IP:PORT'" hint (colour codes and all)."""
    found = re.search(r"--address='?([0-9A-Za-z.\-\[\]:]+:\d+)", output)
    if found is None:
        raise MlrayError(f"could not find the head's address in `ray start`'s output:\n{output[-1000:]}")
    return found.group(1)


def stop_head() -> bool:
    """Stop the local head that :func:`start_head` started; returns whether one was stopped."""
    record = _record()
    if not record.exists():
        return False
    env = {**os.environ, **settings.ray_process_env()}
    subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True, env=env, timeout=120)
    auth.remove_hook(record)
    record.unlink()
    return True
