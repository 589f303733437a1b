"""Shared fixtures.

Every test session gets its own mlray home (MLflow store, artifacts, checkpoints) under pytest's tmp dir,
and Ray's auth mode is set explicitly instead of being inherited from the machine. Tests that need Ray
share one real local cluster (``ray.cluster_utils.Cluster``: a head with 4 logical CPUs; tests that need
several nodes add and remove nodes on it) and one trained digits model.
"""

from __future__ import annotations

import os
import time

import pytest

from mlray._ray.env import local_head_env, train_env  # noqa: E402 - no Ray import; the knobs are set in one place

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.update(train_env())
os.environ.update(local_head_env())  # the test cluster is a cluster on this machine, as mlray's local heads
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)

DIGITS = {"name": "digits", "train": {"num_workers": 2, "epochs": 10, "lr": 0.003}}


@pytest.fixture(scope="session")
def mlray_home(tmp_path_factory: pytest.TempPathFactory) -> str:
    home = tmp_path_factory.mktemp("mlray-home")
    os.environ["MLRAY_HOME"] = str(home)  # Ray nodes started below inherit it
    return str(home)


@pytest.fixture(scope="session")
def ray_cluster(mlray_home: str):
    import shutil
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster

    from mlray.cluster.serve_env import serve_head_env
    from tests.helpers import free_port

    # The Serve settings of the heads mlray starts (HAProxy ingress with its retries, throughput mode, private
    # HAProxy files): the serving tests run what users get. Serve reads them when its processes start, and
    # the nodes that tests add later inherit this process's environment too.
    session_started = time.time()
    serve_env = serve_head_env(Path(mlray_home))
    os.environ.update(serve_env)
    # With its dashboard, as every cluster mlray starts: Ray Train frees a stopped Tune trial's CPUs once the
    # State API (served there) says the trial's controller died. Not on 8265: the cluster lab's heads use it.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "object_store_memory": 300 * 1024 * 1024, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
    })
    ray.init(address=cluster.address)
    yield cluster
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
        _no_ray_left_behind(since=session_started)
        if "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" in serve_env:
            shutil.rmtree(Path(serve_env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent, ignore_errors=True)


def _no_ray_left_behind(since: float, timeout_s: float = 60.0) -> None:
    """After the session's cluster shut down no Ray process the session started may stay (the suite leaves
    nothing running). One that outlives ``timeout_s`` is named in a warning, so the run's log says what leaked,
    and killed. Ray processes that were running before ``since`` (a developer's own head) are not touched."""
    import signal
    import warnings

    import psutil

    from tests.helpers import ray_processes

    def ours() -> list[str]:
        found = []
        for line in ray_processes():
            try:
                if psutil.Process(int(line.split()[0])).create_time() >= since - 2:  # /proc btime: whole seconds
                    found.append(line)
            except (psutil.NoSuchProcess, ValueError):
                pass
        return found

    deadline = time.monotonic() + timeout_s
    while (left := ours()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        warnings.warn(f"Ray processes outlived the test cluster by {timeout_s:.0f} s; killed: {left[:10]}",
                      stacklevel=1)
        for line in left:
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    return ray_cluster


def digits_config(**changes):
    from mlray.config import parse_config

    raw = {**DIGITS, **{k: v for k, v in changes.items() if k != "train"}}
    raw["train"] = {**DIGITS["train"], **changes.get("train", {})}
    return parse_config(raw)


@pytest.fixture(scope="session")
def trained(ray_session):
    """The undisturbed baseline: digits, 2 workers, seed 42."""
    from mlray.training.train import train

    return train(digits_config())


@pytest.fixture(scope="session")
def serve_port(ray_session) -> int:
    """One Serve HTTP proxy per session on 127.0.0.1 (Serve has one per cluster); apps differ by route prefix."""
    from ray import serve

    from tests.helpers import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    return port


def deploy_app(app: str, args: dict, *, port: int, options: dict | None = None, timeout_s: float = 240) -> str:
    """Deploy an mlray Serve app at route prefix /<app> through mlray's own deploy path; returns its URL."""
    from mlray.serving.deploy import ServePlan, deploy

    plan = ServePlan(app_name=app, route_prefix=f"/{app}", host="127.0.0.1", port=port, args=args,
                     deployment_options=options or {})
    return deploy(plan, timeout_s=timeout_s)


def register_copy(name: str, trained, *, broken: bool = False) -> int:
    """Register the baseline's model files as a new version of ``name`` (a second model costs no training).

    ``broken=True`` records a wrong weights hash, so the version fails to load as a corrupt upload would.
    """
    from mlray.registry import get_version, register

    source = get_version("digits", version=trained.version)
    tags = dict(source.tags)
    if broken:
        tags["mlray.weights_sha256"] = "0" * 64
    return register(name, model_uri=source.source, run_id=source.run_id, tags=tags).version


def set_alias(name: str, version: int, alias: str = "champion") -> None:
    from mlray.registry.tracking import client

    client().set_registered_model_alias(name, alias, str(version))


def register_champions(names: list[str], trained) -> dict[str, int]:
    """A copy of the baseline registered under each name and made its ``@champion``: name -> version."""
    versions = {}
    for name in names:
        versions[name] = register_copy(name, trained)
        set_alias(name, versions[name])
    return versions
