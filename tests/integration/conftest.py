"""A real local Ray cluster (in-process head, 4 logical CPUs) and one trained digits model per session."""

from __future__ import annotations

import os

import pytest

from mlray.config import parse_config


@pytest.fixture(scope="session")
def ray_session(mlray_home: str):
    import ray

    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=300 * 1024 * 1024,
             runtime_env={"env_vars": {"MLRAY_HOME": mlray_home}})
    yield
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def digits_config():
    return parse_config({"name": "digits", "train": {"num_workers": 2, "epochs": 20, "lr": 0.003}})


@pytest.fixture(scope="session")
def trained(ray_session, digits_config):
    from mlray.train import train

    return train(digits_config)


@pytest.fixture(autouse=True)
def _home_is_set(mlray_home):
    assert os.environ["MLRAY_HOME"] == mlray_home
